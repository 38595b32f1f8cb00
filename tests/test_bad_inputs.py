"""Everything tried as a new user or an operator would, each through ``smft_dist.train.main``: bad
configs and data, damaged checkpoints, training that goes non-finite. Each must end in one line
naming the problem (no traceback), or, where a policy says so, recover exactly.

Runs share two spawned jobs (1 and 2 gloo ranks) that call ``main`` once per case, so the list
below costs two process starts, not one per case.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import traceback
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from smft_dist.data.synthetic import WorldSize, generate
from smft_dist.distributed import checkpoint as ckpt
from tests.multiproc import run_ranks

POISON_SAVE, POISON_EXPORT = "<nan before saving step 2>", "<nan before the export>"  # see _run_mains

# name -> (overrides on top of _base, the one line main must end with)
CASES = {
    "seq_len_over_max_seq_len": (["data.pretrain.seq_len=128"], r"data\.pretrain\.seq_len: 128 exceeds model\.max_seq_len=64"),
    "seq_len_over_init_from_model": (["train.init_from={hf}", "train.stream=continual", "data.continual.seq_len=100",
                                      "model.max_seq_len=512"], r"data\.continual\.seq_len: 100 exceeds model\.max_seq_len=64"),
    "top_t_over_slots": (["method.name=smft", "method.ranking=tf", "method.top_t=100", "train.stream=continual"],
                         r"method\.top_t: 100 exceeds the 64 slots"),
    "df_for_fewer_slots": (["method.name=smft", "method.top_t=5", "method.background={df16}", "train.stream=continual"],
                           r"method\.background: df statistics for table 'mem_values_1' cover 16 slots .* 64 slots"),
    "adam_on_cpu": (["sparse_optim.type=adam"], r"sparse_optim\.type: FBGEMM has no adam kernel on cpu"),
    "empty_data_file": (["data.pretrain.source.path={empty}"], r"empty\.jsonl: has no records"),
    "non_utf8_data_file": (["data.pretrain.source.path={latin1}"],
                           r"latin1\.jsonl:3: not UTF-8 \(byte 0xe9 at column \d+\); re-encode the file as UTF-8$"),
    "on_corrupt_previous_keep_one": (["checkpoint.on_corrupt=previous", "checkpoint.keep_last=1"],
                                     r"checkpoint\.keep_last: on_corrupt=previous needs an older checkpoint"),
    "nan_loss_fails": (["method.dense_lr=1e30", "train.steps=3"], r"step 2: non-finite loss \((nan|inf)\)"),
    "nan_checkpoint_refused": (["train.steps=3", "checkpoint.interval=1", "train.export_hf=false", POISON_SAVE],
                               r"checkpoint of step 2: refused, non-finite values in value table mem_values_1; "
                               r"latest still points at step_00000001$"),
    "nan_export_refused": ([POISON_EXPORT], r"export to \S+/hf: refused, non-finite values in value table mem_values_1$"),
}

# runs that must succeed; their outputs are checked by the tests below
RUNS = {
    "nan_skip": ["method.dense_lr=1e30", "train.steps=3", "train.on_nonfinite=skip"],
    "nan_skip_reference": ["method.dense_lr=1e30", "train.steps=1"],
    "metrics_before_crash": ["train.steps=2", "checkpoint.interval=1", "train.export_hf=false"],
    "metrics_after_resume": ["train.steps=3"],  # same out_dir, resumed from step 1 (see _crash_after_step_2)
    "frozen_dense_checkpoint": ["method.name=memory_ft", "train.steps=1", "train.export_hf=false"],
}

CORRUPT_RUNS = {  # 2 ranks, a checkpoint at steps 1 and 2 whose step 2 has flipped bytes in a file
    "uninterrupted": ([], None),
    "fail": (["{flip:tables/.metadata}"], r"tables/\.metadata: corrupt \(crc32 .*step_00000001 is intact"),
    "previous": (["{flip:tables/__1_0.distcp}", "checkpoint.on_corrupt=previous"], None),
}


def _base(world: Path, out: Path) -> list[str]:
    return [
        "model.vocab_size=320", "model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=64",
        "model.memory.layers=[1]", "model.memory.n_keys=8", "model.memory.heads=2", "model.memory.topk=4",
        "model.memory.k_dim=16", f"data.tokenizer={world}/tokenizer",
        f"data.pretrain.source.path={world}/pretrain.jsonl", "data.pretrain.seq_len=32", "data.pretrain.batch_size=4",
        f"data.continual.source.path={world}/facts_new.jsonl", "data.continual.seq_len=24", "data.continual.batch_size=4",
        "method.name=pretrain", "method.dense_lr=1e-2", "method.value_lr=0.5", "distributed.grad_clip=0",
        "train.stream=pretrain", "train.steps=2", "train.log_every=1", f"train.out_dir={out}",
        f"checkpoint.dir={out}/ckpt", "checkpoint.keep_last=0",
    ]


def flip_bytes(path: Path, n: int = 8) -> None:
    """Invert ``n`` bytes in the middle of ``path`` (size unchanged); in a JSON file, change the
    digits from the middle on instead, so it still parses."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    if path.suffix == ".json":
        digits = [i for i in range(mid, len(data)) if chr(data[i]).isdigit()][:n]
        for i in digits:
            data[i] = ord("0") + (data[i] - ord("0") + 1) % 10
    else:
        for i in range(mid, min(mid + n, len(data))):
            data[i] ^= 0xFF
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------------------ spawned jobs
def _main_line(argv: list[str]) -> str:
    """What ``main`` ends with: "" (normal exit), its SystemExit line, or a traceback."""
    from smft_dist.train import main

    try:
        main(argv)
        return ""
    except SystemExit as e:
        return str(e)
    except BaseException:  # noqa: BLE001 - a traceback is what the tests must never see
        return "traceback: " + traceback.format_exc()


