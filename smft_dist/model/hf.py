"""transformers glue: config + causal-LM wrapper, Auto* registration, Llama import.

``save_pretrained`` / ``from_pretrained`` (local directories) / ``generate`` work on
:class:`SMFTForCausalLM`; importing :mod:`smft_dist.model` registers it with ``AutoConfig`` and
``AutoModelForCausalLM`` under model type ``smft_memory``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from smft_dist.config import ConfigError, MemoryConfig, ModelConfig, from_dict, to_dict
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


_LLAMA_LAYER_MAP = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn.w1",
    "mlp.up_proj": "ffn.w3",
    "mlp.down_proj": "ffn.w2",
}


def from_llama(path: str | Path, memory: MemoryConfig) -> SMFTForCausalLM:
    """Build a memory model from a local Llama-architecture checkpoint.

    Every weight is copied; the FFN of each layer in ``memory.layers`` is replaced by a freshly
    initialized memory layer (its Llama MLP weights are dropped).
    """
    from transformers import LlamaForCausalLM

    llama = LlamaForCausalLM.from_pretrained(str(path), torch_dtype=torch.float32)
    lc = llama.config
    head_dim = getattr(lc, "head_dim", None) or lc.hidden_size // lc.num_attention_heads
    if head_dim * lc.num_attention_heads != lc.hidden_size:
        raise ConfigError(f"{path}: head_dim {head_dim} * heads {lc.num_attention_heads} != hidden_size {lc.hidden_size}")
    if getattr(lc, "attention_bias", False) or getattr(lc, "mlp_bias", False):
        raise ConfigError(f"{path}: Llama checkpoints with attention/MLP biases are not supported")
    rope = getattr(lc, "rope_parameters", None) or {}
    rope_theta = rope.get("rope_theta", getattr(lc, "rope_theta", 10000.0))
    cfg = ModelConfig(
        vocab_size=lc.vocab_size,
        dim=lc.hidden_size,
        n_layers=lc.num_hidden_layers,
        n_heads=lc.num_attention_heads,
        n_kv_heads=lc.num_key_value_heads,
        ffn_hidden_dim=lc.intermediate_size,
        norm_eps=lc.rms_norm_eps,
        rope_theta=float(rope_theta),
        max_seq_len=lc.max_position_embeddings,
        tie_embeddings=bool(lc.tie_word_embeddings),
        memory=memory,
    )
    model = SMFTForCausalLM(SMFTConfig(model=to_dict(cfg)))
    target = model.model.state_dict()
    mapped = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight"}
    if not cfg.tie_embeddings:
        mapped["lm_head.weight"] = "output.weight"
    for i in range(cfg.n_layers):
        for src, dst in _LLAMA_LAYER_MAP.items():
            if dst.startswith("ffn.") and i in memory.layers:
                continue
            mapped[f"model.layers.{i}.{src}.weight"] = f"layers.{i}.{dst}.weight"
    source = llama.state_dict()
    with torch.no_grad():
        for src, dst in mapped.items():
            target[dst].copy_(source[src])
    return model
