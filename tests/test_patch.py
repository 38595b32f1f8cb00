"""Knowledge patches: apply / revert bit for bit (1 and 2 ranks, written on one world size and applied
on another), a foreign base refused, disjoint merge == training both streams in sequence, overlap
policies and forget on hand-made patches, the CLI's one-line errors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from smft_dist.config import MemoryConfig
from smft_dist.distributed.checkpoint import export_hf
from smft_dist.distributed.parallelize import parallelize, train_step, value_table_sources
from smft_dist.model.transformer import Transformer
from smft_dist.patching import Patch, PatchError, apply, apply_to_model, diff, forget, merge, overlaps
from smft_dist.patching.format import table_hash, write_patch
from smft_dist.patching.ops import diff_tables, model_dense_hash
from smft_dist.smft.methods import apply_method
from tests.distributed_helpers import B, background, batch, rank_slice, tiny_job
from tests.multiproc import run_ranks
from tests.test_train import world  # noqa: F401  (fixture)


def _tensors(path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def _assert_same_model(a, b) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k].view(torch.int32), tb[k].view(torch.int32)), k


def _build(job):
    torch.manual_seed(0)
    model = Transformer(job.model)
    plan = apply_method(model, job.method, background() if job.method.name == "smft" else None)
    sources = value_table_sources(model, job)
    return parallelize(model, job, plan, torch.device("cpu")), sources


def _manifest(par) -> dict:
    return {"method": "smft", "config": None, "dense_hash": model_dense_hash(par.model), "history": []}


def _train_and_patch(rank: int, world: int, root: str, steps: int = 3) -> None:
    """Export the base, train smft ``steps`` steps, export the result and write its patch."""
    job = tiny_job("smft")
    par, sources = _build(job)
    export_hf(par, job.model, f"{root}/base")
    for step in range(steps):
        ids, mask, labels = batch(world * B, step)
        train_step(par, *(rank_slice(t, rank, world, world * B) for t in (ids, mask, labels)))
    export_hf(par, job.model, f"{root}/trained")
    diff_tables(par, sources, f"{root}/patch", _manifest(par))


def _apply_on_ranks(rank: int, world: int, root: str, out: str) -> None:
    """Load the base on ``world`` ranks, apply the patch to the sharded tables, export."""
    from smft_dist.patching import apply_to_tables

    job = tiny_job("smft")
    par, _ = _build(job)
    apply_to_tables(par, f"{root}/patch")
    with pytest.raises(PatchError, match="not those of the base"):  # applied twice: refused on every rank
        apply_to_tables(par, f"{root}/patch")
    export_hf(par, job.model, out)


@pytest.fixture(scope="module")
def one_rank_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("one_rank")
    run_ranks(_train_and_patch, 1, str(root))
    return root


def test_apply_and_revert_are_bit_exact_on_one_rank(one_rank_run, tmp_path):
    run = one_rank_run
    patch = Patch(run / "patch")
    changed = patch.tables["mem_values_1"]["rows_changed"]
    assert 0 < changed < 64, "smft changed some rows, not all"
    apply(run / "base", patch, tmp_path / "applied")
    _assert_same_model(tmp_path / "applied", run / "trained")
    apply(tmp_path / "applied", patch, tmp_path / "reverted", reverse=True)
    _assert_same_model(tmp_path / "reverted", run / "base")
    # the offline diff of the two exports is the same patch
    diff(run / "base", run / "trained", tmp_path / "diffed")
    again = Patch(tmp_path / "diffed")
    for a, b in zip(again.entries("mem_values_1"), patch.entries("mem_values_1")):
        assert torch.equal(a, b)
    assert again.tables["mem_values_1"]["base_hash"] == patch.tables["mem_values_1"]["base_hash"]
    # in memory, on a from_pretrained model: one call
    from transformers import AutoModelForCausalLM

    import smft_dist.model  # noqa: F401

    model = apply_to_model(AutoModelForCausalLM.from_pretrained(run / "base"), patch)
    trained = _tensors(run / "trained")
    for k, v in model.state_dict().items():
        if k in trained:
            assert torch.equal(v, trained[k]), k


def test_a_foreign_base_is_refused(one_rank_run, tmp_path):
    run = one_rank_run
    with pytest.raises(PatchError, match="is not the base of patch"):
        apply(run / "trained", run / "patch", tmp_path / "twice")
    with pytest.raises(PatchError, match="does not give its base back|not those of the patched model"):
        apply(run / "base", run / "patch", tmp_path / "unpatched", reverse=True)
    assert not (tmp_path / "twice").exists() and not (tmp_path / "unpatched").exists()
    with pytest.raises(PatchError, match="exists"):
        apply(run / "base", run / "patch", run / "trained")


def test_cli_round_trip_and_one_line_errors(one_rank_run, tmp_path, capsys):
    from smft_dist.patch import main

    run = one_rank_run
    main(["apply", "--model", str(run / "base"), "--patch", str(run / "patch"), "--out", str(tmp_path / "m")])
    _assert_same_model(tmp_path / "m", run / "trained")
    main(["show", str(run / "patch"), "--png", str(tmp_path / "p.png")])
    assert '"rows_changed"' in capsys.readouterr().out and (tmp_path / "p.png").stat().st_size > 0
    for argv, why in ((["apply", "--model", str(run / "trained"), "--patch", str(run / "patch"), "--out", str(tmp_path / "x")], "not the base"),
                      (["merge", str(run / "patch"), str(run / "patch"), "--out", str(tmp_path / "y")], "more than one patch"),
                      (["forget", "--patch", str(run / "patch"), "--fact", "0", "--out", str(tmp_path / "z")], "log_selected_slots"),
                      (["show", str(tmp_path)], "not a knowledge patch")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert str(e.value).startswith("smft_dist.patch: ") and why in str(e.value) and "\n" not in str(e.value)


@pytest.mark.slow
@pytest.mark.multirank
def test_patch_written_on_two_ranks_applies_on_one_and_back(tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    run_ranks(_train_and_patch, 2, str(two))
    assert len(Patch(two / "patch").files) == 2, "each rank wrote its own rows"
    apply(two / "base", two / "patch", two / "applied")  # one process
    _assert_same_model(two / "applied", two / "trained")
    run_ranks(_train_and_patch, 1, str(one))
    run_ranks(_apply_on_ranks, 2, str(one), str(one / "applied_on_2"))
    _assert_same_model(one / "applied_on_2", one / "trained")


# ---------------------------------------------------------------------------- disjoint merge
def _token_job():
    """memory_ft on a model whose memory reads depend on the token alone (attention outputs zeroed):
    2 slots per token of 256."""
    job = tiny_job("memory_ft")
    job.model.memory = MemoryConfig(layers=[1], n_keys=16, heads=1, topk=2, k_dim=8)
    return job


def _token_model(job):
    torch.manual_seed(0)
    model = Transformer(job.model)
    with torch.no_grad():
        for block in model.layers:
            block.attention.wo.weight.zero_()
    return model


def _disjoint_token_sets(model) -> tuple[list[int], list[int]]:
    """Two sets of 4 tokens whose memory reads share no slot."""
    layer = model.memory_layers()[0]
    reads = {}
    for tok in range(64):
        model(torch.tensor([[tok]]), torch.ones(1, 1, dtype=torch.long))
        reads[tok] = set(layer.last_access.indices.flatten().tolist())
    chosen, used = [], set()
    for tok, slots in reads.items():
        if not slots & used:
            chosen.append(tok)
            used |= slots
        if len(chosen) == 8:
            return chosen[:4], chosen[4:]
    raise AssertionError("no disjoint token sets")


def _stream(tokens: list[int], step: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(step)
    ids = torch.tensor(tokens)[torch.randint(0, len(tokens), (B, 8), generator=g)]
    return ids, torch.ones_like(ids), ids


def _train_streams(rank: int, world: int, root: str) -> None:
    """From one base: stream a -> patch a, stream b -> patch b, a then b -> the sequence's export."""
    for which in ("a", "b", "ab"):
        job = _token_job()
        model = _token_model(job)
        a, b = _disjoint_token_sets(model)
        plan = apply_method(model, job.method)
        sources = value_table_sources(model, job)
        par = parallelize(model, job, plan, torch.device("cpu"))
        if which == "a":
            export_hf(par, job.model, f"{root}/base")
        for stream in which:
            for step in range(2):
                train_step(par, *_stream(a if stream == "a" else b, step))
        export_hf(par, job.model, f"{root}/{which}/hf")
        diff_tables(par, sources, f"{root}/{which}/patch", _manifest(par))