def _run_mains(rank: int, world: int, jobs: list[tuple[str, list[str]]], actions: dict) -> dict[str, str]:
    """``main`` once per (name, argv), in order, under one process group (``main`` would destroy it);
    ``actions[name]`` runs on rank 0 before that job (copying, flipping, poisoning)."""
    import torch.distributed as dist

    from smft_dist import train

    destroy, dist.destroy_process_group = dist.destroy_process_group, lambda *a, **k: None
    save, export = train.save_checkpoint, train.export_hf
    out = {}
    try:
        for name, argv in jobs:
            if name in actions and rank == 0:
                actions[name][0](*actions[name][1:])
            dist.barrier()
            if POISON_SAVE in argv:  # a NaN reaches the value rows after step 1 was saved
                train.save_checkpoint = _poisoned(save, lambda step: step == 2)
            if POISON_EXPORT in argv:
                train.export_hf = _poisoned(export, lambda *_: True)
            out[name] = _main_line([a for a in argv if a not in (POISON_SAVE, POISON_EXPORT)])
            train.save_checkpoint, train.export_hf = save, export
    finally:
        dist.destroy_process_group = destroy
    return out


def _poisoned(write, when):
    """``write(par, cfg, arg, ...)`` after a NaN was put into rank 0's rows of the first table, if ``when(arg)``."""
    import torch.distributed as dist

    def poisoned(par, cfg, arg, *args, **kwargs):
        if when(arg) and dist.get_rank() == 0:
            with torch.no_grad():
                next(iter(par.tables.values())).local_weight()[0, 0] = float("nan")
        return write(par, cfg, arg, *args, **kwargs)

    return poisoned


def _crash_after_step_2(out: str) -> None:
    """As if the run died after logging step 2 but before its checkpoint was complete."""
    shutil.rmtree(f"{out}/ckpt/step_00000002")
    Path(f"{out}/ckpt/latest").write_text("step_00000001")


def _damaged_copy(src: str, dst: str, rel: str | None) -> None:
    """``dst``/ckpt = ``src``/ckpt at step 2 (``latest`` -> step 2) with ``rel`` of step 2 damaged."""
    shutil.copytree(f"{src}/ckpt", f"{dst}/ckpt")
    shutil.rmtree(f"{dst}/ckpt/step_00000003")
    Path(f"{dst}/ckpt/latest").write_text("step_00000002")
    if rel:
        flip_bytes(Path(f"{dst}/ckpt/step_00000002/{rel}"))


