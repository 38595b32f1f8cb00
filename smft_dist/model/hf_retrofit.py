"""Retrofit a pretrained HF causal LM (Llama, Qwen2/Qwen2.5, Mistral) with memory layers.

Every weight is copied into a :class:`~smft_dist.model.hf.SMFTForCausalLM`; the blocks in
``memory.layers`` get a fresh memory layer. With ``memory.placement="beside"`` the FFN stays and the
memory adds nothing at the start, so the retrofitted model computes exactly the original function;
two ways (``init``):

- ``values_zero``: every value row is 0 and W2 is drawn, scaled so that the memory's output at the
  reference value scale would match the FFN output's RMS at that block on calibration tokens. Value
  rows get a gradient at once: smft / memory_ft can run with no recovery.
- ``w2_zero``: W2 is 0 (values at the reference init). smft / memory_ft keep W2 frozen, so they
  refuse such a model; recovery training (``method.name=memory_pretrain``) must move W2 first.

``center_queries`` (beside only) sets each memory layer's query bias to -W_q mean(x) over the
calibration tokens' memory inputs x: the retrofitted (untrained) product keys then hash each token's
deviation from the block's mean input, not the mean every token shares, so reads spread over the
table and fewer of them are shared between unrelated prompts. The output is unchanged (the memory
adds nothing at the start either way).

With ``replace`` the FFN of those blocks is dropped (reference init). Options the model cannot
represent are refused with a :class:`~smft_dist.config.ConfigError` naming the checkpoint's config field.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from smft_dist.config import ConfigError, MemoryConfig, ModelConfig, to_dict
from smft_dist.model.hf import SMFTConfig, SMFTForCausalLM
from smft_dist.model.transformer import Transformer

ARCHITECTURES = ("llama", "qwen2", "mistral")
MEMORY_INITS = ("values_zero", "w2_zero")

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


def retrofit(path: str | Path, memory: MemoryConfig, init: str = "values_zero",
             calibration: torch.Tensor | None = None, center_queries: bool = False) -> SMFTForCausalLM:
    """Build a memory model from the local HF checkpoint at ``path`` (see the module docstring).

    ``calibration``: token ids [B, S] that size W2 under ``values_zero`` and center the queries
    under ``center_queries`` (default: 4 x 64 random tokens). The memory layers (and value tables)
    draw their initial values from the global torch RNG.
    """
    if init not in MEMORY_INITS:
        raise ConfigError(f"memory init: {init!r} is not one of {', '.join(MEMORY_INITS)}")
    if center_queries and (memory.placement != "beside" or not memory.query_bias):
        raise ConfigError("center queries: needs model.memory.placement=beside and model.memory.query_bias=true")
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
        if calibration is None and (init == "values_zero" or center_queries):
            calibration = torch.randint(0, cfg.vocab_size, (4, min(64, cfg.max_seq_len)))
        if init == "w2_zero":
            with torch.no_grad():
                for layer in model.model.memory_layers():
                    layer.w2.weight.zero_()
        else:
            calibrate_w2_(model.model, calibration)
        if center_queries:  # the memory adds nothing now: each layer sees the original function's inputs
            center_queries_(model.model, calibration)
    return model


def _run_rows(model: Transformer, tokens: torch.Tensor, hooks: list) -> None:
    """Forward each row of ``tokens`` alone, then remove ``hooks`` (registered by the caller)."""
    try:
        for row in tokens:
            model(row[None])
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def center_queries_(model: Transformer, tokens: torch.Tensor) -> None:
    """Set each memory layer's query bias to -W_q mean(x), x its inputs on ``tokens`` (see the module
    docstring). Call only where the memory adds nothing, so every layer sees the original inputs."""
    layers = model.memory_layers()
    inputs: list[list[torch.Tensor]] = [[] for _ in layers]
    _run_rows(model, tokens, [layer.register_forward_pre_hook(lambda m, a, i=i: inputs[i].append(a[0].flatten(0, -2).double()))
                              for i, layer in enumerate(layers)])
    for layer, xs in zip(layers, inputs):
        mean = torch.cat(xs).mean(0).to(layer.query.weight.dtype)
        layer.query.bias.copy_(-(layer.query.weight @ mean))


@torch.no_grad()
def calibrate_w2_(model: Transformer, tokens: torch.Tensor) -> None:
    """``values_zero`` on a ``beside`` model: scale each memory layer's W2 so that its output at the
    current (reference-init) values has the RMS of the FFN output beside it on ``tokens``, then
    zero every value row. The model computes its FFN-only function afterwards."""
    blocks = [b for b in model.layers if b.memory is not None]
    saved = [b.memory.w2.weight.clone() for b in blocks]
    ffn_sq, mem_sq = [0.0] * len(blocks), [0.0] * len(blocks)

    hooks = []
    for i, b in enumerate(blocks):
        def on_ffn(module, args, out, i=i):
            ffn_sq[i] += float(out.double().pow(2).mean())

        def on_w2(module, args, i=i, w=saved[i]):
            mem_sq[i] += float((args[0] @ w.T).double().pow(2).mean())

        hooks += [b.ffn.register_forward_hook(on_ffn), b.memory.w2.register_forward_pre_hook(on_w2)]
        b.memory.w2.weight.zero_()  # the pass runs the original function: later layers see their own inputs
    _run_rows(model, tokens, hooks)
    for i, b in enumerate(blocks):
        b.memory.w2.weight.copy_(saved[i] * (ffn_sq[i] / max(mem_sq[i], 1e-30)) ** 0.5)
    for table in model.value_tables.values():
        table.weight.zero_()
