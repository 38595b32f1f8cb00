"""Environment check: ``python -m smft_dist.doctor``.

Prints versions, device and distributed backend, checks that FBGEMM's operators load, and that
torch / fbgemm-gpu / torchrec / deepspeed form a compatible set. Each problem is one line saying
what to install; the exit status is non-zero when any is found.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import os
import platform
import sys

# fbgemm-gpu release -> the torch (major.minor) its operators are compiled against
FBGEMM_TORCH = {"1.8": "2.13"}
# torchrec release -> the fbgemm-gpu release it is built for
TORCHREC_FBGEMM = {"1.8": "1.8"}
DEEPSPEED_PIN = "0.19.8"
PACKAGES = ["torch", "fbgemm-gpu", "fbgemm-gpu-cpu", "torchrec", "deepspeed", "transformers", "datasets",
            "tokenizers", "tensorboard", "peft", "safetensors"]


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def _minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def check() -> list[str]:
    """Return one line per problem found (empty when the environment is usable)."""
    problems: list[str] = []
    torch_v = _version("torch")
    fbgemm_dist = "fbgemm-gpu" if _version("fbgemm-gpu") else "fbgemm-gpu-cpu"
    fbgemm_v = _version(fbgemm_dist)
    torchrec_v, ds_v = _version("torchrec"), _version("deepspeed")
    if torch_v is None:
        return ["torch is not installed: run launcher/setup.sh (it pins torch==2.13.0)"]
    import torch

    cuda = torch.cuda.is_available()
    if fbgemm_v is None:
        problems.append(f"fbgemm-gpu is not installed: pip install {'fbgemm-gpu' if cuda else 'fbgemm-gpu-cpu'}==1.8.0")
    elif FBGEMM_TORCH.get(_minor(fbgemm_v)) != _minor(torch_v):
        want = next((f for f, t in FBGEMM_TORCH.items() if t == _minor(torch_v)), None)
        fix = f"pip install {fbgemm_dist}=={want}.0" if want else "pip install torch==2.13.0 fbgemm-gpu-cpu==1.8.0"
        problems.append(f"{fbgemm_dist} {fbgemm_v} does not match torch {torch_v} (ABI-locked): {fix}")
    if cuda and fbgemm_dist == "fbgemm-gpu-cpu":
        problems.append("CUDA is available but the CPU build fbgemm-gpu-cpu is installed: SMFT_DEVICE=cuda bash launcher/setup.sh")
    if torchrec_v is None:
        problems.append("torchrec is not installed: pip install --no-deps torchrec==1.8.0")
    elif fbgemm_v and TORCHREC_FBGEMM.get(_minor(torchrec_v)) != _minor(fbgemm_v):
        problems.append(f"torchrec {torchrec_v} is not built for {fbgemm_dist} {fbgemm_v}: pip install --no-deps torchrec==1.8.0")
    if ds_v is None:
        problems.append(f"deepspeed is not installed: pip install --no-build-isolation deepspeed=={DEEPSPEED_PIN}")
    ds_accelerator = os.environ.get("DS_ACCELERATOR")  # unset: DeepSpeed picks cuda when present, else cpu
    if ds_accelerator and ds_accelerator != ("cuda" if cuda else "cpu"):
        want = "cuda" if cuda else "cpu"
        problems.append(f"DS_ACCELERATOR={ds_accelerator} but this machine runs on {want}: "
                        f"export DS_ACCELERATOR={want} (or unset it)")
    if fbgemm_v is not None and not any("fbgemm-gpu" in p or "does not match" in p for p in problems):
        try:
            importlib.import_module("fbgemm_gpu")
            lengths = torch.tensor([2, 0, 3])
            offsets = torch.ops.fbgemm.asynchronous_complete_cumsum(lengths)
            if offsets.tolist() != [0, 2, 2, 5]:
                problems.append(f"FBGEMM operator asynchronous_complete_cumsum returned {offsets.tolist()}: reinstall {fbgemm_dist}")
        except Exception as e:  # noqa: BLE001 - any load failure is the finding
            problems.append(f"FBGEMM operators failed to load ({type(e).__name__}: {e}): reinstall {fbgemm_dist}==1.8.0")
    return problems


def report() -> str:
    """Versions, device and backend as printable lines."""
    import torch
    import torch.distributed as dist

    lines = [f"python        {platform.python_version()} ({sys.executable})"]
    lines += [f"{name:<13} {_version(name)}" for name in PACKAGES if _version(name)]
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        lines.append(f"device        cuda x{torch.cuda.device_count()} ({names}), CUDA {torch.version.cuda}")
    else:
        lines.append(f"device        cpu ({os.cpu_count()} cores)")
    backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    lines.append(f"backend       {backend} (gloo available: {dist.is_gloo_available()})")
    lines.append(f"DS_ACCELERATOR={os.environ.get('DS_ACCELERATOR', '')}")
    return "\n".join(lines)


def main() -> int:
    print(report())
    problems = check()
    for line in problems:
        print(f"PROBLEM: {line}")
    print("doctor: OK" if not problems else f"doctor: {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