# ---------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    generate(out, WorldSize(people=12, background_docs=60, heldout_docs=8), seed=0, vocab_size=300)
    return out


@pytest.fixture(scope="module")
def one_rank(world, tmp_path_factory):
    """Every CASE and RUN through main on one rank: name -> (out_dir, what main ended with)."""
    from smft_dist.config import load_config, to_dict
    from smft_dist.model.hf import SMFTConfig, SMFTForCausalLM
    from smft_dist.smft.background_stats import BackgroundStats

    tmp = tmp_path_factory.mktemp("one_rank")
    (tmp / "empty.jsonl").write_text("")
    lines = (world / "pretrain.jsonl").read_bytes().splitlines(keepends=True)[:5]
    lines[2] = lines[2].replace(b'"text": "', '"text": "caf\u00e9 '.encode("latin-1"), 1)  # a Latin-1 é
    (tmp / "latin1.jsonl").write_bytes(b"".join(lines))
    df16 = BackgroundStats.empty({"mem_values_1": 16})
    df16.add_batch({"mem_values_1": torch.ones(16)})
    df16.save(tmp / "df16.safetensors")
    model = load_config(None, _base(world, tmp))
    SMFTForCausalLM(SMFTConfig(model=to_dict(model.model))).save_pretrained(tmp / "hf64")
    (tmp / "empty.yaml").write_text("{}\n")
    fill = {"hf": tmp / "hf64", "df16": tmp / "df16.safetensors", "empty": tmp / "empty.jsonl", "latin1": tmp / "latin1.jsonl"}
    jobs, outs = [], {}
    for name, overrides in [*((n, o) for n, (o, _) in CASES.items()), *RUNS.items()]:
        out = tmp / ("metrics" if name.startswith("metrics_") else name)
        outs[name] = out
        jobs.append((name, ["--config", str(tmp / "empty.yaml"), *_base(world, out), *(o.format(**fill) for o in overrides)]))
    lines = run_ranks(_run_mains, 1, jobs, {"metrics_after_resume": (_crash_after_step_2, str(tmp / "metrics"))})[0]
    return {name: (outs[name], lines[name]) for name in lines}


@pytest.fixture(scope="module")
def two_ranks(world, tmp_path_factory):
    """CORRUPT_RUNS through main on two ranks: name -> (out_dir, what rank 0 and rank 1 ended with)."""
    tmp = tmp_path_factory.mktemp("two_ranks")
    (tmp / "empty.yaml").write_text("{}\n")
    jobs, actions, outs = [], {}, {}
    for name, (overrides, _) in CORRUPT_RUNS.items():
        out = outs[name] = tmp / name
        steps = ["train.steps=3", "checkpoint.interval=1"]
        flips = [o.removeprefix("{flip:").removesuffix("}") for o in overrides if o.startswith("{flip:")]
        if name != "uninterrupted":
            actions[name] = (_damaged_copy, str(tmp / "uninterrupted"), str(out), flips[0] if flips else None)
        rest = [o for o in overrides if not o.startswith("{flip:")]
        jobs.append((name, ["--config", str(tmp / "empty.yaml"), *_base(world, out), *steps, *rest]))
    lines = run_ranks(_run_mains, 2, jobs, actions)
    return {name: (outs[name], (lines[0][name], lines[1][name])) for name in outs}


# ------------------------------------------------------------------------------------- tests
@pytest.mark.multirank
@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_ends_in_one_line_naming_it(one_rank, name):
    _, line = one_rank[name]
    assert "\n" not in line and line.startswith("smft_dist.train: "), line
    assert re.search(CASES[name][1], line), line


