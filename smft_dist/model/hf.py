"""transformers glue: config + causal-LM wrapper, Auto* registration.

``save_pretrained`` / ``from_pretrained`` (local directories) / ``generate`` work on
:class:`SMFTForCausalLM`; importing :mod:`smft_dist.model` registers it with ``AutoConfig`` and
``AutoModelForCausalLM`` under model type ``smft_memory``.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from smft_dist.config import ModelConfig, from_dict, to_dict
from smft_dist.model.transformer import Transformer, lm_loss


class SMFTConfig(PretrainedConfig):
    """HF config holding a :class:`~smft_dist.config.ModelConfig` as the nested dict ``model``."""

    model_type = "smft_memory"

    def __init__(self, model: dict | None = None, **kwargs):
        self.model = to_dict(from_dict(ModelConfig, model or {}))
        cfg = self.to_model_config()
        kwargs.setdefault("tie_word_embeddings", cfg.tie_embeddings)
        kwargs.setdefault("use_cache", False)
        super().__init__(**kwargs)
        self.vocab_size, self.hidden_size, self.num_hidden_layers = cfg.vocab_size, cfg.dim, cfg.n_layers
        self.num_attention_heads = cfg.n_heads

    def to_model_config(self) -> ModelConfig:
        return from_dict(ModelConfig, self.model)


class SMFTForCausalLM(PreTrainedModel, GenerationMixin):
    """Causal LM over :class:`~smft_dist.model.transformer.Transformer` (no KV cache)."""

    config_class = SMFTConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]

    def __init__(self, config: SMFTConfig):
        super().__init__(config)
        self.model = Transformer(config.to_model_config())
        if config.tie_word_embeddings:
            self._tied_weights_keys = {"model.output.weight": "model.tok_embeddings.weight"}
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        """The Transformer initializes itself at construction (reference inits)."""

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.model.tok_embeddings

    def get_output_embeddings(self) -> torch.nn.Linear:
        return self.model.output

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        logits = self.model(input_ids, attention_mask)
        loss = lm_loss(logits, labels) if labels is not None else None
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        """No cache: every step re-reads the whole prefix."""
        return {"input_ids": input_ids, "attention_mask": attention_mask}


AutoConfig.register(SMFTConfig.model_type, SMFTConfig, exist_ok=True)
AutoModelForCausalLM.register(SMFTConfig, SMFTForCausalLM, exist_ok=True)

