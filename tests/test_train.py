"""The training loop end to end on the synthetic world: 2 ranks == 1, resume == never stopped,
eval + TensorBoard + HF export, background statistics, SMFT leaves untouched rows bit-identical."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from smft_dist.config import JobConfig, load_config
from smft_dist.data.synthetic import WorldSize, generate
from smft_dist.smft.background_stats import BackgroundStats
from tests.multiproc import run_ranks

TABLE = "model.value_tables.mem_values_1.bag.weight"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    generate(out, WorldSize(people=12, background_docs=60, heldout_docs=8), seed=0, vocab_size=300)
    return out


def _job(world, out, *overrides) -> JobConfig:
    base = [
        "model.vocab_size=320", "model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=64",
        "model.memory.layers=[1]", "model.memory.n_keys=8", "model.memory.heads=2", "model.memory.topk=4",
        "model.memory.k_dim=16",
        f"data.tokenizer={world}/tokenizer",
        f"data.pretrain.source.path={world}/pretrain.jsonl", "data.pretrain.seq_len=32", "data.pretrain.batch_size=4",
        f"data.continual.source.path={world}/facts_new.jsonl", "data.continual.seq_len=24", "data.continual.batch_size=4",
        f"data.background.source.path={world}/background.jsonl", "data.background.seq_len=32", "data.background.batch_size=4",
        "method.name=pretrain", "method.dense_lr=1e-2", "method.value_lr=0.5", "distributed.grad_clip=0",
        "train.stream=pretrain", "train.steps=4", "train.log_every=1", f"train.out_dir={out}",
        f"checkpoint.dir={out}/ckpt", "checkpoint.keep_last=0",
    ]
    return load_config(None, base + list(overrides))


def _train(rank: int, world_size: int, cfg: JobConfig) -> dict:
    from smft_dist.train import train

    return train(cfg)


def _train_signalled(rank: int, world_size: int, cfg: JobConfig, signalled_rank: int, at_step: int) -> dict:
    """The real loop; ``signalled_rank`` gets SIGUSR1 in the middle of step ``at_step`` (the other rank never does)."""
    import os
    import signal

    import smft_dist.train as train_module

    step, calls = train_module.train_step, []

    def step_then_signal(*args, **kwargs):
        calls.append(1)
        if rank == signalled_rank and len(calls) == at_step:
            os.kill(os.getpid(), signal.SIGUSR1)
        return step(*args, **kwargs)

    train_module.train_step = step_then_signal
    return train_module.train(cfg)


def _background(rank: int, world_size: int, cfg: JobConfig, out: str) -> int:
    from smft_dist.background import collect

    stats = collect(cfg, num_batches=5)
    if rank == 0:
        stats.save(out)
    return stats.num_batches


def _exported(out) -> dict[str, torch.Tensor]:
    return load_file(str(out / "hf" / "model.safetensors"))


@pytest.mark.multirank
def test_two_ranks_equal_one_rank_and_signal_checkpoint_resume_equals_uninterrupted(world, tmp_path):
    one, two, resumed = tmp_path / "one", tmp_path / "two", tmp_path / "resumed"
    [m1] = run_ranks(_train, 1, _job(world, one))
    m2 = run_ranks(_train, 2, _job(world, two))
    assert m1["loss"] == pytest.approx(m2[0]["loss"], rel=1e-5) and m2[0]["loss"] == m2[1]["loss"]
    a, b = _exported(one), _exported(two)
    assert a.keys() == b.keys()
    for name in a:  # AdamW turns fp32 reduction-order noise in near-zero gradients into ~1e-6 moves
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=2e-5, msg=lambda m, name=name: f"{name}: {m}")

    # rank 1 alone gets SLURM's warning signal during step 2: both ranks checkpoint step 2 and leave
    # without exporting; the requeued job resumes to step 4
    run_ranks(_train_signalled, 2, _job(world, resumed), 1, 2)
    assert (resumed / "ckpt" / "latest").read_text() == "step_00000002"
    assert not (resumed / "hf").exists()
    run_ranks(_train, 2, _job(world, resumed))
    c = _exported(resumed)
    for name in a:
        torch.testing.assert_close(c[name], b[name], rtol=1e-6, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}")
    lines = [json.loads(x) for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x["split"] == "train"] == [1, 2, 3, 4]


def _lines(out, split: str) -> list[dict]:
    return [x for x in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if x["split"] == split]


@pytest.mark.multirank
def test_gradient_accumulation_counts_optimizer_steps(world, tmp_path):
    """GAS=2 x batch 2 == GAS=1 x batch 4 through the loop: the LR schedule, logging, eval and
    checkpoint intervals and train.steps count optimizer steps; resuming under GAS=2 (from a
    checkpoint between windows) equals running straight through."""
    from smft_dist.train import lr_multiplier

    common = ["sparse_optim.type=adamw", "method.value_lr=1e-2", "train.warmup_steps=2", "train.lr_schedule=cosine",
              "checkpoint.interval=2", "eval.every=2",
              f"eval.tasks=[{{name: heldout, kind: nll, source: {{path: {world}/heldout.jsonl}}, seq_len: 32}}]"]
    gas2 = [*common, "data.pretrain.batch_size=2", "distributed.grad_accum_steps=2"]
    one, two, resumed = tmp_path / "one", tmp_path / "two", tmp_path / "resumed"
    run_ranks(_train, 1, _job(world, one, *common))
    run_ranks(_train, 1, _job(world, two, *gas2))
    a, b = _exported(one), _exported(two)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=2e-5, msg=lambda m, name=name: f"{name}: {m}")
    cfg = _job(world, two, *gas2)
    steps = _lines(two, "train")
    assert [x["step"] for x in steps] == [1, 2, 3, 4]
    assert [x["lr_mult"] for x in steps] == [lr_multiplier(s, cfg.train) for s in range(4)] == [x["lr_mult"] for x in _lines(one, "train")]
    assert [x["loss"] for x in steps] == pytest.approx([x["loss"] for x in _lines(one, "train")], rel=1e-5)
    assert [x["step"] for x in _lines(two, "eval")] == [2, 4]
    assert sorted(p.name for p in (two / "ckpt").glob("step_*")) == ["step_00000002", "step_00000004"]

    run_ranks(_train, 1, _job(world, resumed, *gas2, "train.steps=2", "train.export_hf=false"))
    run_ranks(_train, 1, _job(world, resumed, *gas2))
    c = _exported(resumed)
    for name in b:
        torch.testing.assert_close(c[name], b[name], rtol=1e-6, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.multirank
def test_smft_run_with_background_eval_and_export(world, tmp_path):
    pre = tmp_path / "pre"
    run_ranks(_train, 1, _job(world, pre))
    smft = tmp_path / "smft"
    overrides = [f"train.init_from={pre}/hf", "train.stream=continual", "train.steps=3",
                 "method.name=smft", "method.top_t=5", f"method.background={tmp_path}/df.safetensors",
                 "eval.max_new_tokens=3", "train.log_selected_slots=true",
                 f"eval.tasks=[{{name: new, kind: qa, source: {{path: {world}/facts_new.jsonl, schema: facts, max_examples: 4}}}},"
                 f" {{name: heldout, kind: nll, source: {{path: {world}/heldout.jsonl}}, seq_len: 32}}]"]
    assert run_ranks(_background, 2, _job(world, smft, *overrides), str(tmp_path / "df.safetensors")) == [5, 5]
    stats = BackgroundStats.load(tmp_path / "df.safetensors")
    assert stats.num_batches == 5 and int(stats.df["mem_values_1"].max()) <= 5
    counts, df = stats.counts["mem_values_1"], stats.df["mem_values_1"]
    assert torch.equal(counts > 0, df > 0) and (counts >= df).all() and int(counts.sum()) > int(df.sum()), \
        "counts are reads per slot (a slot read twice in one batch counts twice), df the batches that read it"

    metrics = run_ranks(_train, 2, _job(world, smft, *overrides))
    same = {k: v for k, v in metrics[0].items() if k != "tokens_per_s"}
    assert same == {k: v for k, v in metrics[1].items() if k != "tokens_per_s"}
    assert {"eval/new/f1", "eval/heldout/nll", "rows_trained/mem_values_1", "slots_accessed/mem_values_1"} <= metrics[0].keys()
    assert metrics[0]["rows_trained/mem_values_1"] == 5
    answers = [json.loads(x) for x in (smft / "answers" / "step3" / "new.jsonl").read_text().splitlines()]  # the final eval's
    assert [a["index"] for a in answers] == [0, 1, 2, 3] and sorted((smft / "answers").iterdir()) == [smft / "answers" / "step3"]
    assert sum(a["f1"] for a in answers) / 4 == pytest.approx(metrics[0]["eval/new/f1"])
    before, after = _exported(pre), _exported(smft)
    moved = (before[TABLE] != after[TABLE]).any(1)
    assert 0 < int(moved.sum()) <= 3 * 5, "at most top_t rows per step move"
    logged = [json.loads(x) for x in (smft / "selected_slots.jsonl").read_text().splitlines()]
    assert [(r["step"], r["table"], len(r["slots"])) for r in logged] == [(s, "mem_values_1", 5) for s in (1, 2, 3)]
    assert set(moved.nonzero().flatten().tolist()) <= {s for r in logged for s in r["slots"]}, "only logged rows moved"
    change = json.loads((smft / "row_change.json").read_text())  # per-row norms gathered over 2 ranks vs the start
    norms = (after[TABLE] - before[TABLE]).norm(dim=1)
    summary = change["tables"]["mem_values_1"]
    assert summary["rows_changed"] == int(moved.sum()) and summary["rows"] == norms.numel()
    assert summary["norm"] == pytest.approx(float(norms.norm()), rel=1e-5)
    assert change["all"]["norm"] == summary["norm"]
    largest = norms.sort(descending=True).values
    assert summary["top1pct_share"] == pytest.approx(float(largest[0] ** 2 / norms.square().sum()), rel=1e-5)
    by_sharing = summary["by_sharing"]
    assert by_sharing["unit"] == "facts" and sum(b["rows_changed"] for b in by_sharing["buckets"]) == int(moved.sum())
    assert sum(b["norm_sq_share"] for b in by_sharing["buckets"]) == pytest.approx(1.0)
    assert all(b["norm_sq_share"] == 0 for b in by_sharing["buckets"] if b["trained_by"] == "0"), "an unselected row moved"
    hist = [json.loads(x) for x in (smft / "row_change_hist.jsonl").read_text().splitlines()]
    assert sum(b["rows"] for b in hist) == int(moved.sum())
    for name in before:
        if name != TABLE:
            assert torch.equal(before[name], after[name]), f"{name} changed under SMFT"
    assert any((smft / "tensorboard").iterdir())


@pytest.mark.slow
@pytest.mark.multirank
def test_selection_options_resume_through_the_loop(world, tmp_path):
    """smft counting scored positions under a share cap, 2 ranks: stopped at step 3 (checkpoints at 2
    and 3) and resumed to 6 ends bit-identical to 6 straight steps; the cap ranks rows out."""
    pre = tmp_path / "pre"
    run_ranks(_train, 1, _job(world, pre))
    options = [f"train.init_from={pre}/hf", "train.stream=continual", "method.name=smft", "method.ranking=tf", "method.top_t=5",
               "method.count_positions=scored", "method.row_share_cap=2", "checkpoint.interval=2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    metrics = run_ranks(_train, 2, _job(world, straight, *options, "train.steps=6"))
    run_ranks(_train, 2, _job(world, resumed, *options, "train.steps=3"))
    run_ranks(_train, 2, _job(world, resumed, *options, "train.steps=6"))
    a, b = _exported(straight), _exported(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert metrics[0]["ranked_out/mem_values_1"] > 0 and metrics[0]["rows_at_cap/mem_values_1"] > 0
    assert json.loads((resumed / "row_change.json").read_text()) == json.loads((straight / "row_change.json").read_text())


def test_bad_input_is_one_line_naming_it(world, tmp_path):
    from smft_dist.train import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("method:\n  name: smft\n  top_t: 0\n")
    with pytest.raises(SystemExit, match=r"^smft_dist.train: method.top_t: must be positive$"):
        main(["--config", str(bad)])
    with pytest.raises(SystemExit, match=r"^smft_dist.train: data.tokenizer: not set"):
        main(["--config", str(bad), "method.top_t=5"])
    missing = ["method.top_t=5", f"data.tokenizer={world}/tokenizer", f"method.background={tmp_path}/nope.safetensors"]
    with pytest.raises(SystemExit, match=r"nope.safetensors: not found"):
        main(["--config", str(bad), *missing])

