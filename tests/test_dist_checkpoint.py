"""Checkpoints: resume == never stopped, 2 ranks -> 1, clear errors, atomic `latest`, HF export."""

from __future__ import annotations

import json

import pytest
import torch

from smft_dist.config import CheckpointConfig
from smft_dist.distributed import checkpoint as ckpt
from smft_dist.distributed.parallelize import train_step
from tests.distributed_helpers import B, batch, build, dense_state, rank_slice, tiny_job
from tests.multiproc import run_ranks


def _job(method: str = "pretrain", **kw):
    job = tiny_job(method, **kw)
    if method != "full_ft":  # full_ft: AdamW rows (the config requires it)
        job.sparse_optim.type = "exact_rowwise_adagrad"  # optimizer state that matters on resume
    job.method.value_lr = 0.1
    return job


BLOCK_ROWS = 5  # checkpoint blocks of 5 rows: several per shard, one across the 32-row shards' boundary


def _small_blocks(job) -> None:
    """Save tables in BLOCK_ROWS-row blocks (this process), as a large table is saved."""
    ckpt.TABLE_CHUNK_BYTES = BLOCK_ROWS * 4 * job.model.value_dim


def _steps(par, rank, world, start, stop):
    losses = []
    for step in range(start, stop):
        ids, mask, labels = batch(world * B, step)
        losses.append(train_step(par, *(rank_slice(t, rank, world, world * B) for t in (ids, mask, labels))).item())
    return losses


def _snapshot(par) -> dict:
    state = dense_state(par.model)
    state.update({f"table.{n}": t.full_weight().clone() for n, t in par.tables.items()})
    return state


def _resume(rank: int, world: int, root: str, method: str, zero_stage: int) -> dict:
    job = _job(method, zero_stage=zero_stage)
    _small_blocks(job)
    cfg = CheckpointConfig(dir=root, keep_last=2)
    _, straight = build(job)
    _steps(straight, rank, world, 0, 2)
    ckpt.save_checkpoint(straight, cfg, step=2, model_cfg=job.model)
    tail = _steps(straight, rank, world, 2, 4)
    _, resumed = build(job)  # fresh model, fresh init
    manifest = ckpt.load_checkpoint(resumed, root)
    assert manifest["step"] == 2
    assert _steps(resumed, rank, world, 2, 4) == pytest.approx(tail, rel=1e-6)
    a, b = _snapshot(straight), _snapshot(resumed)
    for name in a:
        torch.testing.assert_close(b[name], a[name], msg=name)
    return a


@pytest.mark.multirank
@pytest.mark.parametrize("method, zero_stage", [("pretrain", 0), ("pretrain", 2), ("smft", 0), ("full_ft", 0)])
def test_resume_equals_uninterrupted(tmp_path, method, zero_stage):
    run_ranks(_resume, 2, str(tmp_path), method, zero_stage)
    assert (tmp_path / "latest").read_text() == "step_00000002"


def _save_two(rank: int, world: int, root: str) -> dict:
    job = _job()
    _small_blocks(job)
    _, par = build(job)
    _steps(par, rank, world, 0, 1)
    ckpt.save_checkpoint(par, CheckpointConfig(dir=root), step=1, model_cfg=job.model)
    ckpt.export_hf(par, job.model, f"{root}/hf")
    return _snapshot(par)


def _load_on(rank: int, world: int, root: str, placement: str, zero_stage: int = 0, then_step: bool = False) -> dict:
    job = _job(table_placement=placement, zero_stage=zero_stage)
    if placement == "data_parallel":  # replicated tables train with SGD only: load the rows alone
        job.sparse_optim.type = "exact_sgd"
    _, par = build(job)
    ckpt.load_checkpoint(par, root, load_optimizer=placement == "row_wise")
    if then_step:
        _steps(par, rank, world, 1, 2)
    return _snapshot(par)


def _load_variants(rank: int, world: int, root: str) -> dict:
    return {
        "row_wise": _load_on(rank, world, root, "row_wise"),
        "data_parallel": _load_on(rank, world, root, "data_parallel"),
        "zero0 + step": _load_on(rank, world, root, "row_wise", 0, True),
        "zero2 + step": _load_on(rank, world, root, "row_wise", 2, True),
    }


