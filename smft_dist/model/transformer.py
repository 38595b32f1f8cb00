"""Decoder-only transformer: pre-RMSNorm blocks, RoPE, causal SDPA attention, SwiGLU FFN and/or memory layer.

Value tables live in one place, :attr:`Transformer.value_tables`, and are *bound* to the memory
layers that read them; :meth:`Transformer.bind_value_tables` swaps in other implementations (a
row-sharded TorchRec table) and can take them out of the module tree entirely, so a dense-only
wrapper (DeepSpeed) never sees them.
"""

from __future__ import annotations

from typing import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from smft_dist.config import ConfigError, ModelConfig
from smft_dist.model.memory import MemoryLayer
from smft_dist.model.value_table import LocalValueTable, ValueTable


def value_table_names(cfg: ModelConfig) -> dict[int, str]:
    """Block index -> name of the value table its memory layer reads."""
    shared = cfg.memory.shared_values
    return {i: "mem_values" if shared else f"mem_values_{i}" for i in cfg.memory.layers}


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [B, 1, S, head_dim] for the rotate-half RoPE convention (as in Llama)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    freqs = positions.float()[..., None] * inv_freq  # [B, S, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class KVCache:
    """Every attention layer's keys and values of the tokens fed so far (incremental decoding).

    Slots keep the order tokens were fed, padding included: ``mask`` [B, L] marks the real tokens and
    ``seen`` [B] counts them per row, so a new token's position is its row's count of real tokens
    before it, whatever padding sits in between (right-padded prompts). Memory layers keep no cache.
    """

    def __init__(self):
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.mask: torch.Tensor | None = None
        self.seen: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    def extend(self, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the mask of S new tokens; returns (real tokens before them [B], the mask of all [B, L+S])."""
        before = valid.new_zeros(valid.shape[0], dtype=torch.long) if self.seen is None else self.seen
        self.mask = valid if self.mask is None else torch.cat([self.mask, valid], 1)
        self.seen = before + valid.sum(1)
        return before, self.mask

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append layer ``layer``'s new keys/values [B, H, S, hd]; returns all of them."""
        if layer in self.layers:
            k, v = (torch.cat([old, new], 2) for old, new in zip(self.layers[layer], (k, v)))
        self.layers[layer] = (k, v)
        return k, v


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int = 0):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.kv_heads
        self.head_dim = cfg.dim // cfg.n_heads
        bias = cfg.attention_bias
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * self.head_dim, bias=bias)
        self.wk = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.wv = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.wo = nn.Linear(cfg.n_heads * self.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, attn_mask, cache: KVCache | None = None):
        B, S, _ = x.shape
        q = self.wq(x).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_id, k, v)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None, enable_gqa=self.n_kv_heads != self.n_heads
        )
        return self.wo(out.transpose(1, 2).reshape(B, S, -1))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # gate
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)  # up
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down

    def forward(self, x, valid=None):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """Pre-norm block. With a memory layer (``table_name``) and ``memory.placement`` ``replace`` the
    FFN *is* the memory layer; with ``beside`` the block keeps its SwiGLU and adds the memory layer
    reading the same normed input: ``x + ffn(h) + memory(h)``."""

    def __init__(self, cfg: ModelConfig, layer_id: int, table_name: str | None):
        super().__init__()
        self.attention_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attention = Attention(cfg, layer_id)
        self.ffn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        replace = table_name is not None and cfg.memory.placement == "replace"
        self.ffn = MemoryLayer(cfg.dim, cfg.memory, table_name) if replace else SwiGLU(cfg.dim, cfg.hidden_dim)
        self.memory = MemoryLayer(cfg.dim, cfg.memory, table_name) if table_name and not replace else None

    @property
    def memory_layer(self) -> MemoryLayer | None:
        """This block's memory layer (in place of the FFN or beside it), or None."""
        return self.ffn if isinstance(self.ffn, MemoryLayer) else self.memory

    def forward(self, x, cos, sin, attn_mask, valid, cache=None):
        x = x + self.attention(self.attention_norm(x), cos, sin, attn_mask, cache)
        h = self.ffn_norm(x)
        out = self.ffn(h, valid)
        if self.memory is not None:
            out = out + self.memory(h, valid)
        return x + out


class Transformer(nn.Module):
    """Causal LM returning logits [B, S, vocab].

    ``build_value_tables=False`` leaves the memory layers unbound (no [N, v_dim] tensor is made), for
    a distributed run that builds each rank's shard itself.
    """

    def __init__(self, cfg: ModelConfig, build_value_tables: bool = True):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        names = value_table_names(cfg)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i, names.get(i)) for i in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.value_tables = nn.ModuleDict()
        if build_value_tables:
            tables = {name: LocalValueTable(cfg.memory.num_slots, cfg.value_dim) for name in sorted(set(names.values()))}
            self.bind_value_tables(tables, register=True)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Dense weights N(0, init_std); memory layers and value tables use the reference init."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=self.cfg.init_std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.RMSNorm):
                nn.init.ones_(module.weight)
        for layer in self.memory_layers():
            layer.reset_parameters()
        for table in self.value_tables.values():
            if isinstance(table, LocalValueTable):
                table.reset_parameters()

    def memory_layers(self) -> list[MemoryLayer]:
        return [b.memory_layer for b in self.layers if b.memory_layer is not None]

    def bind_value_tables(self, tables: Mapping[str, ValueTable], register: bool = True) -> None:
        """Make memory layers read ``tables`` (name -> table); register them as submodules or not."""
        missing = {layer.table_name for layer in self.memory_layers()} - set(tables)
        if missing:
            raise KeyError(f"no value table given for {sorted(missing)}")
        for layer in self.memory_layers():
            layer.bind_table(tables[layer.table_name])
        self.value_tables = nn.ModuleDict(tables if register else {})

    def dense_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Named parameters outside the value tables."""
        return ((n, p) for n, p in self.named_parameters() if not n.startswith("value_tables."))

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> torch.Tensor:
        """Logits of ``input_ids`` [B, S] (``attention_mask``: 0 = padding). With ``cache`` the tokens
        follow the ones already in it (their keys/values are appended), as in greedy decoding."""
        B, S = input_ids.shape
        length = S + (cache.length if cache is not None else 0)
        if length > self.cfg.max_seq_len:
            raise ConfigError(f"model.max_seq_len: a sequence of {length} tokens exceeds max_seq_len={self.cfg.max_seq_len}")
        device = input_ids.device
        if cache is None and (attention_mask is None or bool(attention_mask.all())):
            valid, attn_mask = None, None
            positions = torch.arange(S, device=device).expand(B, S)
        else:
            valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
            positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
            keys = valid
            if cache is not None:
                before, keys = cache.extend(valid)
                positions = positions + before[:, None]
            q = torch.arange(keys.shape[1] - S, keys.shape[1], device=device)[:, None]
            k = torch.arange(keys.shape[1], device=device)[None, :]
            attn_mask = (k <= q) & (keys[:, None, None, :] | (k == q))  # padded queries attend to themselves
        cos, sin = rope_cos_sin(positions, self.cfg.dim // self.cfg.n_heads, self.cfg.rope_theta)
        h = self.tok_embeddings(input_ids)
        cos, sin = cos.to(h.dtype), sin.to(h.dtype)
        for block in self.layers:
            h = block(h, cos, sin, attn_mask, valid, cache)
        return self.output(self.norm(h))


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross entropy; ``labels`` are aligned with the inputs (shifted here), -100 ignored."""
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100, reduction=reduction
    )
