"""Before training: how specific to a fact are the rows SMFT would train for it?

    python -m smft_dist.analysis.read_specificity --config CONFIG [key=value ...]

Takes the config's starting model (``train.init_from``), background statistics (``method.background``)
and facts stream (``data.continual``: one fact per step). For each fact it replays the selection of
its step with the trainer's own row selectors (:func:`~smft_dist.smft.methods.apply_method`): the
memory reads of its batch (every real token, or the scored positions under
``method.count_positions=scored``), ranked by ``method.ranking`` against the background, top
``method.top_t`` per table, rows that reached ``method.row_share_cap`` ranked out, ``random`` seeded as
the trainer seeds step i. Under smft the keys, queries and every block below the memory are frozen,
so a run over the same unshuffled facts reads, and selects, exactly what this one-pass replay does.
It then reports, without training:

- ``known_exposed``: per known fact (eval task ``--known-task``), the share of the slots read at the
  positions predicting its answer (``qa_prompt`` + answer) that some fact's selection trains; mean
  over the known facts. ``known_exposed_every_read``: the same for every row the facts read (what
  ``memory_ft`` trains).
- ``new_covered``: per new fact, the share of its own cloze prompt's answer slots (eval task
  ``--new-task``, the same fact order) that its selection trains; mean over the facts.
- ``rows_selected`` and ``rows_shared`` (selected for >= 2 facts), ``rows_read``.

A memory whose selections reach the new facts' answer slots (high ``new_covered``) and few known ones
(low ``known_exposed``) can learn without forgetting; their ratio says how specific the reads are.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from collections import Counter
from statistics import fmean

import torch

from smft_dist.analysis.overlap import Slot, answer_slots
from smft_dist.smft.selection import RowSelector, step_seed
from smft_dist.smft.slot_counts import count_scored


def fact_selections(model, stream, selectors: dict[str, RowSelector], step: list[int]) -> tuple[list[set[Slot]], set[Slot]]:
    """Per batch of ``stream`` (in record order), the slots each table's selector (the trainer's,
    stateful under a share cap) selects from the reads of every layer using that table; and every
    slot the batches read. ``step`` [i]: set to the batch's 0-based index before its selection (the
    selectors' seed function reads it)."""
    selections, read = [], set()
    for i, batch in enumerate(stream):
        model(batch["input_ids"], batch["attention_mask"])
        scored = count_scored(batch["labels"]).flatten()[:, None]  # [T, 1]: under count_positions=scored
        reads: dict[str, list[torch.Tensor]] = {}
        for layer in model.memory_layers():
            slots = layer.last_access.slots()
            read |= {(layer.table_name, int(s)) for s in slots[slots >= 0].unique().tolist()}
            if selectors[layer.table_name].count_positions == "scored":
                slots = slots.masked_fill(~scored, -1)
            reads.setdefault(layer.table_name, []).append(slots)
        step[0] = i
        selections.append({(name, int(s)) for name in sorted(reads) for s in selectors[name](reads[name]).tolist()})
    return selections, read


def specificity(selections: list[set[Slot]], read: set[Slot], known: list[set[Slot]], new: list[set[Slot]]) -> dict:
    """The report's figures (module docstring) from the per-fact selections and answer slots."""
    trained = set().union(*selections)
    shared = {s for s, n in Counter(s for sel in selections for s in sel).items() if n >= 2}
    share = lambda slots, rows: len(slots & rows) / len(slots)  # noqa: E731
    return {
        "facts": len(selections), "rows_selected": len(trained), "rows_shared": len(shared), "rows_read": len(read),
        "known_exposed": fmean(share(k, trained) for k in known),
        "known_exposed_shared": fmean(share(k, shared) for k in known),
        "known_exposed_every_read": fmean(share(k, read) for k in known),
        "new_covered": fmean(share(a, sel) for a, sel in zip(new, selections)),
    }


def replay(cfg, model, tokenizer) -> tuple[list[set[Slot]], set[Slot]]:
    """One unshuffled pass of ``cfg``'s facts stream through ``model`` (the starting model's
    :class:`Transformer`) under ``cfg.method``'s selectors: :func:`fact_selections`."""
    from smft_dist.data.streams import build_stream
    from smft_dist.smft.background_stats import BackgroundStats
    from smft_dist.smft.methods import apply_method

    if cfg.data.continual.source.schema != "facts":
        raise SystemExit("smft_dist.analysis.read_specificity: data.continual must be a facts stream (one fact per step)")
    if cfg.method.name != "smft":
        raise SystemExit(f"smft_dist.analysis.read_specificity: method.name is {cfg.method.name!r}; the replay selects as smft "
                         "does (every row read, memory_ft's rows, is reported as known_exposed_every_read)")
    background = BackgroundStats.load(cfg.method.background) if cfg.method.ranking in ("tfidf", "kl") else None
    step = [0]
    selectors = apply_method(model, cfg.method, background, seed_fn=lambda: step_seed(cfg.train.seed, step[0])).selectors
    stream = build_stream(replace(cfg.data.continual, shuffle=False), tokenizer, cache_dir=cfg.data.cache_dir)
    with torch.no_grad():
        return fact_selections(model, stream, selectors, step)


def analyze(cfg, known_task: str, new_task: str) -> dict:
    from transformers import AutoModelForCausalLM

    import smft_dist.model  # noqa: F401  (registers the Auto classes)
    from smft_dist.analysis.overlap import _task
    from smft_dist.data.sources import load_records
    from smft_dist.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(cfg.data.tokenizer)
    model = AutoModelForCausalLM.from_pretrained(cfg.train.init_from).eval().model
    selections, read = replay(cfg, model, tokenizer)

    def prompt_slots(task: str) -> list[set[Slot]]:
        records = load_records(_task(cfg, task).source, "qa", cfg.data.cache_dir)
        prompts = [cfg.eval.qa_prompt.format(question=q) for q in records["question"]]
        return answer_slots(model, tokenizer, prompts, [a[0] for a in records["answers"]])

    with torch.no_grad():
        known, new = prompt_slots(known_task), prompt_slots(new_task)
    if len(new) != len(selections):
        raise SystemExit(f"smft_dist.analysis.read_specificity: eval task {new_task!r} has {len(new)} facts, the stream "
                         f"{len(selections)}: they must be the same facts in the same order")
    return {"init_from": cfg.train.init_from, "top_t": cfg.method.top_t, "ranking": cfg.method.ranking,
            "count_positions": cfg.method.count_positions, "row_share_cap": cfg.method.row_share_cap,
            **specificity(selections, read, known, new)}


def main(argv: list[str] | None = None) -> None:
    from smft_dist.config import ConfigError, load_config

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="a finetuning config (facts stream, method.background)")
    p.add_argument("--known-task", default="known_facts", help="eval task holding the known facts")
    p.add_argument("--new-task", default="new_facts", help="eval task holding the new facts' cloze prompts")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. method.top_t=2000")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        report = analyze(cfg, args.known_task, args.new_task)
    except ConfigError as e:
        raise SystemExit(f"smft_dist.analysis.read_specificity: {e}") from None
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
