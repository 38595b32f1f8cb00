"""What produced a run directory: the resolved config, code version, packages, world size, and the
hyperparameters with their final metrics in TensorBoard's HParams view.

``out_dir/config.yaml`` holds every field after overrides (the model section as loaded from
``train.init_from``), so ``python -m smft_dist.train --config out_dir/config.yaml`` reruns it;
``out_dir/run.json`` holds the git commit, a dirty flag, package versions and the world size.
"""

from __future__ import annotations

import json
import subprocess
from importlib import metadata
from pathlib import Path

import yaml
from torch.utils.tensorboard import SummaryWriter

from smft_dist.config import JobConfig, to_dict

PACKAGES = ("torch", "torchrec", "fbgemm-gpu", "fbgemm-gpu-cpu", "deepspeed", "transformers", "peft")


def package_versions() -> dict[str, str | None]:
    """Installed version of each package the run depends on (None = not installed)."""
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_state(path: str | Path | None = None) -> dict[str, str | bool | None]:
    """Commit and dirty flag of the checkout holding ``path`` (this package by default); None
    outside a git checkout or without git. Dirty: a tracked file other than documentation (``*.md``)
    differs from the commit, so edits to the README while a sweep runs do not mark its runs."""
    cwd = Path(path) if path is not None else Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    return {"commit": commit.strip(), "dirty": bool((git("status", "--porcelain", "--untracked-files=no", "--", ":/", ":(top,exclude)*.md") or "").strip())}


def write_provenance(cfg: JobConfig, out_dir: str | Path, world_size: int) -> None:
    """Write ``config.yaml`` (the resolved config) and ``run.json`` (code, packages, world size)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    info = {"git": git_state(), "packages": package_versions(), "world_size": world_size}
    (out / "run.json").write_text(json.dumps(info, indent=2) + "\n")


def flat_hparams(cfg: JobConfig) -> dict[str, bool | int | float | str]:
    """Every config field under its dotted name, as a value TensorBoard's HParams accepts
    (lists and None as their JSON text)."""
    flat: dict[str, bool | int | float | str] = {}

    def walk(node: object, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}.{key}" if prefix else key)
        elif isinstance(node, (bool, int, float, str)):
            flat[prefix] = node
        else:
            flat[prefix] = json.dumps(node)

    walk(to_dict(cfg), "")
    return flat


def log_hparams(writer: SummaryWriter, cfg: JobConfig, metrics: dict[str, float]) -> None:
    """The run's hyperparameters and final ``metrics`` (as ``hparam/<name>``) in the HParams view,
    written to ``<writer's dir>/hparams``."""
    final = {f"hparam/{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    writer.add_hparams(flat_hparams(cfg), final, run_name="hparams")
