"""Learning vs forgetting of each finetuning method on the quickstart's synthetic world.

Runs stage 2 of the quickstart (32 new facts, one per step, 3 passes) once per method from the same
pretrained model and prints new-fact learning against forgetting of known facts and held-out text,
relative to the starting model measured in the same run - the shape of the SMFT paper's Figure 1.
Needs the quickstart's stage 1 (``bash launcher/quickstart.sh`` once).

    python -m benchmarks.continual [--methods smft full_ft lora memory_ft]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from smft_dist.eval.report import last_eval

CONFIG = "configs/quickstart_smft.yaml"
OUT = Path("runs/bench_continual")
METHODS = {  # overrides of the quickstart's SMFT config, paper-style optimizers per method
    "smft": [],
    "memory_ft": ["method.name=memory_ft"],
    "full_ft": ["method.name=full_ft", "method.dense_lr=1e-3", "sparse_optim.type=adamw"],  # AdamW on every parameter
    "lora": ["method.name=lora", "method.lora_rank=16", "method.lora_alpha=32", "method.dense_lr=1e-3"],
}


def run(args: list[str]) -> None:
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    subprocess.run([sys.executable, "-m", *args], check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    args = p.parse_args()
    if not Path("runs/quickstart/pretrain/hf/config.json").is_file():
        sys.exit("benchmarks.continual: run `bash launcher/quickstart.sh` once first (stage 1 model)")
    OUT.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(OUT / "base", ignore_errors=True)
    run(["smft_dist.evaluate", "--config", CONFIG, "--model", "runs/quickstart/pretrain/hf", "--out", str(OUT / "base")])
    base = last_eval(OUT / "base" / "metrics.jsonl")
    rows = []
    for method in args.methods:
        out = OUT / method
        t0 = time.perf_counter()
        run(["smft_dist.train", "--config", CONFIG, f"train.out_dir={out}", f"checkpoint.dir={out}/ckpt",
             "train.export_hf=false", *METHODS[method]])
        seconds = time.perf_counter() - t0
        rows.append((method, last_eval(out / "metrics.jsonl"), seconds))
        shutil.rmtree(out)  # a rerun must not resume from this run's checkpoint

    print(f"starting model: new facts F1 {base['new_facts/f1']:.3f}, known facts F1 {base['known_facts/f1']:.3f}, "
          f"held-out NLL {base['heldout/nll']:.4f}")
    print(f"{'method':<11}{'new F1 (learn)':>16}{'known F1 drop':>15}{'known F1 drop %':>17}{'held-out NLL +':>16}{'seconds':>9}")
    for method, m, seconds in rows:
        drop = base["known_facts/f1"] - m["known_facts/f1"]
        print(f"{method:<11}{m['new_facts/f1']:>16.3f}{drop:>15.3f}{100 * drop / max(base['known_facts/f1'], 1e-9):>16.0f}%"
              f"{m['heldout/nll'] - base['heldout/nll']:>16.4f}{seconds:>9.0f}")


if __name__ == "__main__":
    main()