@pytest.mark.multirank
def test_reshard_two_ranks_to_one_and_back(tmp_path):
    saved = run_ranks(_save_two, 2, str(tmp_path))[0]
    manifest = ckpt.read_manifest(tmp_path / "step_00000001")
    assert manifest["tables"]["mem_values_1"]["chunk_rows"] == BLOCK_ROWS  # loads below read these blocks
    one = run_ranks(_load_variants, 1, str(tmp_path))[0]
    two = run_ranks(_load_on, 2, str(tmp_path), "row_wise")[0]
    for variant, loaded in (("1 rank", one["row_wise"]), ("1 rank replicated", one["data_parallel"]), ("2 ranks", two)):
        for name in saved:
            torch.testing.assert_close(loaded[name], saved[name], msg=f"{variant}: {name}")
    # ZeRO-2 partitions can't be re-split: the weights load and its fp32 master copy follows them
    for name in saved:
        torch.testing.assert_close(one["zero2 + step"][name], one["zero0 + step"][name], msg=name)
    # the consolidated export loads in one process, with Transformer's own keys
    from smft_dist.model.hf import SMFTForCausalLM
    from smft_dist.model.transformer import Transformer

    hf = SMFTForCausalLM.from_pretrained(tmp_path / "hf").model
    assert hf.state_dict().keys() == Transformer(tiny_job().model).state_dict().keys()
    assert torch.equal(hf.value_tables["mem_values_1"].weight, saved["table.mem_values_1"])
    assert all(torch.equal(p, saved[n]) for n, p in dense_state(hf).items())


def _save_then_crash(rank: int, world: int, root: str) -> None:
    job = _job()
    _, par = build(job)
    cfg = CheckpointConfig(dir=root)
    ckpt.save_checkpoint(par, cfg, step=1)
    _steps(par, rank, world, 0, 1)
    par.engine.save_checkpoint = lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt("killed mid-save"))
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(par, cfg, step=2)


@pytest.mark.multirank
def test_errors_and_interrupted_save(tmp_path):
    run_ranks(_save_then_crash, 1, str(tmp_path))
    assert (tmp_path / "latest").read_text() == "step_00000001", "latest moved to an incomplete save"
    assert (tmp_path / ".tmp-step_00000002").is_dir() and not (tmp_path / "step_00000002").exists()
    good = tmp_path / "step_00000001"
    assert ckpt.read_manifest(good)["step"] == 1
    with pytest.raises(ckpt.CheckpointError, match="manifest.json: missing"):
        ckpt.read_manifest(tmp_path / ".tmp-step_00000002")
    files = json.loads((good / "manifest.json").read_text())["files"]
    table_file = next(good / f for f in files if f.endswith(".distcp"))
    table_file.write_bytes(table_file.read_bytes()[:-7])
    with pytest.raises(ckpt.CheckpointError, match=f"{table_file.name}: truncated"):
        ckpt.read_manifest(good)
    dense_file = next(good / f for f in files if f.endswith("model_states.pt"))
    dense_file.unlink()
    with pytest.raises(ckpt.CheckpointError, match=f"{dense_file.name}: missing"):
        ckpt.read_manifest(good)


def _save_three(rank: int, world: int, root: str) -> None:
    _, par = build(_job())
    for step in (3, 4, 5):
        ckpt.save_checkpoint(par, CheckpointConfig(dir=root, keep_last=2), step)


@pytest.mark.multirank
def test_keep_last_and_stale_temporaries(tmp_path):
    (tmp_path / ".tmp-step_00000002").mkdir(parents=True)  # left by an interrupted save
    run_ranks(_save_three, 1, str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000004", "step_00000005"]
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "step_00000005"


def test_loaders_refuse_arbitrary_objects(tmp_path):
    import pickle

    (tmp_path / ".metadata").write_bytes(pickle.dumps(print))
    with pytest.raises(ckpt.CheckpointError, match="builtins.print, which is not allowed"):
        ckpt._SafeReader(tmp_path).read_metadata()
    torch.save({"module": print}, tmp_path / "mp_rank_00_model_states.pt")
    with pytest.raises(ckpt.CheckpointError, match="mp_rank_00_model_states.pt: cannot be loaded safely"):
        ckpt._SafeDeepSpeedCheckpointEngine().load(str(tmp_path / "mp_rank_00_model_states.pt"))
