"""Retrofit a pretrained HF causal LM (Llama, Qwen2/Qwen2.5, Mistral) with memory layers.

Every weight is copied into a :class:`~smft_dist.model.hf.SMFTForCausalLM`; the blocks in
``memory.layers`` get a fresh memory layer. With ``memory.placement="beside"`` the FFN stays and the
memory layer's output projection W2 starts at zero, so the retrofitted model computes exactly the
original function until recovery training (``method.name=memory_pretrain``) moves it; with
``replace`` the FFN of those blocks is dropped. Options the model cannot represent are refused
with a :class:`~smft_dist.config.ConfigError` naming the checkpoint's config field.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from smft_dist.config import ConfigError, MemoryConfig, ModelConfig, to_dict
from smft_dist.model.hf import SMFTConfig, SMFTForCausalLM

ARCHITECTURES = ("llama", "qwen2", "mistral")

_LAYER_MAP = {
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


def model_config(hc: PretrainedConfig, memory: MemoryConfig, where: str = "config.json") -> ModelConfig:
    """The :class:`ModelConfig` of HF config ``hc`` plus ``memory``; refuses what it cannot represent."""

    def refuse(name: str, why: str) -> None:
        raise ConfigError(f"{where}: {name}={getattr(hc, name, None)!r}: {why}")

    if hc.model_type not in ARCHITECTURES:
        refuse("model_type", f"not one of {', '.join(ARCHITECTURES)} (MoE and other architectures are not supported)")
    if hc.hidden_act != "silu":
        refuse("hidden_act", "only the SwiGLU (silu) MLP is supported")
    if getattr(hc, "mlp_bias", False):
        refuse("mlp_bias", "MLP biases are not supported")
    if hc.model_type == "llama" and getattr(hc, "attention_bias", False):
        refuse("attention_bias", "Llama attention biases include the output projection, which is not supported")
    if (getattr(hc, "head_dim", None) or hc.hidden_size // hc.num_attention_heads) * hc.num_attention_heads != hc.hidden_size:
        refuse("head_dim", f"must equal hidden_size / num_attention_heads = {hc.hidden_size // hc.num_attention_heads}")
    rope = getattr(hc, "rope_parameters", None) or getattr(hc, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        refuse("rope_parameters" if hasattr(hc, "rope_parameters") else "rope_scaling", "only unscaled (default) RoPE is supported")
    window, layer_types = getattr(hc, "sliding_window", None), getattr(hc, "layer_types", None) or []
    sliding = window is not None and window < hc.max_position_embeddings
    if sliding and (hc.model_type == "mistral" or "sliding_attention" in layer_types):
        refuse("sliding_window", f"sliding-window attention is not supported (it is active below max_position_embeddings={hc.max_position_embeddings})")
    return ModelConfig(
        vocab_size=hc.vocab_size,
        dim=hc.hidden_size,
        n_layers=hc.num_hidden_layers,
        n_heads=hc.num_attention_heads,
        n_kv_heads=hc.num_key_value_heads,
        ffn_hidden_dim=hc.intermediate_size,
        norm_eps=hc.rms_norm_eps,
        rope_theta=float(rope.get("rope_theta", getattr(hc, "rope_theta", 10000.0))),
        attention_bias=hc.model_type == "qwen2",
        max_seq_len=hc.max_position_embeddings,
        tie_embeddings=bool(hc.tie_word_embeddings),
        memory=memory,
    )


def retrofit(path: str | Path, memory: MemoryConfig) -> SMFTForCausalLM:
    """Build a memory model from the local HF checkpoint at ``path`` (see the module docstring).

    The memory layers (and value tables) draw their initial values from the global torch RNG.
    """
    hc = AutoConfig.from_pretrained(str(path))
    cfg = model_config(hc, memory, f"{path}/config.json")
    source = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).state_dict()
    model = SMFTForCausalLM(SMFTConfig(model=to_dict(cfg)))
    target = model.model.state_dict()
    mapped = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
              "lm_head.weight": "output.weight"}  # tied: the same tensor as the embeddings on both sides
    dropped = set(memory.layers) if memory.placement == "replace" else set()
    for i in range(cfg.n_layers):
        for src, dst in _LAYER_MAP.items():
            if not (dst.startswith("ffn.") and i in dropped):
                mapped[f"model.layers.{i}.{src}.weight"] = f"layers.{i}.{dst}.weight"
        if cfg.attention_bias:
            for proj, dst in (("q", "wq"), ("k", "wk"), ("v", "wv")):
                mapped[f"model.layers.{i}.self_attn.{proj}_proj.bias"] = f"layers.{i}.attention.{dst}.bias"
    unread = sorted(k for k in source if k not in mapped and not any(f"layers.{i}.mlp." in k for i in dropped))
    if unread:
        raise ConfigError(f"{path}: weight {unread[0]!r} has no place in the memory model (unsupported architecture option)")
    with torch.no_grad():
        for src, dst in mapped.items():
            target[dst].copy_(source[src])
        if memory.placement == "beside":
            for layer in model.model.memory_layers():
                layer.w2.weight.zero_()
    return model
