"""One-GPU check of the paths the CPU test suite cannot run; one line per check, exit 1 on any FAIL.

    bash launcher/gpu_check.sh [--dry-run]      # from the repo root, with the machine's python3

Each line is ``PASS``, ``FAIL`` or ``SKIP`` (with the reason: a package that does not import, a
kernel this device lacks) followed by the check's figures. It detects what it has: torch and CUDA,
and whether ``fbgemm_gpu``, ``torchrec``, ``deepspeed``, ``datasets`` and ``transformers`` import
(carried wheels on ``PYTHONPATH`` count). Checks, in order: the memory layer with a local bf16
value table (forward, backward, error against fp32, tokens/s, value-read GB/s against the measured
copy bandwidth); the evaluation collectives on a process group of one (NCCL on CUDA), their tensors
on the model's device; a Hugging Face save/load round trip; the dense model under DeepSpeed ZeRO 1
and 2; the TorchRec value tables under SMFT (SGD and Adagrad: only the top-t rows may move; the Adam
ones must be refused) and under pretraining (SGD, the Adam ones) (only accessed rows may move); checkpoint save/load and HF export of a row-sharded model. ``--dry-run`` runs the same
checks on the CPU with tiny shapes (gloo, fp32 dense); CUDA-only kernels are reported as SKIP.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from benchmarks.common import best_time
from benchmarks.memory_layer import measure
from smft_dist.config import JobConfig, MemoryConfig, MethodConfig, ModelConfig

PACKAGES = ("fbgemm_gpu", "torchrec", "deepspeed", "datasets", "transformers")


class Skip(Exception):
    """The check cannot run here; the message says why."""


@dataclass
class Ctx:
    device: torch.device
    dry_run: bool
    tmp: Path
    missing: dict[str, str]  # package -> why it does not import

    def need(self, *packages: str) -> None:
        for name in packages:
            if name in self.missing:
                raise Skip(f"{name} does not import ({self.missing[name]})")

    def need_cuda(self, what: str) -> None:
        if self.device.type != "cuda":
            raise Skip(f"{what} runs on CUDA only")


def _import_problems() -> dict[str, str]:
    missing = {}
    for name in PACKAGES:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - an ABI mismatch raises OSError/RuntimeError, not only ImportError
            missing[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}" if str(e) else type(e).__name__
    return missing


def _rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp(min=1e-30)).item()


def _tiny_job(method: str, **overrides) -> JobConfig:
    model = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, max_seq_len=16,
                        memory=MemoryConfig(layers=[1], n_keys=8, heads=2, topk=4, k_dim=8))
    job = JobConfig(model=model, method=MethodConfig(name=method, dense_lr=1e-2, value_lr=0.5, top_t=6))
    for key, value in overrides.items():
        section, field = key.split("__")
        setattr(getattr(job, section), field, value)
    job.validate()
    return job


def _batch(n: int = 4, seq: int = 16, vocab: int = 64, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[::2, -3:] = 0
    return ids, mask, ids.masked_fill(mask == 0, -100)


# -------------------------------------------------------------------------------------- checks
def check_memory_layer(ctx: Ctx) -> str:
    from smft_dist.model import LocalValueTable, MemoryLayer

    shapes = (dict(dim=32, n_keys=8, heads=2, topk=4, k_dim=16, tokens=64, repeats=1, copy_bytes=2**20) if ctx.dry_run
              else dict(dim=1024, n_keys=512, heads=4, topk=32, k_dim=256, tokens=8192, repeats=10, copy_bytes=2**30))
    cfg = MemoryConfig(layers=[0], n_keys=shapes["n_keys"], heads=shapes["heads"], topk=shapes["topk"], k_dim=shapes["k_dim"])
    torch.manual_seed(0)
    layer = MemoryLayer(shapes["dim"], cfg, "mem_values").to(ctx.device)
    layer.reset_parameters()
    table = LocalValueTable(cfg.num_slots, shapes["dim"], device=ctx.device)
    layer.bind_table(table)
    layer.to(torch.bfloat16)
    table.to(torch.bfloat16)
    x = torch.randn(2, 64, shapes["dim"], device=ctx.device).bfloat16()
    out = layer(x)
    out.float().pow(2).sum().backward()
    with torch.no_grad():  # bf16 retrieval picks other slots at near-ties: compare the bag at the same picks
        idx, scores = layer.retrieve(x.flatten(0, 1))
        reference = copy.deepcopy(table).float()(idx, scores.float())
        err = _rel_err(table(idx, scores), reference)
    if not torch.isfinite(out).all() or not err < 1e-2:
        raise AssertionError(f"bf16 value bag vs fp32 arithmetic: relative error {err:.3g} (want < 1e-2)")
    for name, p in [*layer.named_parameters(), ("values", table.weight)]:
        if p.grad is None or not torch.isfinite(p.grad).all() or not p.grad.abs().sum() > 0:
            raise AssertionError(f"no finite nonzero gradient reached {name}")
    m = measure(**shapes, device=str(ctx.device), dtype=torch.bfloat16)
    return (f"bf16 bag err {err:.1e}; {m['slots']} slots x {shapes['dim']}; fwd+bwd {m['memory_tokens_s']:,.0f} tok/s "
            f"(SwiGLU {m['ffn_tokens_s']:,.0f}); value reads {m['value_read_bw'] / 1e9:.1f} GB/s = "
            f"{m['value_read_bw'] / m['copy_bw']:.2f} x copy {m['copy_bw'] / 1e9:.0f} GB/s")


def check_eval_collectives(ctx: Ctx) -> str:
    ctx.need("datasets", "transformers")
    import datasets

    from smft_dist.eval import runner
    from smft_dist.model import Transformer, lm_loss

    torch.manual_seed(0)
    model = Transformer(_tiny_job("pretrain").model).to(ctx.device).eval()
    ids, mask, labels = _batch()
    rows = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": mask.tolist(), "labels": labels.tolist()})
    seen: list[torch.device] = []
    all_reduce = dist.all_reduce

    def recording(t, *args, **kwargs):
        seen.append(t.device)
        return all_reduce(t, *args, **kwargs)

    runner.dist.all_reduce = recording
    try:
        nll = runner.evaluate_nll(model, rows, batch_size=3)["nll"]
        flags = runner._all_ranks_true(True, ctx.device), runner._all_ranks_true(False, ctx.device)
    finally:
        runner.dist.all_reduce = all_reduce
    with torch.no_grad():
        ref = lm_loss(model(ids.to(ctx.device), mask.to(ctx.device)), labels.to(ctx.device)).item()
    if not seen or set(seen) != {ctx.device}:
        raise AssertionError(f"collective tensors on {sorted(map(str, set(seen)))}, model on {ctx.device}")
    if flags != (True, False) or abs(nll - ref) > 1e-4 * abs(ref):
        raise AssertionError(f"nll {nll} vs direct {ref}; flags {flags}")
    return f"{dist.get_backend()} group of {dist.get_world_size()}: {len(seen)} all-reduces on {ctx.device}; nll {nll:.4f}"


def check_hf_roundtrip(ctx: Ctx) -> str:
    ctx.need("transformers")
    from transformers import AutoModelForCausalLM

    from smft_dist.config import to_dict
    from smft_dist.model import SMFTConfig, SMFTForCausalLM

    dtype = torch.float32 if ctx.dry_run else torch.bfloat16
    torch.manual_seed(0)
    model = SMFTForCausalLM(SMFTConfig(model=to_dict(_tiny_job("pretrain").model))).to(ctx.device, dtype).eval()
    model.save_pretrained(ctx.tmp / "hf_roundtrip")
    loaded = AutoModelForCausalLM.from_pretrained(ctx.tmp / "hf_roundtrip").to(ctx.device, dtype).eval()
    ids, mask, _ = (t.to(ctx.device) for t in _batch())
    with torch.no_grad():
        same = torch.equal(model(ids, attention_mask=mask).logits, loaded(ids, attention_mask=mask).logits)
    if not same:
        raise AssertionError("logits differ after save_pretrained / from_pretrained")
    return f"{dtype} logits bit-identical after save/load"


def _dense_run(ctx: Ctx, stage: int, steps: int = 4) -> tuple[list[float], dict[str, torch.Tensor], float]:
    from smft_dist.distributed.dense import build_dense_engine
    from smft_dist.model import Transformer, lm_loss

    job = _tiny_job("pretrain", distributed__zero_stage=stage)
    job.model.memory.layers = []
    torch.manual_seed(0)
    model = Transformer(job.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine = build_dense_engine(model, optimizer, job.distributed, ctx.device)
    ids, mask, labels = (t.to(ctx.device) for t in _batch())
    losses = []

    def step() -> None:
        loss = lm_loss(engine(ids, mask), labels)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())

    seconds = best_time(step, repeats=steps - 1, warmup=1)
    return losses, {n: p.detach().float().cpu() for n, p in engine.module.named_parameters()}, ids.numel() / seconds


def check_deepspeed(ctx: Ctx) -> str:
    ctx.need("deepspeed")
    runs = {stage: _dense_run(ctx, stage) for stage in (1, 2)}
    for stage, (losses, _, _) in runs.items():
        if not all(map(lambda v: v == v and abs(v) < 1e4, losses)) or not losses[-1] < losses[0]:
            raise AssertionError(f"ZeRO {stage}: losses {losses} (repeated batch: want finite and falling)")
    err = max(_rel_err(runs[2][1][n], p) for n, p in runs[1][1].items())
    if not err < 2e-2:
        raise AssertionError(f"ZeRO 2 parameters differ from ZeRO 1 by {err:.3g}")
    return ("; ".join(f"ZeRO {s}: loss {r[0][0]:.3f} -> {r[0][-1]:.3f}, {r[2]:,.0f} tok/s" for s, r in runs.items())
            + f"; ZeRO 2 vs 1 params {err:.1e}")


def _parallel(ctx: Ctx, job: JobConfig):
    from smft_dist.distributed.parallelize import parallelize
    from smft_dist.model import Transformer
    from smft_dist.smft.background_stats import BackgroundStats
    from smft_dist.smft.methods import apply_method

    torch.manual_seed(0)
    model = Transformer(job.model)
    bg = None
    if job.method.name == "smft":
        bg = BackgroundStats.empty({"mem_values_1": job.model.memory.num_slots})
        bg.add_batch({"mem_values_1": (torch.arange(job.model.memory.num_slots) % 2 == 0).long()})
    return parallelize(model, job, apply_method(model, job.method, bg), ctx.device)


def check_sparse_optimizer(ctx: Ctx, method: str, optimizer: str) -> str:
    """One step of ``method`` with the FBGEMM row optimizer; rows outside the top-t (smft) or outside
    the batch's accesses (pretrain) stay bit-identical."""
    ctx.need("fbgemm_gpu", "torchrec", "deepspeed")
    if optimizer in ("adam", "partial_rowwise_adam"):
        ctx.need_cuda(f"FBGEMM's {optimizer}")
    from smft_dist.config import ConfigError
    from smft_dist.distributed.parallelize import train_step

    refused = method == "smft" and optimizer in ("adam", "partial_rowwise_adam")  # inexact, so refused by design
    try:
        par = _parallel(ctx, _tiny_job(method, sparse_optim__type=optimizer))
    except ConfigError as e:
        if refused:
            return f"refused as designed: {e}"
        raise AssertionError(f"refused: {e}") from None
    if refused:
        raise AssertionError(f"sparse_optim.type={optimizer} under smft was accepted, but its deferred update is not exact")
    table = par.tables["mem_values_1"]
    before = table.full_weight().clone()
    ids, mask, labels = (t.to(ctx.device) for t in _batch())
    loss = train_step(par, ids, mask, labels)
    layer = par.model.memory_layers()[0]
    if method == "smft":
        allowed = torch.zeros(table.num_rows, dtype=torch.bool, device=before.device)
        allowed[par.row_selectors["mem_values_1"].selected.to(before.device)] = True
        what = "top-t"
    else:
        allowed = torch.zeros(table.num_rows, dtype=torch.bool, device=before.device)
        allowed[layer.last_access.indices[layer.last_access.valid].flatten().to(before.device)] = True
        what = "accessed rows"
    moved = (table.full_weight() != before).any(1)
    if not moved.any() or (moved & ~allowed).any():
        raise AssertionError(f"{int(moved.sum())} rows moved, {int((moved & ~allowed).sum())} outside the {what}")
    weight = table.local_weight()
    return f"{weight.dtype} rows on {weight.device}; loss {loss:.3f}; {int(moved.sum())} rows moved, all in the {what}"