def test_disjoint_merge_equals_training_both_streams_in_sequence(tmp_path):
    run_ranks(_train_streams, 1, str(tmp_path))
    pa, pb = Patch(tmp_path / "a" / "patch"), Patch(tmp_path / "b" / "patch")
    assert pa.tables["mem_values_1"]["rows_changed"] > 0 and pb.tables["mem_values_1"]["rows_changed"] > 0
    assert overlaps([pa, pb]) == {}
    merged, shared = merge([pa, pb], tmp_path / "merged")
    assert shared == {}
    apply(tmp_path / "base", merged, tmp_path / "applied")
    _assert_same_model(tmp_path / "applied", tmp_path / "ab" / "hf")


# ------------------------------------------------------------------------- hand-made patches
N, DIM = 8, 4
BASE = torch.arange(N * DIM, dtype=torch.float32).view(N, DIM) / 7


def _hand_patch(path, rows: list[int], delta: float, steps: dict | None = None, base: torch.Tensor = BASE) -> Patch:
    ids = torch.tensor(rows)
    tables = {"t": {"num_rows": N, "dim": DIM, "base_hash": table_hash(base, N)}}
    entries = {"t": (ids, base[ids] + delta, base[ids].clone())}
    write_patch(path, tables, entries, {"method": "smft", "config": None, "dense_hash": "d", "history": []}, steps)
    return Patch(path)


