"""Why forgetting happens: overlap of the slots SMFT trained with the slots known facts' answers read.

    python -m smft_dist.analysis.overlap --run runs/x/smft [--max-known 256]

Needs an SMFT run made with ``train.log_selected_slots=true`` (its ``selected_slots.jsonl``), its
``config.yaml`` and exported ``hf/``. For every new fact, the slots trained while it was the batch
(the record of each step, replayed from the stream's seeded order); for every known fact, the answer
slots: the slots the starting model's memory layers read at the positions that predict the answer
tokens of ``qa_prompt`` + " " + answer. Reports the overlap distribution (how many of a known fact's
answer slots were trained), how many times each trained slot was updated, and, for each per-fact
score of the greedy answers (token F1, and answer containment, which a change of answer format alone
does not move), the correlation of a known fact's loss (start vs end model) with the number of its
answer slots updated and the share of its answer slots updated among the facts lost vs kept. ``--restore-shared K`` also puts the rows trained for >= K distinct new facts back to their
starting values and reports known- and new-fact F1 of that model against the end model, with those
rows' share of the update norm: do the shared rows carry the learning, the forgetting, or both?
Writes ``RUN/overlap.json``.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from statistics import fmean
from pathlib import Path

import torch

Slot = tuple[str, int]  # (value table, row)


def read_selection_log(path: str | Path) -> dict[int, set[Slot]]:
    """step -> the slots trained at that step (the last record of a (step, table) wins: a resumed run
    repeats the steps after its checkpoint)."""
    records: dict[tuple[int, str], list[int]] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            records[(r["step"], r["table"])] = r["slots"]
    steps: dict[int, set[Slot]] = defaultdict(set)
    for (step, table), slots in records.items():
        steps[step] |= {(table, s) for s in slots}
    return dict(steps)


def record_of_steps(steps: list[int], num_records: int, shuffle: bool, seed: int) -> dict[int, int]:
    """step (1-based) -> index of the fact record trained at it, for a one-record-per-batch stream."""
    from smft_dist.data.streams import IndexedStream

    stream = IndexedStream(num_records, 1, lambda indices: indices, shuffle=shuffle, seed=seed)
    orders: dict[int, list[int]] = {}
    out = {}
    for step in steps:
        epoch, position = divmod(step - 1, num_records)
        if epoch not in orders:
            orders[epoch] = stream.order(epoch)
        out[step] = orders[epoch][position]
    return out


def pearson(x: list[float], y: list[float]) -> float | None:
    """Pearson correlation; None when either side is constant or there are fewer than 2 points."""
    if len(x) < 2:
        return None
    t = torch.tensor([x, y], dtype=torch.float64)
    t = t - t.mean(1, keepdim=True)
    denom = float(t[0].norm() * t[1].norm())
    return float((t[0] * t[1]).sum()) / denom if denom > 0 else None


def overlap_report(
    trained: dict[int, set[Slot]],
    fact_of_step: dict[int, int],
    answer_slots: dict[int, set[Slot]],
    losses: dict[str, dict[int, float]],
) -> dict:
    """The analysis from its inputs: slots trained per step, the new fact of each step, each known
    fact's answer slots and, per score (``f1``, ``contains``), its loss (start - end)."""
    updates: Counter[Slot] = Counter()
    per_fact: dict[int, set[Slot]] = defaultdict(set)
    for step, slots in trained.items():
        updates.update(slots)
        per_fact[fact_of_step[step]] |= slots
    updated = set(updates)
    known = sorted(answer_slots)
    hit = {k: len(answer_slots[k] & updated) for k in known}
    frac = {k: hit[k] / len(answer_slots[k]) if answer_slots[k] else 0.0 for k in known}
    sizes = sorted(len(s) for s in per_fact.values())
    return {
        "new_facts": len(per_fact),
        "slots_per_new_fact": {"min": sizes[0], "median": sizes[len(sizes) // 2], "max": sizes[-1]} if sizes else {},
        "slots_updated": len(updated),
        "updates_per_slot": dict(sorted(Counter(updates.values()).items())),  # times updated -> number of slots
        "known_facts": len(known),
        "answer_slots_updated": {str(k): hit[k] for k in known},
        "answer_slots_updated_fraction": {str(k): frac[k] for k in known},
        "overlap_histogram": dict(sorted(Counter(hit.values()).items())),  # answer slots updated -> known facts
        "known_facts_touched": sum(1 for k in known if hit[k] > 0),
        **{f"{score}_loss_vs_answer_slots_updated": pearson([hit[k] for k in known], [loss.get(k, 0.0) for k in known])
           for score, loss in losses.items()},
        "lost_vs_kept_answer_slots_updated_fraction": {score: {
            group: {"facts": len(ks), "mean": fmean(frac[k] for k in ks) if ks else None}
            for group, ks in (("lost", [k for k in known if loss.get(k, 0.0) > 0]), ("kept", [k for k in known if loss.get(k, 0.0) <= 0]))}
            for score, loss in losses.items()},
    }


def facts_per_slot(trained: dict[int, set[Slot]], fact_of_step: dict[int, int]) -> Counter[Slot]:
    """Slot -> the number of distinct new facts it was trained for."""
    facts: dict[Slot, set[int]] = defaultdict(set)
    for step, slots in trained.items():
        for slot in slots:
            facts[slot].add(fact_of_step[step])
    return Counter({slot: len(f) for slot, f in facts.items()})


# ------------------------------------------------------------------------------- model side
@torch.no_grad()
def restore_rows(end, start, slots: set[Slot]) -> float:
    """Put ``slots`` of ``end``'s value tables back to ``start``'s rows, in place; returns their share
    of the whole update's norm (end - start over every table)."""
    by_table: dict[str, list[int]] = defaultdict(list)
    for table, row in slots:
        by_table[table].append(row)
    start_params = dict(start.named_parameters())
    restored, total = 0.0, 0.0
    for name, weight in end.named_parameters():
        parts = name.split(".")
        if "value_tables" not in parts[:-1]:
            continue
        table = parts[parts.index("value_tables") + 1]
        delta = weight - start_params[name]
        total += float(delta.square().sum())
        rows = torch.tensor(by_table.get(table, []), dtype=torch.long)
        restored += float(delta[rows].square().sum())
        weight[rows] = start_params[name][rows]
    return (restored / total) ** 0.5 if total > 0 else 0.0

@torch.no_grad()
def answer_slots(model, tokenizer, prompts: list[str], answers: list[str]) -> list[set[Slot]]:
    """Per (prompt, answer): the slots the memory layers read at the positions predicting the answer
    tokens (the last prompt token through the second-to-last answer token)."""
    from smft_dist.data.packing import encode

    layers = model.memory_layers()
    out = []
    for prompt, answer in zip(prompts, answers):
        p_len = len(encode(tokenizer, [prompt], eos=False)[0])
        ids = encode(tokenizer, [f"{prompt} {answer}"], eos=False)[0]
        x = torch.tensor([ids])
        model(x, torch.ones_like(x))
        slots: set[Slot] = set()
        for layer in layers:
            idx = layer.last_access.indices.view(len(ids), -1)[p_len - 1 : len(ids) - 1]
            slots |= {(layer.table_name, int(s)) for s in idx.flatten().tolist()}
        out.append(slots)
    return out


def per_fact_scores(model, tokenizer, prompts: list[str], answers: list[list[str]], max_new_tokens: int) -> dict[str, list[float]]:
    """Per fact, the greedy answer's token F1 and answer containment (``f1``, ``contains``)."""
    from smft_dist.eval.qa_metrics import contains_answer, token_f1
    from smft_dist.eval.runner import greedy_generate

    preds: list[str] = []
    for start in range(0, len(prompts), 32):
        preds += greedy_generate(model, tokenizer, prompts[start : start + 32], max_new_tokens)
    return {"f1": [token_f1(p, a) for p, a in zip(preds, answers)], "contains": [contains_answer(p, a) for p, a in zip(preds, answers)]}


def _task(cfg, name: str):
    """The run config's eval task called ``name``."""
    task = next((t for t in cfg.eval.tasks if t.name == name), None)
    if task is None:
        raise SystemExit(f"smft_dist.analysis.overlap: the run's config.yaml has no eval task {name!r}")
    return task


def analyze(run: Path, max_known: int, known_task: str = "known_facts", restore_shared: int | None = None,
            new_task: str = "new_facts") -> dict:
    from transformers import AutoModelForCausalLM

    import smft_dist.model  # noqa: F401  (registers the Auto classes)
    from smft_dist.config import load_config
    from smft_dist.data.sources import load_records
    from smft_dist.data.tokenizer import load_tokenizer
    from smft_dist.eval.runner import run_task

    cfg = load_config(run / "config.yaml")
    stream = cfg.data.continual
    if cfg.train.stream != "continual" or cfg.distributed.grad_accum_steps != 1 or stream.source.schema not in ("facts", "documents"):
        raise SystemExit("smft_dist.analysis.overlap: needs one record per step (train.stream=continual, a facts or documents "
                         "schema, distributed.grad_accum_steps=1) to know which fact each step trained")
    trained = read_selection_log(run / "selected_slots.jsonl")
    num_records = len(load_records(stream.source, stream.source.schema, cfg.data.cache_dir))
    fact_of_step = record_of_steps(sorted(trained), num_records, stream.shuffle, cfg.data.seed)
    records = load_records(_task(cfg, known_task).source, "qa", cfg.data.cache_dir)
    records = records.select(range(min(max_known, len(records))))
    prompts, answers = [cfg.eval.qa_prompt.format(question=q) for q in records["question"]], records["answers"]
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    start = AutoModelForCausalLM.from_pretrained(cfg.train.init_from).eval()
    end = AutoModelForCausalLM.from_pretrained(str(run / "hf")).eval()
    slots = answer_slots(start.model, tokenizer, prompts, [a[0] for a in answers])
    before = per_fact_scores(start, tokenizer, prompts, answers, cfg.eval.max_new_tokens)
    after = per_fact_scores(end, tokenizer, prompts, answers, cfg.eval.max_new_tokens)
    losses = {score: {i: b - a for i, (b, a) in enumerate(zip(before[score], after[score]))} for score in before}
    report = overlap_report(trained, fact_of_step, dict(enumerate(slots)), losses)
    if restore_shared is not None:
        new_facts = _task(cfg, new_task)
        new_f1_end = run_task(end, tokenizer, new_facts, cfg.eval, cfg.data.cache_dir)["f1"]
        shared = {slot for slot, n in facts_per_slot(trained, fact_of_step).items() if n >= restore_shared}
        norm_share = restore_rows(end, start, shared)
        restored = per_fact_scores(end, tokenizer, prompts, answers, cfg.eval.max_new_tokens)
        report["restore_shared"] = {
            "min_facts": restore_shared, "rows": len(shared), "update_norm_share": norm_share,
            **{f"known_{score}": {"start": fmean(before[score]), "end": fmean(after[score]), "restored": fmean(restored[score])}
               for score in before},
            "new_f1": {"end": new_f1_end, "restored": run_task(end, tokenizer, new_facts, cfg.eval, cfg.data.cache_dir)["f1"]},
        }
    return report


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, type=Path, help="an smft run directory made with train.log_selected_slots=true")
    p.add_argument("--max-known", type=int, default=256, help="known facts analysed (the first n of the eval task)")
    p.add_argument("--known-task", default="known_facts", help="eval task holding the known facts")
    p.add_argument("--new-task", default="new_facts", help="eval task holding the new facts (with --restore-shared)")
    p.add_argument("--restore-shared", type=int, default=None, metavar="K",
                   help="also evaluate the end model with the rows trained for >= K new facts put back")
    args = p.parse_args(argv)
    for name in ("config.yaml", "selected_slots.jsonl", "hf/config.json"):
        if not (args.run / name).is_file():
            raise SystemExit(f"smft_dist.analysis.overlap: {args.run / name} not found (an smft run with train.log_selected_slots=true)")
    report = analyze(args.run, args.max_known, args.known_task, args.restore_shared, args.new_task)
    (args.run / "overlap.json").write_text(json.dumps(report, indent=1) + "\n")
    short = {k: v for k, v in report.items() if not k.startswith("answer_slots_updated")}
    print(json.dumps(short, indent=1))


if __name__ == "__main__":
    main()
