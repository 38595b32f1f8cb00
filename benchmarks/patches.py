"""Knowledge patches on the quickstart world: sizes, merging runs learned separately, forgetting a fact.

    bash launcher/quickstart.sh                       # once: the starting model and background statistics
    python -m benchmarks.patches [--seeds 0 1 2] [--out runs/patches] [--forget-fact 2]

Per seed (``data.seed = train.seed = seed``, the continual stream shuffled, as ``benchmarks.pareto``),
from the stage-2 config ``configs/quickstart_smft.yaml`` (smft, t = 2000, 3 passes):

* ``all``: one run on the 32 new facts (96 steps); ``a`` / ``b``: one run on each half (16 facts,
  48 steps); ``lora``: LoRA (rank 16, lr 1e-3, the quickstart grid's) on the 32 facts, for its size.
* merge: patches a and b merged with ``sum`` and with ``last`` (b wins), applied to the base, against
  ``all`` (one run that learned both halves): new-fact F1 of each half and known-fact F1.
* forget: fact ``--forget-fact`` taken out of ``all``'s patch, its own rows only and (``--include-shared``)
  all its rows: its F1 after, the other new facts' F1, known-fact F1, and the rows it trained alone /
  with other facts.
* sizes: the patch (row file, step records, manifest) against the full export and the LoRA adapter.

F1 is greedy answers' token F1 (as the eval), per fact, averaged. Writes ``OUT/results.json`` and
prints mean ± std over the seeds.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path
from statistics import fmean, stdev

CONFIG = "configs/quickstart_smft.yaml"
LORA = ["method.name=lora", "method.lora_rank=16", "method.lora_alpha=32", "method.dense_lr=1e-3", "train.log_selected_slots=false"]


def _train(out: Path, seed: int, *overrides: str) -> Path:
    from benchmarks.pareto import run_env

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    args = ["--config", CONFIG, f"train.out_dir={out}", f"checkpoint.dir={out}/ckpt", "checkpoint.keep_last=1",
            f"data.seed={seed}", f"train.seed={seed}", "data.continual.shuffle=true", "train.log_selected_slots=true",
            "eval.tasks=[]", *overrides]
    with open(out / "train.log", "w") as f:
        proc = subprocess.run([sys.executable, "-m", "smft_dist.train", *args], env=run_env(1), stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"benchmarks.patches: training {out} failed; see {out / 'train.log'}")
    shutil.rmtree(out / "ckpt", ignore_errors=True)
    return out


class Evaluator:
    """Per-fact F1 of the new facts (in stream-file order) and mean F1 of the known facts."""

    def __init__(self, cfg):
        from smft_dist.data.sources import load_records
        from smft_dist.data.tokenizer import load_tokenizer

        self.cfg, self.tokenizer = cfg, load_tokenizer(cfg.data.tokenizer)
        tasks = {t.name: t for t in cfg.eval.tasks}
        self.new = load_records(tasks["new_facts"].source, "qa")
        self.known = load_records(tasks["known_facts"].source, "qa")

    def __call__(self, model_dir: Path) -> dict:
        from transformers import AutoModelForCausalLM

        import smft_dist.model  # noqa: F401
        from smft_dist.analysis.overlap import per_fact_scores

        model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
        q = self.cfg.eval.qa_prompt
        f1 = lambda recs: per_fact_scores(model, self.tokenizer, [q.format(question=x) for x in recs["question"]],  # noqa: E731
                                          recs["answers"], self.cfg.eval.max_new_tokens)["f1"]
        return {"new": f1(self.new), "known": fmean(f1(self.known))}


def _halves(src_path: str, n: int, out: Path) -> tuple[Path, Path]:
    lines = Path(src_path).read_text().splitlines()[:n]
    a, b = out / "facts_a.jsonl", out / "facts_b.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    a.write_text("\n".join(lines[: n // 2]) + "\n")
    b.write_text("\n".join(lines[n // 2 :]) + "\n")
    return a, b


def lora_adapter_bytes(cfg) -> int:
    """Bytes of the LoRA adapter (fp32 safetensors of the lora_ parameters) on the starting model."""
    import tempfile

    from safetensors.torch import save_file

    from smft_dist.config import MethodConfig
    from smft_dist.model.saved import load_dense
    from smft_dist.smft.methods import apply_method

    model = load_dense(cfg.train.init_from)
    apply_method(model, MethodConfig(name="lora", lora_rank=16, lora_alpha=32))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if "lora_" in k}
    with tempfile.TemporaryDirectory() as d:
        save_file(state, f"{d}/adapter.safetensors")
        return Path(f"{d}/adapter.safetensors").stat().st_size


def one_seed(seed: int, out: Path, evaluate: Evaluator, base: Path, halves: tuple[Path, Path], n: int, fact: int) -> dict:
    from smft_dist.patching import Patch, apply, forget, merge

    root = out / f"seed{seed}"
    shutil.rmtree(root, ignore_errors=True)
    half = n // 2
    runs = {"all": _train(root / "all", seed)}
    for name, path in zip("ab", halves):
        runs[name] = _train(root / name, seed, f"data.continual.source.path={path}", f"data.continual.source.max_examples={half}",
                            f"train.steps={3 * half}")
    runs["lora"] = _train(root / "lora", seed, *LORA)
    p = {k: Patch(runs[k] / "patch") for k in "ab"} | {"all": Patch(runs["all"] / "patch")}
    models = {"all": runs["all"] / "hf", "a": runs["a"] / "hf", "b": runs["b"] / "hf", "lora": runs["lora"] / "hf"}
    for policy in ("sum", "last"):
        merged, shared = merge([p["a"], p["b"]], root / f"merge_{policy}", policy=policy)
        models[f"merge_{policy}"] = apply(base, merged, root / f"merge_{policy}_hf")
    report = forget(p["all"], str(fact), root / "forget")
    models["forget"] = apply(base, root / "forget", root / "forget_hf")
    forget(p["all"], str(fact), root / "forget_shared", include_shared=True)
    models["forget_shared"] = apply(base, root / "forget_shared", root / "forget_shared_hf")
    f1 = {k: evaluate(v) for k, v in models.items()}
    # the halves in stream-file order: new facts 0..n/2-1 are a, the rest b
    res = {k: {"new_a": fmean(v["new"][:half]), "new_b": fmean(v["new"][half:]), "new": fmean(v["new"]), "known": v["known"]}
           for k, v in f1.items()}
    table = next(iter(p["all"].tables))
    export = (runs["all"] / "hf" / "model.safetensors").stat().st_size
    files = p["all"].manifest["files"]
    return {
        "seed": seed, "f1": res,
        "forget": {"fact": fact, "text": report["text"], "rows_alone": report["rows_reverted"][table],
                   "rows_shared": report["rows_shared"][table], "fact_f1_before": f1["all"]["new"][fact],
                   "fact_f1_after": f1["forget"]["new"][fact],
                   "others_f1_before": fmean(x for i, x in enumerate(f1["all"]["new"]) if i != fact),
                   "others_f1_after": fmean(x for i, x in enumerate(f1["forget"]["new"]) if i != fact),
                   "known_before": f1["all"]["known"], "known_after": f1["forget"]["known"],
                   "fact_f1_after_shared": f1["forget_shared"]["new"][fact],
                   "others_f1_after_shared": fmean(x for i, x in enumerate(f1["forget_shared"]["new"]) if i != fact),
                   "known_after_shared": f1["forget_shared"]["known"]},
        "rows": {"all": p["all"].tables[table]["rows_changed"], "a": p["a"].tables[table]["rows_changed"],
                 "b": p["b"].tables[table]["rows_changed"], "overlap_ab": shared.get(table, 0),
                 "num_rows": p["all"].tables[table]["num_rows"]},
        "bytes": {"patch": sum(f["size"] for f in files.values()),
                  "patch_rows": sum(f["size"] for k, f in files.items() if k.startswith("rows-")),
                  "export": export},
    }


def _ms(xs: list[float], digits: int = 3) -> str:
    return f"{fmean(xs):.{digits}f} ± {stdev(xs) if len(xs) > 1 else 0.0:.{digits}f}"


def summarize(results: list[dict], base_f1: dict, lora_bytes: int) -> str:
    mib = 2**20
    r0 = results[0]
    lines = [f"seeds {[r['seed'] for r in results]}; starting model: new F1 {base_f1['new']:.3f}, known F1 {base_f1['known']:.3f}", "",
             "| model | new F1 (half a) | new F1 (half b) | new F1 (all) | known F1 |", "|---|---|---|---|---|"]
    for k, label in (("all", "one run on all facts"), ("a", "run a alone"), ("b", "run b alone"), ("merge_sum", "merge a+b, sum"),
                     ("merge_last", "merge a+b, last (b wins)"), ("forget", f"all, fact {r0['forget']['fact']} forgotten (its own rows)"),
                     ("forget_shared", f"all, fact {r0['forget']['fact']} forgotten (all its rows)"),
                     ("lora", "LoRA r16 on all facts")):
        col = lambda m: _ms([r["f1"][k][m] for r in results])  # noqa: E731
        lines.append(f"| {label} | {col('new_a')} | {col('new_b')} | {col('new')} | {col('known')} |")
    fg = lambda m, d=3: _ms([float(r["forget"][m]) for r in results], d)  # noqa: E731
    rows = lambda m: _ms([float(r["rows"][m]) for r in results], 0)  # noqa: E731
    lines += ["", f"forget fact {r0['forget']['fact']} ({r0['forget']['text'].get('fact', '')!r}): rows only its own {fg('rows_alone', 0)}, "
              f"shared with other facts {fg('rows_shared', 0)}; its F1 {fg('fact_f1_before')} -> {fg('fact_f1_after')}; "
              f"other new facts {fg('others_f1_before')} -> {fg('others_f1_after')}; known {fg('known_before')} -> {fg('known_after')}; "
              f"reverting all its rows (--include-shared): its F1 -> {fg('fact_f1_after_shared')}, other new facts -> "
              f"{fg('others_f1_after_shared')}, known -> {fg('known_after_shared')}",
              f"rows changed (of {r0['rows']['num_rows']}): all {rows('all')}, a {rows('a')}, b {rows('b')}, changed by both a and b {rows('overlap_ab')}",
              f"sizes: patch {_ms([r['bytes']['patch'] / mib for r in results], 2)} MiB (row file {_ms([r['bytes']['patch_rows'] / mib for r in results], 2)} MiB), "
              f"full export {r0['bytes']['export'] / mib:.2f} MiB, LoRA r16 adapter {lora_bytes / mib:.2f} MiB; "
              f"patch / export {fmean(r['bytes']['patch'] / r['bytes']['export'] for r in results):.2f}x"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from smft_dist.config import load_config

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=Path("runs/patches"))
    ap.add_argument("--forget-fact", type=int, default=2, help="index of the new fact to forget")
    args = ap.parse_args(argv)
    cfg = load_config(CONFIG)
    base = Path(cfg.train.init_from)
    if not (base / "config.json").is_file():
        raise SystemExit(f"benchmarks.patches: starting model {base} not found (bash launcher/quickstart.sh first)")
    n = cfg.data.continual.source.max_examples
    halves = _halves(cfg.data.continual.source.path, n, args.out / "data")
    evaluate = Evaluator(cfg)
    base_f1 = evaluate(base)
    base_f1 = {"new": fmean(base_f1["new"]), "known": base_f1["known"]}
    results = []
    for seed in args.seeds:
        results.append(one_seed(seed, args.out, evaluate, base, halves, n, args.forget_fact))
        print(json.dumps(results[-1]), flush=True)
    lora_bytes = lora_adapter_bytes(cfg)
    text = summarize(results, base_f1, lora_bytes)
    (args.out / "results.json").write_text(json.dumps({"base": base_f1, "lora_adapter_bytes": lora_bytes, "seeds": results}, indent=1))
    (args.out / "summary.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
