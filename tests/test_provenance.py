"""Run provenance: the resolved config reloads to the same config, git/package/world info, and the
hyperparameters with final metrics in TensorBoard's HParams view; the run also logs memory usage."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from smft_dist.config import load_config
from smft_dist.provenance import flat_hparams, git_state
from tests.multiproc import run_ranks
from tests.test_train import _job, _train, world  # noqa: F401  (world is a fixture)


def test_run_dir_records_config_code_and_hparams(world, tmp_path):  # noqa: F811
    pre = tmp_path / "pre"
    run_ranks(_train, 1, _job(world, pre, "train.steps=2"))
    out = tmp_path / "ft"
    cfg = _job(world, out, f"train.init_from={pre}/hf", "train.stream=continual", "train.steps=2", "method.name=memory_ft",
               "model.dim=64", "eval.max_new_tokens=2",
               f"eval.tasks=[{{name: heldout, kind: nll, source: {{path: {world}/heldout.jsonl}}, seq_len: 32}}]")
    [metrics] = run_ranks(_train, 1, cfg)

    saved = load_config(out / "config.yaml")
    assert saved.model.dim == 32, "the model section is the one loaded from init_from, not the override"
    cfg.model = saved.model
    assert saved == cfg
    info = json.loads((out / "run.json").read_text())
    assert info["world_size"] == 1 and info["packages"]["torch"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True)
    assert info["git"]["commit"] == (head.stdout.strip() if head.returncode == 0 else None)

    usage = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"memory"' in x]
    assert [u["step"] for u in usage] == [1, 2] and all(0 < u["mem_values_1/read_fraction"] <= 1 for u in usage)
    train_events = EventAccumulator(str(out / "tensorboard"))
    train_events.Reload()
    assert "memory/mem_values_1/access_counts" in train_events.Tags()["histograms"]

    acc = EventAccumulator(str(out / "tensorboard" / "hparams"))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["method.name"].string_value == "memory_ft"
    assert start.hparams["train.steps"].number_value == 2
    assert acc.Scalars("hparam/eval/heldout/nll")[0].value == pytest.approx(metrics["eval/heldout/nll"], rel=1e-6)  # stored as fp32


def test_flat_hparams_and_git_outside_a_checkout(tmp_path):
    flat = flat_hparams(load_config(None, ["model.memory.layers=[1, 2]", "model.n_layers=4"]))
    assert flat["model.memory.layers"] == "[1, 2]" and flat["model.memory.v_dim"] == "null" and flat["method.top_t"] == 500
    assert git_state(tmp_path) == {"commit": None, "dirty": None}


def test_dirty_means_code_or_configs_changed_not_documentation(tmp_path):
    import subprocess

    def git(*args):
        subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=tmp_path, check=True, capture_output=True)

    (tmp_path / "pkg").mkdir()
    for name in ("pkg/x.py", "README.md", "conf.yaml"):
        (tmp_path / name).write_text("a\n")
    git("init", "-q")
    git("add", "-A")
    git("commit", "-qm", "start")
    assert git_state(tmp_path / "pkg")["dirty"] is False
    (tmp_path / "README.md").write_text("edited while a sweep runs\n")
    (tmp_path / "notes.py").write_text("untracked\n")
    assert git_state(tmp_path / "pkg")["dirty"] is False
    (tmp_path / "conf.yaml").write_text("b\n")  # a config, outside the directory git is asked from
    assert git_state(tmp_path / "pkg")["dirty"] is True
