"""Give a pretrained HF model memory layers: ``python -m smft_dist.retrofit --model PATH --layers 6,12 --out DIR``.

Reads a local Llama / Qwen2 / Mistral checkpoint and writes a ``save_pretrained`` directory (with
the checkpoint's tokenizer copied beside it) that ``train.init_from`` starts from. ``--placement
beside`` (default) adds each memory layer next to the block's FFN so that the result computes the
original function: ``--memory-init values_zero`` (default) zeroes the value rows and sizes W2 on
``--calibration-text`` (SMFT can start at once), ``w2_zero`` zeroes W2 (run ``memory_pretrain``
recovery before SMFT); ``--center-queries`` centers the untrained queries on the calibration text's
mean memory input (reads spread over the table). ``replace`` swaps the FFN out. Memory shape:
``key=value`` overrides of ``model.memory`` fields, e.g. ``n_keys=512 heads=4 topk=32 k_dim=128``.
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoTokenizer

from smft_dist.config import ConfigError, MemoryConfig, apply_overrides, from_dict
from smft_dist.model.hf_retrofit import MEMORY_INITS, retrofit


def calibration_tokens(tokenizer, path: str, rows: int = 16, seq_len: int = 64) -> torch.Tensor:
    """Up to ``rows`` x ``seq_len`` consecutive tokens of the text file ``path``."""
    try:
        text = open(path, encoding="utf-8").read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--calibration-text: cannot read {path} ({e})") from None
    ids = tokenizer(text[: rows * seq_len * 16], add_special_tokens=False)["input_ids"][: rows * seq_len]
    if len(ids) < seq_len:
        raise ConfigError(f"--calibration-text: {path} has {len(ids)} tokens, needs at least {seq_len}")
    return torch.tensor(ids[: len(ids) // seq_len * seq_len]).view(-1, seq_len)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="local HF checkpoint directory")
    p.add_argument("--layers", required=True, help="comma-separated block indices, e.g. 6,12,18")
    p.add_argument("--out", required=True, help="output directory (save_pretrained + tokenizer)")
    p.add_argument("--placement", default="beside", choices=("beside", "replace"))
    p.add_argument("--memory-init", default=None, choices=MEMORY_INITS,
                   help="beside placement: values_zero (default; SMFT can start at once) or w2_zero (needs recovery)")
    p.add_argument("--calibration-text", default=None, help="text file that sizes W2 under values_zero (default: random tokens)")
    p.add_argument("--center-queries", action="store_true",
                   help="beside placement: query bias = -W_q mean(x) on the calibration text (reads less shared between prompts)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: --model)")
    p.add_argument("--seed", type=int, default=0, help="seed of the memory layers' initial values")
    p.add_argument("memory", nargs="*", help="model.memory overrides, e.g. n_keys=512 topk=32")
    args = p.parse_args(argv)
    try:
        try:
            layers = [int(x) for x in args.layers.split(",") if x.strip()]
        except ValueError:
            raise ConfigError(f"--layers: {args.layers!r} is not a comma-separated list of block indices") from None
        memory = from_dict(MemoryConfig, apply_overrides({"layers": layers, "placement": args.placement}, args.memory), prefix="model.memory")
        try:
            tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
        except (OSError, ValueError) as e:
            raise ConfigError(f"--tokenizer: cannot load a tokenizer from {args.tokenizer or args.model} ({str(e).splitlines()[0]})") from None
        if args.placement == "replace" and (args.memory_init or args.calibration_text or args.center_queries):
            raise ConfigError("--memory-init / --calibration-text / --center-queries: only for --placement beside "
                              "(replace starts at the reference init)")
        init = args.memory_init or "values_zero"
        calibration = calibration_tokens(tokenizer, args.calibration_text) if args.calibration_text else None
        torch.manual_seed(args.seed)
        model = retrofit(args.model, memory, init, calibration, center_queries=args.center_queries)
    except (ConfigError, OSError, ValueError) as e:  # ValueError: transformers does not know the model_type
        raise SystemExit(f"smft_dist.retrofit: {str(e).strip().splitlines()[0]}") from None
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    cfg = model.config.to_model_config()
    centered = ", queries centered" if args.center_queries else ""
    print(f"retrofit: {args.model} -> {args.out}: memory {memory.placement} the FFN of layers {memory.layers}"
          f"{f' ({init}{centered})' if memory.placement == 'beside' else ''}, "
          f"{memory.num_slots} slots x {cfg.value_dim} per table", flush=True)


if __name__ == "__main__":
    main()
