"""What a patch changed: tables, rows, norms of the changes, which facts trained which rows, which
known facts read the changed rows (:mod:`smft_dist.analysis.overlap`), and a picture of where in
each table it wrote."""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

import torch

from smft_dist.patching.format import Patch


def summary(p: Patch, top: int = 5) -> dict:
    """Per table: rows changed, norms of the change, the ``top`` most changed rows with the facts
    whose steps trained them; per fact (with per-step row sets): rows trained, rows no other fact
    trained."""
    row_facts: dict[tuple[str, int], Counter] = defaultdict(Counter)
    for rec in (p.steps or {}).get("steps", []):
        for table, rows in rec["rows"].items():
            for r in rows:
                row_facts[(table, r)][rec["fact"]] += 1
    tables = {}
    for name, m in p.tables.items():
        rows, new, old = p.entries(name)
        norms = (new - old).norm(dim=1)
        order = torch.argsort(norms, descending=True)[:top]
        tables[name] = {
            "num_rows": m["num_rows"], "dim": m["dim"], "rows_changed": int(rows.numel()),
            "fraction": rows.numel() / m["num_rows"], "change_norm": float(norms.norm()),
            "row_change_norm": {"mean": float(norms.mean()), "max": float(norms.max())} if rows.numel() else {},
            "top_rows": [{"row": int(rows[i]), "change_norm": float(norms[i]),
                          "facts": dict(row_facts[(name, int(rows[i]))].most_common(3))} for i in order.tolist()],
        }
    facts = {}
    if p.steps is not None:
        trained: dict[str, set] = defaultdict(set)
        for rec in p.steps["steps"]:
            trained[rec["fact"]] |= {(t, r) for t, rows in rec["rows"].items() for r in rows}
        for fact, slots in sorted(trained.items(), key=lambda kv: -len(kv[1])):
            only = sum(1 for s in slots if len(row_facts[s]) == 1)
            text = p.steps["facts"].get(fact, {}).get("fact", "") if fact is not None else ""
            facts[str(fact)] = {"text": text, "rows": len(slots), "rows_only_this_fact": only}
    size = sum(f["size"] for f in p.manifest["files"].values())
    config = p.manifest.get("config") or {}
    return {"patch": str(p.path), "method": p.manifest["method"], "bytes": size, "world_size": p.manifest["world_size"],
            "method_config": config.get("method"), "history": [h.get("op") for h in p.manifest.get("history", [])],
            "steps": len(p.steps["steps"]) if p.steps else None, "tables": tables, "facts": facts}


def known_fact_reads(p: Patch, model_dir: str | Path, known: str | Path, tokenizer: str | Path,
                     qa_prompt: str = "Question: {question}\nAnswer:", max_known: int = 256, top: int = 5) -> dict:
    """How many of each known fact's answer slots (read by the base model ``model_dir``; see
    :func:`smft_dist.analysis.overlap.answer_slots`) the patch changes."""
    from transformers import AutoModelForCausalLM

    import smft_dist.model  # noqa: F401  (registers the Auto classes)
    from smft_dist.analysis.overlap import answer_slots
    from smft_dist.config import SourceConfig
    from smft_dist.data.sources import load_records
    from smft_dist.data.tokenizer import load_tokenizer

    records = load_records(SourceConfig(path=str(known), schema="facts", max_examples=max_known), "qa")
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    slots = answer_slots(model.model, load_tokenizer(str(tokenizer)), [qa_prompt.format(question=q) for q in records["question"]],
                         [a[0] for a in records["answers"]])
    changed = {(t, int(r)) for t in p.tables for r in p.rows(t).tolist()}
    hits = [len(s & changed) for s in slots]
    order = sorted(range(len(hits)), key=lambda i: -hits[i])[:top]
    fractions = sorted(h / max(1, len(s)) for h, s in zip(hits, slots))
    return {
        "known_facts": len(hits), "touched": sum(1 for h in hits if h),
        "answer_slots_changed_fraction": {"min": fractions[0], "median": fractions[len(fractions) // 2], "max": fractions[-1]},
        "most_touched": [{"question": records[i]["question"], "answer_slots": len(slots[i]), "changed": hits[i]} for i in order],
    }


def plot(p: Patch, png: str | Path, bins: int = 128) -> Path:
    """A PNG per table: rows changed and the summed change norm over the row ids, in ``bins`` bins."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(p.tables), figsize=(6 * len(p.tables), 5), squeeze=False)
    for col, (name, m) in enumerate(p.tables.items()):
        rows, new, old = p.entries(name)
        width = -(-m["num_rows"] // bins)
        which = rows // width
        count = torch.bincount(which, minlength=bins).float()
        norm = torch.zeros(bins).index_add_(0, which, (new - old).norm(dim=1))
        edges = torch.arange(bins) * width
        axes[0, col].bar(edges, count, width=width, align="edge")
        axes[0, col].set(title=f"{name}: {rows.numel()} of {m['num_rows']} rows", ylabel=f"rows changed / {width}")
        axes[1, col].bar(edges, norm, width=width, align="edge", color="tab:orange")
        axes[1, col].set(xlabel="row id", ylabel="sum of row change norms")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return Path(png)
