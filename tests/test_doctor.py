"""The doctor flags version mismatches with one line saying what to install."""

import torch

from smft_dist import doctor


def test_current_environment_is_consistent(monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    assert doctor.check() == []


def test_fbgemm_torch_mismatch_is_one_line_naming_the_fix(monkeypatch):
    versions = {"torch": "2.13.0+cpu", "fbgemm-gpu-cpu": "1.9.0", "torchrec": "1.8.0", "deepspeed": "0.19.8"}
    monkeypatch.setattr(doctor, "_version", versions.get)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    problems = doctor.check()
    assert any("fbgemm-gpu-cpu 1.9.0 does not match torch 2.13.0" in p and "fbgemm-gpu-cpu==1.8.0" in p for p in problems)
    assert any("torchrec 1.8.0 is not built for fbgemm-gpu-cpu 1.9.0" in p for p in problems)


def test_missing_torchrec_is_one_line(monkeypatch):
    versions = {"torch": "2.13.0+cpu", "fbgemm-gpu-cpu": "1.8.0", "deepspeed": "0.19.8"}
    monkeypatch.setattr(doctor, "_version", versions.get)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    problems = doctor.check()
    assert len(problems) == 1 and problems[0].startswith("torchrec is not installed")


def test_unset_ds_accelerator_is_no_problem(monkeypatch):
    """Unset, DeepSpeed falls back to the CPU accelerator on a machine without a GPU: training runs."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    assert doctor.check() == []


def test_ds_accelerator_naming_the_wrong_device_is_a_problem(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    assert doctor.check() == ["DS_ACCELERATOR=cuda but this machine runs on cpu: export DS_ACCELERATOR=cpu (or unset it)"]
