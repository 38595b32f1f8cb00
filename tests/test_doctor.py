"""The doctor flags version mismatches with one line saying what to install."""

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


def test_missing_torchrec_and_cpu_accelerator(monkeypatch):
    versions = {"torch": "2.13.0+cpu", "fbgemm-gpu-cpu": "1.8.0", "deepspeed": "0.19.8"}
    monkeypatch.setattr(doctor, "_version", versions.get)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    problems = doctor.check()
    assert any(p.startswith("torchrec is not installed") for p in problems)
    assert any("DS_ACCELERATOR" in p for p in problems)