def check_checkpoint(ctx: Ctx) -> str:
    ctx.need("fbgemm_gpu", "torchrec", "deepspeed", "transformers")
    from transformers import AutoModelForCausalLM

    from smft_dist.distributed import checkpoint
    from smft_dist.distributed.parallelize import train_step

    job = _tiny_job("pretrain", distributed__zero_stage=2)
    job.checkpoint.dir = str(ctx.tmp / "ckpt")
    par = _parallel(ctx, job)
    batch = [t.to(ctx.device) for t in _batch()]
    train_step(par, *batch)
    checkpoint.save_checkpoint(par, job.checkpoint, 1, job.model)
    saved_rows = par.tables["mem_values_1"].full_weight().clone()
    saved_dense = {n: p.detach().clone() for n, p in par.model.named_parameters()}
    train_step(par, *batch)
    checkpoint.load_checkpoint(par, job.checkpoint.dir)
    if not torch.equal(par.tables["mem_values_1"].full_weight(), saved_rows):
        raise AssertionError("value rows differ after load_checkpoint")
    for n, p in par.model.named_parameters():
        if not torch.equal(p.detach(), saved_dense[n]):
            raise AssertionError(f"dense parameter {n} differs after load_checkpoint")
    out = checkpoint.export_hf(par, job.model, ctx.tmp / "export")
    hf = AutoModelForCausalLM.from_pretrained(out)
    if not torch.equal(hf.model.value_tables["mem_values_1"].weight, saved_rows.float().cpu()):
        raise AssertionError("exported value table differs from the sharded one")
    return f"ZeRO 2 + {par.tables['mem_values_1'].placement} table: save, load (bit-identical), HF export"