def test_overlap_is_detected_and_resolved_by_policy(tmp_path):
    p1, p2 = _hand_patch(tmp_path / "p1", [1, 2, 3], 1.0), _hand_patch(tmp_path / "p2", [3, 4], 10.0)
    assert overlaps([p1, p2]) == {"t": 1}
    with pytest.raises(PatchError, match=r"1 rows are changed by more than one patch \(t: 1\)"):
        merge([p1, p2], tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    for policy, row3 in (("sum", BASE[3] + 1.0 + 10.0), ("last", BASE[3] + 10.0)):
        m, shared = merge([p1, p2], tmp_path / policy, policy=policy)
        assert shared == {"t": 1}
        rows, new, old = Patch(m).entries("t")
        assert rows.tolist() == [1, 2, 3, 4] and torch.equal(old, BASE[rows])
        assert torch.equal(new[[0, 1]], BASE[[1, 2]] + 1.0) and torch.equal(new[3], BASE[4] + 10.0), "disjoint rows exact"
        torch.testing.assert_close(new[2], row3)
    other = _hand_patch(tmp_path / "other", [5], 1.0, base=BASE + 1)
    with pytest.raises(PatchError, match="another base"):
        merge([p1, other], tmp_path / "mixed")


def test_forget_reverts_only_the_rows_of_that_fact(tmp_path):
    steps = {"steps": [{"step": 1, "fact": "0", "rows": {"t": [1, 2, 3]}},
                       {"step": 2, "fact": "1", "rows": {"t": [3, 4]}},
                       {"step": 3, "fact": "0", "rows": {"t": [5]}}],
             "facts": {"0": {"fact": "Ann was born in Rome."}, "1": {"fact": "Bo plays the harp."}}}
    p = _hand_patch(tmp_path / "p", [1, 2, 3, 4, 5], 1.0, steps)
    report = forget(p, "rome", tmp_path / "forgot")
    assert report["fact"] == "0" and report["rows_reverted"] == {"t": 3} and report["rows_shared"] == {"t": 1}
    assert report["steps_removed"] == 2
    left = Patch(tmp_path / "forgot")
    rows, new, _ = left.entries("t")
    assert rows.tolist() == [3, 4] and torch.equal(new, BASE[[3, 4]] + 1.0)
    assert [s["fact"] for s in left.steps["steps"]] == ["1"] and list(left.steps["facts"]) == ["1"]
    every = forget(p, "0", tmp_path / "forgot_all", include_shared=True)
    assert every["rows_reverted"] == {"t": 4} and Patch(tmp_path / "forgot_all").rows("t").tolist() == [4]
    with pytest.raises(PatchError, match="no fact match"):
        forget(p, "Paris", tmp_path / "none")
    with pytest.raises(PatchError, match="2 facts match"):
        forget(p, ".", tmp_path / "two")
    with pytest.raises(PatchError, match="log_selected_slots"):
        forget(_hand_patch(tmp_path / "nosteps", [1], 1.0), "0", tmp_path / "x")


def test_a_damaged_patch_is_refused(tmp_path):
    p = _hand_patch(tmp_path / "p", [1, 2], 1.0)
    (p.path / p.files[0]).write_bytes((p.path / p.files[0]).read_bytes()[:-4] + b"\0\0\0\1")
    with pytest.raises(PatchError, match="corrupt"):
        Patch(tmp_path / "p")
    with pytest.raises(PatchError, match="not a knowledge patch"):
        Patch(tmp_path)


@pytest.mark.slow
def test_an_smft_run_writes_its_patch_with_the_facts_of_its_steps(world, tmp_path):  # noqa: F811
    from tests.test_train import _job, _train

    pre, run = tmp_path / "pre", tmp_path / "smft"
    run_ranks(_train, 1, _job(world, pre, "train.steps=2"))
    assert not (pre / "patch").exists(), "pretraining changes dense weights: no patch"
    run_ranks(_train, 1, _job(world, run, f"train.init_from={pre}/hf", "train.stream=continual", "train.steps=3",
                              "method.name=smft", "method.ranking=tf", "method.top_t=5", "train.log_selected_slots=true"))
    p = Patch(run / "patch")
    assert p.manifest["method"] == "smft" and p.manifest["config"]["method"]["top_t"] == 5
    assert [s["fact"] for s in p.steps["steps"]] == ["0", "1", "2"] and p.steps["facts"]["0"]["fact"]
    apply(pre / "hf", p, tmp_path / "applied")
    _assert_same_model(tmp_path / "applied", run / "hf")
    report = forget(p, "0", tmp_path / "forgot")
    assert sum(report["rows_reverted"].values()) + sum(report["rows_shared"].values()) > 0
