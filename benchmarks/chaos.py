"""Faults on a schedule: a 2-rank SMFT run with checkpoints is stopped N times at random moments and
restarted after each until it finishes; its HF export must equal an uninterrupted run's bit for bit.

    python -m benchmarks.chaos                      # seed 0: 8 faults over 16 steps
    python -m benchmarks.chaos --seed 1 --faults 12

Each launch is the real ``python -m smft_dist.train`` under ``torchrun --standalone`` (2 gloo ranks,
a tiny model on the synthetic world, ``checkpoint.interval=2``, ``checkpoint.on_corrupt=previous``).
The schedule (:func:`fault_schedule`, from ``--seed``) deals every kind in turn, shuffled:

* ``kill9``: SIGKILL of a random rank (a lost process or node);
* ``sigterm``: SIGTERM to a random rank (preemption): every rank checkpoints at the next step
  boundary and exits 0 before the end;
* ``kill_in_save``: SIGKILL of a random rank while a checkpoint is being written;
* ``corrupt``: SIGKILL of a random rank once two checkpoints exist, then bytes flipped in a random
  file of the newest checkpoint before the restart (which resumes from the intact one before it).

A random moment: once the launch has logged a random share of its part of the steps left (those
over the faults left), plus a random share of a step (timed on the uninterrupted run). Printed: the faults survived, the restarts and the steps redone (steps trained
again because the fault came after their last checkpoint), and whether the export is bit-equal.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("kill9", "sigterm", "kill_in_save", "corrupt")
WORLD = 2
LAUNCH_TIMEOUT_S = 600.0  # a launch that outlives this is a hang: it is killed and the benchmark fails


@dataclass(frozen=True)
class Fault:
    kind: str
    rank: int  # the rank that gets the signal
    share: float  # of the launch's steps left, logged before the fault fires
    delay: float  # then this share of a step longer


def fault_schedule(seed: int, n: int, world: int = WORLD) -> list[Fault]:
    """``n`` faults: every kind in turn (each appears once ``n >= len(KINDS)``), shuffled by ``seed``."""
    rng = random.Random(seed)
    kinds = [KINDS[i % len(KINDS)] for i in range(n)]
    rng.shuffle(kinds)
    return [Fault(k, rng.randrange(world), rng.random(), rng.random()) for k in kinds]


def model_overrides(world: Path, steps: int) -> list[str]:
    """A tiny model on the synthetic world ``world`` (pretraining; the SMFT stage adds its own)."""
    return [
        "model.vocab_size=320", "model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=64",
        "model.memory.layers=[1]", "model.memory.n_keys=16", "model.memory.heads=2", "model.memory.topk=4",
        "model.memory.k_dim=16", f"data.tokenizer={world}/tokenizer",
        f"data.pretrain.source.path={world}/pretrain.jsonl", "data.pretrain.seq_len=32", "data.pretrain.batch_size=8",
        f"data.continual.source.path={world}/facts_new.jsonl", "data.continual.seq_len=24", "data.continual.batch_size=4",
        "method.dense_lr=1e-2", "distributed.grad_clip=0", f"train.steps={steps}", "train.log_every=1",
    ]


def smft_overrides(world: Path, base: Path, out: Path, steps: int) -> list[str]:
    return [*model_overrides(world, steps), "method.name=smft", "method.ranking=tf", "method.top_t=32",
            "method.value_lr=1.0", "train.stream=continual", f"train.init_from={base}", f"train.out_dir={out}",
            f"checkpoint.dir={out}/ckpt", "checkpoint.interval=2", "checkpoint.keep_last=0",
            "checkpoint.on_corrupt=previous"]


class Launch:
    """One ``torchrun`` of ``smft_dist.train``; rank 0's log lines collected as they come."""

    def __init__(self, config: Path, overrides: list[str], cwd: Path):
        cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node", str(WORLD),
               "--shutdown-timeout", "5", "-m", "smft_dist.train", "--config", str(config), *overrides]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.lines: list[str] = []
        self.times: list[float] = []  # when each line came
        self.changed = threading.Condition()
        self.workers: dict[int, int] = {}  # rank -> pid
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self.changed:
                self.lines.append(line.rstrip("\n"))
                self.times.append(time.monotonic())
                self.changed.notify_all()
        with self.changed:
            self.changed.notify_all()

    def steps(self) -> list[int]:
        return [int(m.group(1)) for line in self.lines if (m := re.match(r"\[train\] step\s+(\d+)", line))]

    def step_time(self) -> float:
        """Mean seconds per step between the first and the last logged step."""
        times = [t for line, t in zip(self.lines, self.times) if line.startswith("[train] step")]
        return (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else 0.0

    def start_step(self) -> int | None:
        return next((int(m.group(1)) for line in self.lines if (m := re.search(r"from step (\d+) to", line))), None)

    def wait_for(self, ready, timeout: float = LAUNCH_TIMEOUT_S) -> bool:
        """Block until ``ready()`` or the launch ends; whether ``ready()`` came first."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while not ready():
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    return ready()
                self.changed.wait(0.05)
        return True

    def worker_pids(self) -> dict[int, int]:
        """rank -> pid of the running workers (children of torchrun)."""
        import psutil

        try:
            children = psutil.Process(self.proc.pid).children()
        except psutil.NoSuchProcess:
            return self.workers
        for child in children:
            try:
                env = child.environ()
            except psutil.Error:
                continue
            if "RANK" in env:
                self.workers[int(env["RANK"])] = child.pid
        return self.workers

    def signal_rank(self, rank: int, sig: int) -> bool:
        pid = self.worker_pids().get(rank)
        if pid is None:
            return False
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return False
        return True

    def finish(self, timeout: float = LAUNCH_TIMEOUT_S) -> int:
        """The launch's exit code; whatever of it is still running after ``timeout`` is killed."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError("a launch hung:\n" + "\n".join(self.lines[-30:])) from None
        finally:
            for pid in self.workers.values():  # a worker torchrun left behind
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def kill(self) -> None:
        for pid in [*self.worker_pids().values(), self.proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()


def complete_checkpoints(ckpt: Path) -> list[Path]:
    return sorted(p for p in ckpt.glob("step_*") if (p / "manifest.json").is_file())


def flip_bytes(step_dir: Path, rng: random.Random) -> Path:
    """Invert 8 bytes in the middle of a random file the checkpoint lists; the file's path."""
    files = sorted(json.loads((step_dir / "manifest.json").read_text())["files"])
    path = step_dir / rng.choice([*files, "manifest.json"])
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    for i in range(mid, min(mid + 8, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def inject(launch: Launch, fault: Fault, total_steps: int, ckpt: Path, step_s: float, faults_left: int) -> str | None:
    """Wait for the fault's moment (``step_s``: seconds per step; the launch's share of the steps
    left: theirs over ``faults_left``) and apply it; what was done, or None when the run ended first."""
    if not launch.wait_for(lambda: launch.start_step() is not None):
        return None
    start = launch.start_step()
    target = start + int(fault.share * -(-(total_steps - start) // faults_left))
    if fault.kind == "sigterm" and start < total_steps - 1:  # while a step boundary is left to stop at
        target = min(max(target, start + 1), total_steps - 2)  # (the last step ends in the final save anyway)
    if fault.kind == "corrupt":  # an older checkpoint must exist to fall back to
        ready = lambda: (target <= start or target in launch.steps()) and len(complete_checkpoints(ckpt)) >= 2  # noqa: E731
    else:
        ready = lambda: target <= start or target in launch.steps()  # noqa: E731
    if not launch.wait_for(ready):
        return None
    time.sleep(fault.delay * step_s)
    if fault.kind == "kill_in_save":  # a save lasts a fraction of a second: look every 2 ms
        while not any(ckpt.glob(".tmp-step_*")):
            if launch.proc.poll() is not None:
                return None
            time.sleep(0.002)
    sig = signal.SIGTERM if fault.kind == "sigterm" else signal.SIGKILL
    reached = max(launch.steps(), default=start)
    if launch.proc.poll() is not None or not launch.signal_rank(fault.rank, sig):
        return None
    return f"{fault.kind}: {signal.Signals(sig).name} to rank {fault.rank} after step {reached}"


def run(seed: int, n_faults: int, steps: int, tmp: Path, log=print) -> dict:
    """Set up (world, a short pretraining), run uninterrupted, then under the fault schedule; the figures."""
    from safetensors.torch import load_file

    from smft_dist.data.synthetic import WorldSize, generate

    world = tmp / "world"
    generate(world, WorldSize(people=16, background_docs=60, heldout_docs=8), seed=0, vocab_size=300)
    config = tmp / "empty.yaml"
    config.write_text("{}\n")
    base = tmp / "pretrain"
    setup = Launch(config, [*model_overrides(world, 4), "method.name=pretrain", "train.stream=pretrain",
                            f"train.out_dir={base}", f"checkpoint.dir={base}/ckpt"], tmp)
    if setup.finish() != 0:
        raise RuntimeError("pretraining failed:\n" + "\n".join(setup.lines[-30:]))
    straight = Launch(config, smft_overrides(world, base / "hf", tmp / "straight", steps), tmp)
    if straight.finish() != 0:
        raise RuntimeError("the uninterrupted run failed:\n" + "\n".join(straight.lines[-30:]))
    step_s = straight.step_time()
    log(f"uninterrupted: {steps} steps ({step_s:.2f} s per step)")

    out, rng = tmp / "chaos", random.Random(seed)
    schedule, survived, launches, trained = fault_schedule(seed, n_faults), 0, 0, 0
    while True:
        shutil.rmtree(out / "hf", ignore_errors=True)  # what a launch killed in its export left
        launch = Launch(config, smft_overrides(world, base / "hf", out, steps), tmp)
        launches += 1
        fault = schedule[survived] if survived < len(schedule) else None
        done = inject(launch, fault, steps, out / "ckpt", step_s, n_faults - survived) if fault else None
        rc = launch.finish()
        start = launch.start_step() or 0
        trained += max(launch.steps(), default=start) - start
        if done is None:
            if rc != 0:
                raise RuntimeError(f"launch {launches} failed without a fault (rc {rc}):\n" + "\n".join(launch.lines[-30:]))
            if (out / "hf" / "model.safetensors").is_file():
                break
            continue  # the fault found no moment (e.g. no save left to interrupt): draw again at the restart
        survived += 1
        if fault.kind == "corrupt":
            flipped = flip_bytes(complete_checkpoints(out / "ckpt")[-1], rng)
            done += f"; flipped 8 bytes of {flipped.relative_to(out / 'ckpt')}"
        log(f"fault {survived}/{n_faults} (launch {launches}, from step {start}): {done}; exit {rc}")
        if rc == 0 and (out / "hf" / "model.safetensors").is_file():  # the fault came after the export
            break
    a = load_file(str(tmp / "straight" / "hf" / "model.safetensors"))
    b = load_file(str(out / "hf" / "model.safetensors"))
    equal = a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    return {"faults": survived, "restarts": launches - 1, "steps_redone": trained - steps, "bit_equal": equal}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--faults", type=int, default=8)
    p.add_argument("--steps", type=int, default=16)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        r = run(args.seed, args.faults, args.steps, Path(tmp))
    print(f"seed {args.seed}: {r['faults']} faults survived, {r['restarts']} restarts, {r['steps_redone']} steps redone; "
          f"export {'bit-equal to' if r['bit_equal'] else 'DIFFERENT from'} the uninterrupted run's")
    sys.exit(0 if r["bit_equal"] else 1)


if __name__ == "__main__":
    main()