CHECKS: list[tuple[str, Callable[[Ctx], str]]] = [
    ("memory_layer_bf16", check_memory_layer),
    ("eval_collectives", check_eval_collectives),
    ("hf_roundtrip", check_hf_roundtrip),
    ("deepspeed_zero_1_2", check_deepspeed),
    *[(f"{m}_rows[{o}]", lambda ctx, m=m, o=o: check_sparse_optimizer(ctx, m, o))
      for m, o in [("smft", "exact_sgd"), ("smft", "exact_rowwise_adagrad"), ("smft", "adam"),
                   ("smft", "partial_rowwise_adam"), ("pretrain", "exact_sgd"), ("pretrain", "adam"),
                   ("pretrain", "partial_rowwise_adam")]],
    ("checkpoint_and_export", check_checkpoint),
]


def run(dry_run: bool) -> int:
    """Run every check; print one line each; return the number of FAILs."""
    from smft_dist.distributed.env import init_distributed

    if not dry_run and not torch.cuda.is_available():
        print(f"FAIL  {'cuda':<32} torch.cuda.is_available() is False (use --dry-run on a CPU machine)")
        return 1
    missing = _import_problems()
    _, device = init_distributed("gloo" if dry_run else "nccl")
    device = torch.device("cpu") if dry_run else device
    cuda = f"CUDA {torch.version.cuda}, {torch.cuda.get_device_name(device)}" if device.type == "cuda" else "cpu"
    print(f"INFO  {'stack':<32} torch {torch.__version__} ({cuda}); "
          + ", ".join(f"{p} {'missing' if p in missing else 'ok'}" for p in PACKAGES))
    for name, why in missing.items():
        print(f"INFO  {name:<32} {why}")
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        ctx = Ctx(device, dry_run, Path(tmp), missing)
        for name, fn in CHECKS:
            t0 = time.perf_counter()
            try:
                line = f"PASS  {name:<32} {fn(ctx)}"
            except Skip as e:
                line = f"SKIP  {name:<32} ({e})"
            except Exception as e:  # noqa: BLE001 - every failure is one line; the run goes on
                failures += 1
                line = f"FAIL  {name:<32} {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            print(f"{line} [{time.perf_counter() - t0:.1f} s]", flush=True)
    dist.destroy_process_group()
    print(f"gpu_check: {failures} FAIL(s)" if failures else "gpu_check: no FAIL")
    return 1 if failures else 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, gloo: CUDA-only checks SKIP")
    sys.exit(run(p.parse_args().dry_run))


if __name__ == "__main__":
    main()
