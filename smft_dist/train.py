"""The training loop: ``python -m smft_dist.train --config FILE [key=value ...]``.

Composes the pieces, one line each: process group -> model -> training method -> sharded tables +
DeepSpeed -> data stream -> resume -> steps (LR schedule, logging, eval, checkpoints) -> HF export.
A step is an optimizer step over ``distributed.grad_accum_steps`` stream batches; the schedule, the
intervals and ``train.steps`` count optimizer steps, so checkpoints fall between windows.
The same code runs one CPU process (gloo) or many GPUs (NCCL) under torchrun, the deepspeed
launcher or SLURM.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

from smft_dist.analysis.row_change import log_row_change
from smft_dist.config import ConfigError, JobConfig, TrainConfig, load_config
from smft_dist.data import DataError, build_stream, load_tokenizer
from smft_dist.distributed.checkpoint import CheckpointError, export_hf, latest_checkpoint, load_checkpoint, save_checkpoint
from smft_dist.distributed.env import LaunchError, init_distributed
from smft_dist.distributed.nonfinite import NonFiniteError, NonFiniteGuard
from smft_dist.distributed.parallelize import Parallel, parallelize, train_step, value_table_sources
from smft_dist.distributed.sharding import value_optimizer
from smft_dist.distributed.preemption import PreemptionHandler
from smft_dist.eval import run_eval
from smft_dist.metrics import MetricLogger
from smft_dist.model.saved import load_dense
from smft_dist.model.transformer import Transformer
from smft_dist.patching import PatchError
from smft_dist.patching.ops import write_run_patch
from smft_dist.provenance import log_hparams, write_provenance
from smft_dist.smft.background_stats import BackgroundStats
from smft_dist.smft.methods import apply_method
from smft_dist.smft.selection import step_seed
from smft_dist.smft.utilization import MemoryUsage, SelectionLog


def lr_multiplier(step: int, cfg: TrainConfig) -> float:
    """Warmup then constant | cosine | linear decay to ``min_lr_ratio``, as a factor on the base lrs."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.lr_schedule == "cosine" else 1 - progress
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay


def build_model(cfg: JobConfig) -> Transformer:
    """A fresh model (seeded, identical on every rank) or the one saved at ``train.init_from``, either
    way without value tables: each rank makes or reads its own shard of them in ``parallelize``.
    Seeds the global RNG either way (LoRA adapters draw from it)."""
    torch.manual_seed(cfg.train.seed)
    if cfg.train.init_from:
        path = Path(cfg.train.init_from)
        if not (path / "config.json").is_file():
            raise ConfigError(f"train.init_from: {path} is not a save_pretrained directory (no config.json)")
        model = load_dense(path)
        cfg.model = model.cfg
        cfg.validate_model_fit()
        return model
    return Transformer(cfg.model, build_value_tables=False)


def step_batches(stream, micro_batches: int) -> Iterator[dict[str, torch.Tensor]]:
    """Endless optimizer-step batches: ``micro_batches`` consecutive stream batches, rows
    concatenated (``train_step`` splits them again); epochs roll over, also inside a window. The
    stream's position after a yield is the end of that window."""
    window: list[dict[str, torch.Tensor]] = []
    while True:
        for batch in stream:
            window.append(batch)
            if len(window) == micro_batches:
                yield {k: torch.cat([b[k] for b in window]) for k in window[0]}
                window = []


def data_state(stream, world: int) -> list[dict]:
    """Every rank's stream position (they differ for streaming sources), gathered on all ranks."""
    states: list[dict] = [{} for _ in range(world)]
    dist.all_gather_object(states, stream.state_dict())
    return states


def restore_data_state(stream, states: list[dict], rank: int, world: int) -> None:
    if len(states) == world:
        stream.load_state_dict(states[rank])
    elif all(s == states[0] for s in states):
        stream.load_state_dict(states[0])
    else:
        raise CheckpointError(f"checkpoint: per-rank data positions of {len(states)} ranks cannot resume on {world} ranks")


