"""What a training step costs per method: step time, tokens/s and peak memory of smft, memory_ft,
full_ft and lora side by side on one model and stream, with ratios against full finetuning measured in
the same run, and each method's trainable parameters and optimizer state.

Each method runs in its own process (so each has its own peak memory), on the stage-2 config's model
(``train.init_from``) and continual stream, through the trainer's path (``parallelize``,
``train_step``): ``--warmup`` steps, then ``--steps`` timed steps over the same batches. Peak memory is
the process's peak resident set during the steps on the CPU (``VmHWM``, reset after building) and
``max_memory_allocated`` on a GPU; model MiB is what the process holds before the first step (model,
tables, optimizer set up), step MiB the peak above it. rows/step: value
rows the deferred row update trained (smft: its top-t; memory_ft: every accessed row); full_ft's AdamW
updates value rows inside the table's fused optimizer, counted in its optimizer state.

    python -m benchmarks.method_cost [--config examples/smollm2/smft.yaml --steps 8 key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

# Each method at the settings of its grid (benchmarks/grids/smollm2.yaml); the lr does not change the cost.
METHODS = {
    "smft": ["method.name=smft"],
    "memory_ft": ["method.name=memory_ft"],
    "full_ft": ["method.name=full_ft", "sparse_optim.type=adamw", "method.dense_lr=1e-5"],
    "lora": ["method.name=lora", "method.lora_rank=16", "method.lora_alpha=32", "method.dense_lr=3e-4"],
}
BASELINE = "full_ft"


def rss_bytes(field: str) -> int:
    """The process's resident set (``VmRSS``) or its peak since the last :func:`reset_peak_rss`
    (``VmHWM``), from Linux's /proc/self/status."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"benchmarks.method_cost: no {field} in /proc/self/status (needs Linux)")


def reset_peak_rss() -> None:
    """Start ``VmHWM`` again from the current resident set (Linux ``clear_refs`` 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure(config: str, overrides: list[str], warmup: int, steps: int) -> dict:
    """One method's figures (run in a child process: the peak memory is this process's)."""
    import torch

    from benchmarks.pareto import method_state_bytes
    from smft_dist.config import load_config
    from smft_dist.data import build_stream, load_tokenizer
    from smft_dist.distributed.env import init_distributed
    from smft_dist.distributed.parallelize import parallelize, train_step
    from smft_dist.smft.background_stats import BackgroundStats
    from smft_dist.smft.methods import apply_method
    from smft_dist.train import build_model

    cfg = load_config(config or None, overrides)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    stream = build_stream(cfg.data.continual, tokenizer, seed=cfg.data.seed, cache_dir=cfg.data.cache_dir)
    batches = [b for _, b in zip(range(warmup + steps), stream)]
    if len(batches) < warmup + steps:
        raise SystemExit(f"benchmarks.method_cost: the stream has {len(batches)} batches, fewer than --warmup + --steps")
    background = BackgroundStats.load(cfg.method.background) if cfg.method.background else None
    _, device = init_distributed(cfg.distributed.backend)
    model = build_model(cfg)
    plan = apply_method(model, cfg.method, background, seed_fn=lambda: cfg.train.seed)
    trainable = sum(p.numel() for p in plan.dense_params)
    state = method_state_bytes(cfg, model, plan)
    par = parallelize(model, cfg, plan, device)
    cuda = device.type == "cuda"
    model_bytes = torch.cuda.memory_allocated() if cuda else rss_bytes("VmRSS")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak_rss()
    times, rows, tokens = [], [], 0
    for i, batch in enumerate(batches):
        t0 = time.perf_counter()
        train_step(par, *(batch[k].to(device) for k in ("input_ids", "attention_mask", "labels")),
                   dense_lr=cfg.method.dense_lr, value_lr=cfg.method.value_lr)
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            tokens += int(batch["attention_mask"].sum())
            rows.append(sum(s.selected.numel() for s in plan.selectors.values()))
    return {"step_s": statistics.median(times), "tokens_per_s": tokens / sum(times), "model_bytes": model_bytes,
            "peak_bytes": torch.cuda.max_memory_allocated() if cuda else rss_bytes("VmHWM"),
            "trainable_dense": trainable, "optimizer_state_bytes": state,
            "rows_per_step": statistics.mean(rows) if plan.selectors else None,
            "threads": torch.get_num_threads(), "device": device.type}


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="examples/smollm2/smft.yaml", help="stage-2 config (model at train.init_from); empty: overrides only")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=8, help="timed steps per method")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="key=value overrides of the config, for every method")
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.config, [*args.overrides, *METHODS[args.child]], args.warmup, args.steps)))
        return
    results = {}
    for method in args.methods:
        cmd = [sys.executable, "-m", "benchmarks.method_cost", "--config", args.config, "--warmup", str(args.warmup),
               "--steps", str(args.steps), "--child", method, *args.overrides]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
        if proc.returncode:
            raise SystemExit(f"benchmarks.method_cost: {method} failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
        results[method] = json.loads(proc.stdout.strip().splitlines()[-1])
    first = next(iter(results.values()))
    print(f"{args.config}: {args.steps} timed steps per method after {args.warmup} warmup, one process each, "
          f"{first['threads']} thread(s) on {first['device']}")
    base = results.get(BASELINE)
    head = f"{'method':<11}{'s/step':>8}{'tokens/s':>10}{'model MiB':>11}{'peak MiB':>10}{'step MiB':>10}" \
           f"{'dense trained':>15}{'rows/step':>11}{'opt state MiB':>15}"
    print(head + (f"{'time vs ' + BASELINE:>18}{'step MiB vs ' + BASELINE:>22}" if base else ""))
    for method, r in results.items():
        step_bytes = r["peak_bytes"] - r["model_bytes"]
        line = (f"{method:<11}{r['step_s']:>8.3f}{r['tokens_per_s']:>10,.0f}{_mib(r['model_bytes']):>11}{_mib(r['peak_bytes']):>10}"
                f"{_mib(step_bytes):>10}{r['trainable_dense']:>15,}{'-' if r['rows_per_step'] is None else format(r['rows_per_step'], ',.0f'):>11}{_mib(r['optimizer_state_bytes']):>15}")
        if base:
            line += f"{r['step_s'] / base['step_s']:>18.2f}{step_bytes / max(base['peak_bytes'] - base['model_bytes'], 1):>22.2f}"
        print(line)


if __name__ == "__main__":
    main()