def test_utf8_check_names_the_line_and_reads_across_chunks(tmp_path, monkeypatch):
    from smft_dist.data import sources
    from smft_dist.data.schemas import DataError

    monkeypatch.setattr(sources, "UTF8_CHUNK", 3)  # "é" (2 bytes) and "€" (3 bytes) straddle chunk ends
    good = tmp_path / "good.txt"
    good.write_text("aé€\nb€é\n", encoding="utf-8")
    sources.check_utf8(str(good))
    bad = tmp_path / "bad.txt"
    bad.write_bytes("aé\n€\n".encode() + b"x\xff\n")
    with pytest.raises(DataError, match=r"bad\.txt:3: not UTF-8 \(byte 0xff at column 2\)"):
        sources.check_utf8(str(bad))
    bad.write_bytes("aé\n".encode() + "€".encode()[:2])  # cut inside the last character
    with pytest.raises(DataError, match=r"bad\.txt:2: not UTF-8 \(byte 0xe2 at column 1\)"):
        sources.check_utf8(str(bad))


@pytest.mark.multirank
def test_nan_checkpoint_or_export_refused_keeps_what_was_written(one_rank):
    out, _ = one_rank["nan_checkpoint_refused"]
    assert sorted(p.name for p in (out / "ckpt").iterdir()) == ["latest", "step_00000001"]
    assert (out / "ckpt" / "latest").read_text() == "step_00000001"
    assert ckpt.read_manifest(out / "ckpt" / "step_00000001")["step"] == 1
    out, _ = one_rank["nan_export_refused"]
    assert not (out / "hf").exists()
    assert ckpt.read_manifest(ckpt.latest_checkpoint(out / "ckpt"))["step"] == 2


def _train_lines(out: Path) -> list[dict]:
    return [x for x in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if x["split"] == "train"]


