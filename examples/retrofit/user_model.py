"""The retrofit example's "model the user already has": a plain ``transformers`` Llama.

    python examples/retrofit/user_model.py --config examples/retrofit/user_model.yaml [key=value ...]

A ``LlamaForCausalLM`` shaped by the config's ``model`` section (no memory) is trained by AdamW
(``method.dense_lr``, ``method.betas``, ``method.weight_decay``; ``distributed.grad_clip``) on the
``data.pretrain`` stream for ``train.steps`` steps under ``train``'s LR schedule, then saved with its
tokenizer to ``train.out_dir``. It stands in for a checkpoint from elsewhere (on a cluster: a local
Qwen2.5-0.5B), so it uses only smft_dist's config, data stream and LR schedule, not its model.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from smft_dist.config import ConfigError, ModelConfig, load_config
from smft_dist.data import DataError, build_stream, load_tokenizer
from smft_dist.train import lr_multiplier, step_batches


def llama_config(m: ModelConfig) -> LlamaConfig:
    """The HF Llama config of a memory-free :class:`ModelConfig`."""
    if m.memory.layers:
        raise ConfigError("model.memory.layers: the user's model is a plain Llama; memory comes with smft_dist.retrofit")
    return LlamaConfig(vocab_size=m.vocab_size, hidden_size=m.dim, intermediate_size=m.hidden_dim, num_hidden_layers=m.n_layers,
                       num_attention_heads=m.n_heads, num_key_value_heads=m.kv_heads, max_position_embeddings=m.max_seq_len,
                       rms_norm_eps=m.norm_eps, rope_theta=m.rope_theta, tie_word_embeddings=m.tie_embeddings,
                       initializer_range=m.init_std)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        tokenizer = load_tokenizer(cfg.data.tokenizer)
        stream = build_stream(cfg.data.pretrain, tokenizer, rank=0, world_size=1, seed=cfg.data.seed)
        torch.manual_seed(cfg.train.seed)
        model = LlamaForCausalLM(llama_config(cfg.model))
    except (ConfigError, DataError) as e:
        raise SystemExit(f"user_model: {e}") from None
    m = cfg.method
    opt = torch.optim.AdamW(model.parameters(), lr=m.dense_lr, betas=tuple(m.betas), weight_decay=m.weight_decay)
    t0 = time.perf_counter()
    for step, batch in zip(range(1, cfg.train.steps + 1), step_batches(stream, 1)):
        for group in opt.param_groups:
            group["lr"] = m.dense_lr * lr_multiplier(step - 1, cfg.train)
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.distributed.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.distributed.grad_clip)
        opt.step()
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            print(f"user_model: step {step} loss {loss.item():.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    model.save_pretrained(cfg.train.out_dir)
    tokenizer.save_pretrained(cfg.train.out_dir)
    print(f"user_model: LlamaForCausalLM, {model.num_parameters():,} parameters -> {cfg.train.out_dir}", flush=True)


if __name__ == "__main__":
    main()