def train(cfg: JobConfig) -> dict[str, float]:
    """Run ``cfg.train.steps`` steps (resuming from the latest checkpoint); returns the last metrics."""
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    background = BackgroundStats.load(cfg.method.background) if cfg.method.background else None
    env, device = init_distributed(cfg.distributed.backend)
    model = build_model(cfg)
    if len(tokenizer) > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size: {cfg.model.vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens")
    progress = {"step": 0}
    plan = apply_method(model, cfg.method, background, seed_fn=lambda: step_seed(cfg.train.seed, progress["step"]))
    write_patch = cfg.train.write_patch and cfg.method.name in ("smft", "memory_ft")
    sources = value_table_sources(model, cfg) if write_patch or cfg.train.row_change else None  # the starting rows
    par = parallelize(model, cfg, plan, device)
    usage = MemoryUsage(par.model.memory_layers())
    slot_log = SelectionLog(Path(cfg.train.out_dir) / "selected_slots.jsonl") if cfg.train.log_selected_slots and env.is_main else None
    stream_cfg = cfg.data.continual if cfg.train.stream == "continual" else cfg.data.pretrain
    stream = build_stream(stream_cfg, tokenizer, rank=env.rank, world_size=env.world_size, seed=cfg.data.seed,
                          cache_dir=cfg.data.cache_dir, num_proc=cfg.data.num_proc)
    if (ckpt := latest_checkpoint(cfg.checkpoint.dir)) is not None:
        manifest = load_checkpoint(par, ckpt, on_corrupt=cfg.checkpoint.on_corrupt)
        progress["step"] = manifest["step"]
        restore_data_state(stream, manifest["trainer"]["data"], env.rank, env.world_size)
    logger = MetricLogger(cfg.train.out_dir, env.is_main, resume_step=progress["step"])
    guard = NonFiniteGuard(par, cfg.train.on_nonfinite)
    if env.is_main:
        write_provenance(cfg, cfg.train.out_dir, env.world_size)
        print(f"train: {cfg.method.name} on {cfg.train.stream} stream, {env.world_size} rank(s) on {device.type}, "
              f"from step {progress['step']} to {cfg.train.steps}", flush=True)

    saved = progress["step"]

    def checkpoint() -> None:
        nonlocal saved
        save_checkpoint(par, cfg.checkpoint, progress["step"], cfg.model, {"data": data_state(stream, env.world_size)})
        saved = progress["step"]

    metrics: dict[str, float] = {}
    preemption = PreemptionHandler()
    _, value_lr = value_optimizer(cfg)
    batches, tokens, t0 = step_batches(stream, cfg.distributed.grad_accum_steps), 0, time.perf_counter()
    while progress["step"] < cfg.train.steps:
        batch = next(batches)
        mult = lr_multiplier(progress["step"], cfg.train)
        step = progress["step"] + 1
        logged = step % cfg.train.log_every == 0 or step == cfg.train.steps
        loss = guard.step(step, lambda: train_step(
            par, batch["input_ids"].to(device), batch["attention_mask"].to(device), batch["labels"].to(device),
            dense_lr=cfg.method.dense_lr * mult, value_lr=value_lr * mult), measure_rows=logged)
        progress["step"] = step
        if slot_log is not None and loss is not None:  # a skipped step trained no rows
            slot_log.write(step, plan.selectors)
        tokens += int(batch["attention_mask"].sum()) * env.world_size  # host tensor: no device sync
        if logged:
            elapsed = time.perf_counter() - t0
            metrics = {"loss": math.nan if loss is None else loss.item(), "lr_mult": mult, "tokens_per_s": tokens / elapsed,
                       **guard.metrics()}
            for name, sel in plan.selectors.items() if loss is not None else ():
                metrics[f"rows_trained/{name}"] = float(sel.selected.numel())
                metrics[f"slots_accessed/{name}"] = float(sel.slots.numel())
                if sel.shares is not None:  # method.row_share_cap: accessed slots ranked out this step, rows at the cap
                    metrics[f"ranked_out/{name}"] = float(sel.ranked_out)
                    metrics[f"rows_at_cap/{name}"] = float((sel.shares >= sel.share_cap).sum())
            logger.log(step, metrics)
            usage.log(logger, step)
            tokens, t0 = 0, time.perf_counter()
        if step == cfg.train.steps:  # the final eval and checkpoint follow the loop
            break
        if cfg.eval.tasks and cfg.eval.every and step % cfg.eval.every == 0:
            logger.log(step, evaluate(par, tokenizer, cfg, answers_dir(cfg, step)), prefix="eval")
        if cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0:
            checkpoint()
        if preemption.requested():  # a signal on any rank: all save this step and leave; a requeued job resumes
            if step > saved:
                checkpoint()
            if env.is_main:
                print(f"train: stop signal, checkpoint at step {step} saved; exiting for the requeued job to resume", flush=True)
            logger.close()
            return metrics
    if cfg.eval.tasks:
        final = evaluate(par, tokenizer, cfg, answers_dir(cfg, progress["step"]))
        logger.log(progress["step"], final, prefix="eval")
        metrics.update({f"eval/{k}": v for k, v in final.items()})
    if progress["step"] > saved:
        checkpoint()
    if cfg.train.row_change and par.values_train and par.tables:
        log_row_change(par, sources, cfg, env.is_main, getattr(stream, "num_records", None))
    if cfg.train.export_hf:
        export_hf(par, cfg.model, Path(cfg.train.out_dir) / "hf")
    if write_patch:
        write_run_patch(par, sources, cfg)
    if env.is_main:
        log_hparams(logger.writer, cfg, metrics)
    logger.close()
    return metrics


def answers_dir(cfg: JobConfig, step: int) -> Path:
    """Where the evaluation at ``step`` writes each qa / choice example's answer."""
    return Path(cfg.train.out_dir) / "answers" / f"step{step}"


def evaluate(par: Parallel, tokenizer, cfg: JobConfig, answers: Path | None = None) -> dict[str, float]:
    """The configured eval tasks on the model being trained, the examples split over the ranks
    (their answers written under ``answers``). Row-sharded lookups are collective, so then the
    ranks run equal-shaped batches in lockstep."""
    collective = dist.get_world_size() > 1 and any(t.placement == "row_wise" for t in par.tables.values())
    return run_eval(par.model, tokenizer, cfg.eval, cache_dir=cfg.data.cache_dir, lockstep=collective, answers_dir=answers)


# Bad input (config, data, checkpoint, launch environment): one line naming it, no traceback.
USER_ERRORS = (ConfigError, DataError, CheckpointError, LaunchError, NonFiniteError, PatchError, FileNotFoundError)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="YAML file in configs/")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. method.top_t=100")
    args = p.parse_args(argv)
    try:
        train(load_config(args.config, args.overrides))
    except USER_ERRORS as e:
        raise SystemExit(f"smft_dist.train: {e}") from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