@pytest.mark.multirank
def test_nonfinite_skip_leaves_the_model_as_before_the_step(one_rank):
    (out, line), (ref, ref_line) = one_rank["nan_skip"], one_rank["nan_skip_reference"]
    assert line == "" and ref_line == "", (line, ref_line)
    lines = _train_lines(out)
    assert [x["skipped_steps"] for x in lines] == [0, 1, 2]
    assert math.isnan(lines[1]["loss"]) and math.isfinite(lines[0]["loss"])
    norms = [x["row_update_norm/mem_values_1"] for x in lines]
    assert norms[0] > 0 and norms[1:] == [0, 0], "skipped steps moved value rows"
    a, b = load_file(str(out / "hf" / "model.safetensors")), load_file(str(ref / "hf" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:  # skipped steps applied nothing: the model is the one after step 1
        assert torch.equal(a[name], b[name]), name


@pytest.mark.multirank
def test_resume_drops_metrics_past_the_resumed_step(one_rank):
    out, line = one_rank["metrics_after_resume"]
    assert line == "", line
    assert [x["step"] for x in _train_lines(out)] == [1, 2, 3]


KINDS = {  # each kind of checkpoint file -> where it is in a step directory
    "table shard": "tables/__0_0.distcp",
    "DCP metadata": "tables/.metadata",
    "DeepSpeed file": "dense/dense/mp_rank_00_model_states.pt",
    "manifest": "manifest.json",
    "frozen dense safetensors": "dense/model.safetensors",
}


@pytest.mark.multirank
@pytest.mark.parametrize("kind", list(KINDS))
def test_damaged_checkpoint_file_is_refused_naming_it(one_rank, two_ranks, kind, tmp_path):
    run = "frozen_dense_checkpoint" if kind == "frozen dense safetensors" else None
    src = one_rank[run][0] / "ckpt" / "step_00000001" if run else two_ranks["uninterrupted"][0] / "ckpt" / "step_00000002"
    step = shutil.copytree(src, tmp_path / src.name)
    ckpt.read_manifest(step)  # intact before
    flip_bytes(step / KINDS[kind])
    with pytest.raises(ckpt.CheckpointError, match=re.escape(f"{step / KINDS[kind]}: corrupt")):
        ckpt.read_manifest(step)


@pytest.mark.multirank
def test_damaged_checkpoint_two_ranks_fail_or_resume_from_previous(two_ranks):
    _, (r0, r1) = two_ranks["fail"]
    assert r0 == r1 and "\n" not in r0 and re.search(CORRUPT_RUNS["fail"][1], r0), r0
    (straight, _), (resumed, lines) = two_ranks["uninterrupted"], two_ranks["previous"]
    assert lines == ("", ""), lines
    assert [x["step"] for x in _train_lines(resumed)] == [2, 3], "did not resume from step 1"
    a, b = load_file(str(straight / "hf" / "model.safetensors")), load_file(str(resumed / "hf" / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-6, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}")


def _nonfinite_grad(rank: int, world: int) -> str:
    from smft_dist.distributed.nonfinite import NonFiniteError, NonFiniteGuard
    from smft_dist.distributed.parallelize import train_step
    from tests.distributed_helpers import B, batch, build, rank_slice, tiny_job

    _, par = build(tiny_job("pretrain"))
    guard = NonFiniteGuard(par, "skip")
    if rank == 0:  # one rank's gradient goes NaN; the loss stays finite
        next(p for p in par.model.parameters() if p.requires_grad).register_hook(lambda g: g * float("nan"))
    ids, mask, labels = (rank_slice(t, rank, world, world * B) for t in batch(world * B, 0))
    try:
        guard.step(5, lambda: train_step(par, ids, mask, labels))
    except NonFiniteError as e:
        return str(e)
    return ""


@pytest.mark.multirank
def test_nonfinite_gradient_stops_even_under_skip():
    lines = run_ranks(_nonfinite_grad, 2)
    assert lines[0] == lines[1] and lines[0].startswith("step 5: non-finite dense gradient norm"), lines


def _guarded_rows(rank: int, world: int, method: str, sparse_optim: str) -> tuple:
    """Two logged steps under the guard: the norm it reports against the change of the gathered
    tables, the largest copy of table rows it made, and the error of a NaN row update."""
    from smft_dist.distributed.nonfinite import NonFiniteError, NonFiniteGuard
    from smft_dist.distributed.parallelize import train_step
    from tests.distributed_helpers import B, batch, build, rank_slice, tiny_job

    _, par = build(tiny_job(method, sparse_optim))
    guard = NonFiniteGuard(par, "fail")
    table = par.tables["mem_values_1"]
    copied, clone = [0], torch.Tensor.clone

    def counting_clone(t, *a, **k):  # the guard's full-shard copy is a clone of the shard
        copied[0] = max(copied[0], t.numel())
        return clone(t, *a, **k)

    norms = []
    for step in range(2):
        ids, mask, labels = (rank_slice(t, rank, world, world * B) for t in batch(world * B, step))
        full_before = table.full_weight()
        torch.Tensor.clone = counting_clone
        try:
            guard.step(step + 1, lambda: train_step(par, ids, mask, labels), measure_rows=True)
        finally:
            torch.Tensor.clone = clone
        norms.append((guard.row_update_norms["mem_values_1"], float((table.full_weight() - full_before).norm())))
    table.set_lr(float("nan"))
    ids, mask, labels = (rank_slice(t, rank, world, world * B) for t in batch(world * B, 2))
    try:
        guard.step(3, lambda: train_step(par, ids, mask, labels), measure_rows=True)
        error = ""
    except NonFiniteError as e:
        error = str(e)
    return norms, copied[0], table.local_weight().numel(), error


@pytest.mark.multirank
@pytest.mark.parametrize("method,sparse_optim,world", [("smft", "exact_sgd", 2), ("memory_ft", "exact_rowwise_adagrad", 1),
                                                        ("pretrain", "exact_rowwise_adagrad", 2)])
def test_row_guard_copies_only_the_rows_a_step_can_train(method, sparse_optim, world):
    """Deferred updates: the rows selected; updates inside the backward: the rows read (every rank's)."""
    for norms, copied, shard, error in run_ranks(_guarded_rows, world, method, sparse_optim):
        for measured, reference in norms:
            assert reference > 0
            torch.testing.assert_close(measured, reference, rtol=1e-5, atol=1e-6)
        assert copied < shard, f"{method}: the guard copied {copied} of the shard's {shard} values"
        assert error.startswith("step 3: non-finite value rows in table mem_values_1"), error
        assert error == "step 3: non-finite value rows in table mem_values_1; lower method.value_lr", error
