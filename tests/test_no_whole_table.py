"""No rank holds a whole value table: ``train.init_from`` reads each rank's rows from the saved
file, training never gathers, checkpoints hold tables in bounded blocks of rows, and the HF export
streams rows to rank 0 in bounded chunks."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from smft_dist.config import CheckpointConfig, to_dict
from tests.distributed_helpers import B, batch, rank_slice, tiny_job
from tests.multiproc import run_ranks

CHUNK_ROWS = 5  # export chunk: 32 rows per rank go over in 7 chunks, the last one partial


def _forbid(*_args, **_kwargs):
    raise AssertionError("a whole value table was built or gathered")


def _init_train_export(rank: int, world: int, saved: str, out: str, ckpt: str) -> dict:
    from smft_dist.analysis.row_change import log_row_change
    from smft_dist.distributed import checkpoint
    from smft_dist.distributed.parallelize import parallelize, train_step, value_table_sources
    from smft_dist.distributed.sharding import ShardedValueTable
    from smft_dist.model.value_table import LocalValueTable, SavedRows
    from smft_dist.smft.methods import apply_method
    from smft_dist.train import build_model

    ShardedValueTable.full_weight = _forbid
    LocalValueTable.__init__ = _forbid
    reads, received = [], []
    rows = SavedRows.rows
    SavedRows.rows = lambda self, lo, hi: reads.append((lo, hi)) or rows(self, lo, hi)
    recv = dist.recv
    checkpoint.dist.recv = lambda t, *a, **k: received.append(t.shape[0]) or recv(t, *a, **k)

    job = tiny_job("pretrain")
    job.train.init_from = saved
    model = build_model(job)
    sources = value_table_sources(model, job)
    par = parallelize(model, job, apply_method(model, job.method, None), torch.device("cpu"))
    table = par.tables["mem_values_1"]
    loaded = table.local_weight().clone()
    ids, mask, labels = batch(world * B, 0)
    train_step(par, *(rank_slice(t, rank, world, world * B) for t in (ids, mask, labels)))
    checkpoint.TABLE_CHUNK_BYTES = CHUNK_ROWS * 4 * table.dim  # checkpoint blocks of CHUNK_ROWS rows too
    checkpoint.save_checkpoint(par, CheckpointConfig(dir=ckpt), 1, job.model)
    checkpoint.load_checkpoint(par, ckpt)
    checkpoint.export_hf(par, job.model, out, chunk_bytes=CHUNK_ROWS * 4 * table.dim)
    job.train.out_dir = out
    change = log_row_change(par, sources, job, rank == 0)  # the starting rows re-read per rank, one float per row gathered
    return {"reads": reads, "received": received, "change": change, "offset": table.row_offsets[rank], "loaded": loaded,
            "trained": table.local_weight().clone(), "dense": {n: p.detach().clone() for n, p in par.model.dense_parameters()}}


@pytest.mark.multirank
def test_init_from_training_checkpoints_and_export_never_hold_a_whole_table(tmp_path):
    from smft_dist.model.hf import SMFTConfig, SMFTForCausalLM

    job = tiny_job("pretrain")
    torch.manual_seed(5)
    SMFTForCausalLM(SMFTConfig(model=to_dict(job.model))).save_pretrained(tmp_path / "saved")
    saved = SMFTForCausalLM.from_pretrained(tmp_path / "saved").model
    ranks = run_ranks(_init_train_export, 2, str(tmp_path / "saved"), str(tmp_path / "out"), str(tmp_path / "ckpt"))

    rows = saved.value_tables["mem_values_1"].weight.detach()
    for r in ranks:  # each rank read exactly its own rows, and they are the saved ones
        lo, hi = r["offset"], r["offset"] + r["loaded"].shape[0]
        assert r["reads"] == [(lo, hi)] * 2 and hi - lo == rows.shape[0] // 2  # init_from, then row_change's start
        assert torch.equal(r["loaded"], rows[lo:hi])
    assert ranks[0]["received"] == [5] * 6 + [2] and ranks[1]["received"] == []

    # the checkpoint holds the table as blocks of at most CHUNK_ROWS rows, one file each (the writer
    # keeps its copies of a file's items until the file closes)
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(tmp_path / "ckpt" / "step_00000001" / "tables").read_metadata()
    blocks = [m.size for k, m in meta.state_dict_metadata.items() if k.startswith("mem_values_1.weight")]
    assert len(blocks) == -(-rows.shape[0] // CHUNK_ROWS) and max(size[0] for size in blocks) == CHUNK_ROWS
    paths = [info.relative_path for info in meta.storage_data.values()]
    assert len(set(paths)) == len(paths)

    exported = SMFTForCausalLM.from_pretrained(tmp_path / "out").model
    torch.testing.assert_close(exported.value_tables["mem_values_1"].weight, torch.cat([r["trained"] for r in ranks]), rtol=0, atol=0)
    assert not torch.equal(ranks[0]["trained"], ranks[0]["loaded"]), "the step did not train the rows"
    norms = torch.cat([(r["trained"] - r["loaded"]).norm(dim=1) for r in ranks])
    change = ranks[0]["change"]["tables"]["mem_values_1"]
    assert change["rows_changed"] == int((norms > 0).sum()) and change["norm"] == pytest.approx(float(norms.norm()), rel=1e-5)
    assert ranks[1]["change"] is None
    for name, p in exported.dense_parameters():
        assert torch.equal(p, ranks[0]["dense"][name]), name
