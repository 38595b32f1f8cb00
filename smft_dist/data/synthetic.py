"""The embedded default dataset: a seeded synthetic world, generated with no download.

People have attributes (birth city, profession, employer, instrument, birth year, pet); each fact
is rendered through several paraphrase templates and a question / answer form. People are split
into *known* (their facts are in the pretraining corpus, as statements and as Q/A) and *new* (only
in the continual streams). Generic background text (places, weather, simple arithmetic) fills the
pretraining corpus; disjoint samples of it form the background (df statistics) and held-out sets.

Known facts are meant to be memorized and generic text to be generalized: ``fact_copies`` repeats
every known person's texts (two fresh bios and the Q/A form per copy), so a corpus can hold enough
generic text to be read about once while the facts are still seen many times (a model that
re-reads the same few generic documents overfits them, and held-out NLL stops measuring anything).

``python -m smft_dist.data.synthetic --out DIR [--size tiny|small|medium] [--people N]
[--background-docs N] [--fact-copies K] [--vocab-size 512]`` writes the files listed in
:data:`FILES` (and a tokenizer trained on the pretraining text).
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass, replace
from pathlib import Path

from smft_dist.data.tokenizer import train_tokenizer

FILES = {
    "pretrain": "pretrain.jsonl",  # text: background docs + known people's bios and Q/A
    "background": "background.jsonl",  # text: same distribution, for df statistics
    "heldout": "heldout.jsonl",  # text: held-out background, for NLL
    "facts_new": "facts_new.jsonl",  # facts: the continual fact stream (and its QA eval)
    "facts_known": "facts_known.jsonl",  # facts: known facts, for the forgetting QA eval
    "documents": "documents.jsonl",  # documents: one bio of a new person per record
    "choice": "choice.jsonl",  # choice: known facts as 4-way completions
    "arithmetic": "arithmetic.jsonl",  # lm_pair: held-out arithmetic questions, for NLL
}

_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
_PROFESSIONS = ["baker", "pilot", "teacher", "painter", "doctor", "farmer", "engineer", "poet", "chemist", "sailor", "judge", "architect", "tailor", "librarian", "astronomer", "carpenter"]
_INSTRUMENTS = ["violin", "piano", "flute", "cello", "trumpet", "harp", "drums", "guitar", "oboe", "banjo"]
_ANIMALS = ["dog", "cat", "parrot", "horse", "rabbit", "turtle", "goat", "owl"]
_NOUNS = ["river", "bridge", "market", "garden", "harbor", "library", "tower", "forest", "road", "square", "hill", "lake"]
_ADJECTIVES = ["old", "quiet", "busy", "narrow", "wide", "green", "cold", "bright", "small", "famous", "long", "calm"]
_WEATHER = ["rain", "snow", "wind", "fog", "sunshine", "storms"]
_MONTHS = ["January", "March", "May", "July", "September", "November"]
_NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]

# attribute -> (paraphrase templates, question template); {n} = name, {v} = value
TEMPLATES: dict[str, tuple[list[str], str]] = {
    "city": (
        ["{n} was born in {v}.", "{n}'s birthplace is {v}.", "The city where {n} was born is {v}.", "{v} is the birthplace of {n}.",
         "{n} came into the world in {v}.", "In {v}, {n} was born.", "{n} is a native of {v}.", "{n} grew up as a child of {v}."],
        "Where was {n} born?",
    ),
    "profession": (
        ["{n} works as a {v}.", "{n} is a {v} by profession.", "By trade, {n} is a {v}.", "The profession of {n} is {v}.",
         "{n} earns a living as a {v}.", "{n}'s job is {v}.", "As a {v}, {n} works every day.", "{n} has the job of a {v}."],
        "What is the profession of {n}?",
    ),
    "employer": (
        ["{n} is employed by {v}.", "{n} works for {v}.", "The employer of {n} is {v}.", "{v} employs {n}.",
         "{n} draws a salary from {v}.", "{n}'s employer is {v}.", "At {v}, {n} is on the staff.", "{n} has a position at {v}."],
        "Who employs {n}?",
    ),
    "instrument": (
        ["{n} plays the {v}.", "The instrument {n} plays is the {v}.", "{n}'s instrument is the {v}.", "{n} is a {v} player.",
         "Music from the {v} is what {n} plays.", "{n} practices the {v} every evening.", "On the {v}, {n} plays well.", "{n} learned to play the {v}."],
        "Which instrument does {n} play?",
    ),
    "year": (
        ["{n} was born in the year {v}.", "{n}'s year of birth is {v}.", "The birth year of {n} is {v}.", "{v} is the year {n} was born.",
         "In the year {v}, {n} was born.", "{n} has {v} as a birth year.", "The year {n} came into the world was {v}.", "{n} dates from the year {v}."],
        "In which year was {n} born?",
    ),
    "pet": (
        ["{n} owns a pet named {v}.", "{n}'s pet is called {v}.", "The pet of {n} is named {v}.", "{v} is the name of {n}'s pet.",
         "{n} has a pet called {v}.", "A pet named {v} lives with {n}.", "{n} takes care of a pet named {v}.", "The name of the pet {n} keeps is {v}."],
        "What is the name of {n}'s pet?",
    ),
}


@dataclass
class WorldSize:
    """How much to generate."""

    people: int
    background_docs: int
    heldout_docs: int
    new_fraction: float = 0.25
    fact_copies: int = 1  # copies of each known person's texts (2 bios + Q/A) in the pretraining corpus


SIZES = {
    "tiny": WorldSize(people=24, background_docs=120, heldout_docs=24),
    "small": WorldSize(people=200, background_docs=1500, heldout_docs=200),
    "medium": WorldSize(people=2000, background_docs=20000, heldout_docs=2000),
}


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(syllables)).capitalize()


def _unique(rng: random.Random, n: int, make) -> list[str]:
    seen: dict[str, None] = {}
    while len(seen) < n:
        seen.setdefault(make(rng))
    return list(seen)


class World:
    """A seeded world: places, organizations and people with one value per attribute."""

    def __init__(self, size: WorldSize, seed: int = 0):
        rng = random.Random(seed)
        self.rng = rng
        self.cities = _unique(rng, 24, lambda r: _word(r, 2) + r.choice(["ton", "burg", "ville", "ford", "haven"]))
        employers = _unique(rng, 16, lambda r: _word(r, 2) + " " + r.choice(["Works", "Labs", "Mills", "Shipping", "Bank", "Press"]))
        names = _unique(rng, size.people, lambda r: f"{_word(r, 2)} {_word(r, 3)}")
        pets = _unique(rng, 40, lambda r: _word(r, 2))
        self.values = {
            "city": self.cities, "profession": _PROFESSIONS, "employer": employers,
            "instrument": _INSTRUMENTS, "year": [str(y) for y in range(1900, 2000)], "pet": pets,
        }
        self.people = [{"name": n, **{a: rng.choice(v) for a, v in self.values.items()}} for n in names]
        n_new = max(1, round(size.new_fraction * size.people))
        self.known, self.new = self.people[n_new:], self.people[:n_new]
        self.size = size

    def facts(self, person: dict) -> list[dict]:
        """One ``facts`` record per attribute of ``person``; the last paraphrase is the question/answer
        form, so a small model can be probed by QA after learning from the paraphrases."""
        out = []
        for attr, (templates, question) in TEMPLATES.items():
            n, v = person["name"], person[attr]
            q = question.format(n=n)
            paraphrases = [t.format(n=n, v=v) for t in templates] + [f"Question: {q}\nAnswer: {v}"]
            out.append({"fact": paraphrases[0], "paraphrases": paraphrases, "question": q, "answer": v})
        return out

    def bio(self, person: dict) -> str:
        """A short biography: one random paraphrase per attribute, in random order."""
        sentences = [self.rng.choice(templates).format(n=person["name"], v=person[a]) for a, (templates, _) in TEMPLATES.items()]
        self.rng.shuffle(sentences)
        return " ".join(sentences)

    def qa_text(self, person: dict) -> str:
        return "\n".join(f["paraphrases"][-1] for f in self.facts(person))

    def background_doc(self) -> str:
        """A few generic sentences: places, weather, arithmetic."""
        rng = self.rng
        sentences = []
        for _ in range(rng.randint(3, 7)):
            kind = rng.random()
            city, noun, adj = rng.choice(self.cities), rng.choice(_NOUNS), rng.choice(_ADJECTIVES)
            if kind < 0.4:
                sentences.append(f"The {noun} in {city} is {adj}.")
            elif kind < 0.6:
                sentences.append(f"In {rng.choice(_MONTHS)}, {city} often has {rng.choice(_WEATHER)}.")
            elif kind < 0.8:
                a, b = rng.randint(0, 6), rng.randint(0, 6)
                sentences.append(f"If you add {_NUMBER_WORDS[a]} and {_NUMBER_WORDS[b]}, you get {_NUMBER_WORDS[a + b]}.")
            else:
                article = "An" if adj[0] in "aeiou" else "A"
                sentences.append(f"{article} {adj} {noun} stands near the {rng.choice(_NOUNS)} of {city}.")
        return " ".join(sentences)

    def choice(self, person: dict, attr: str) -> dict:
        """A 4-way completion of a fact: the first template's prefix and four candidate values."""
        prefix = TEMPLATES[attr][0][0].split("{v}")[0].format(n=person["name"]).rstrip()
        wrong = self.rng.sample([v for v in self.values[attr] if v != person[attr]], 3)
        label = self.rng.randrange(4)
        options = wrong[:label] + [person[attr]] + wrong[label:]
        return {"context": prefix, "endings": [f" {o}." for o in options], "label": label}

    def arithmetic(self) -> dict:
        a, b = self.rng.randint(0, 6), self.rng.randint(0, 6)
        return {"prompt": f"Question: What do you get if you add {_NUMBER_WORDS[a]} and {_NUMBER_WORDS[b]}?\nAnswer:", "target": f" {_NUMBER_WORDS[a + b]}"}


def generate(out: str | Path, size: str | WorldSize = "small", seed: int = 0, vocab_size: int = 512) -> dict[str, Path]:
    """Write the synthetic dataset (and a tokenizer when ``vocab_size`` > 0) to ``out``; return the paths."""
    ws = SIZES[size] if isinstance(size, str) else size
    world = World(ws, seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pretrain = [world.background_doc() for _ in range(ws.background_docs)]
    for _ in range(ws.fact_copies):
        for person in world.known:
            pretrain += [world.bio(person), world.bio(person), world.qa_text(person)]
    world.rng.shuffle(pretrain)
    choice = [world.choice(p, attr) for p in world.known for attr in ("city", "profession", "instrument")]
    tables = {
        "pretrain": [{"text": t} for t in pretrain],
        "background": [{"text": world.background_doc()} for _ in range(max(1, ws.background_docs // 4))],
        "heldout": [{"text": world.background_doc()} for _ in range(ws.heldout_docs)],
        "facts_new": [f for p in world.new for f in world.facts(p)],
        "facts_known": [f for p in world.known for f in world.facts(p)],
        "documents": [{"document": world.bio(p), "augmentations": [world.bio(p) for _ in range(8)]} for p in world.new],
        "choice": choice,
        "arithmetic": [world.arithmetic() for _ in range(max(8, ws.heldout_docs // 2))],
    }
    paths = {}
    for key, rows in tables.items():
        paths[key] = out / FILES[key]
        with open(paths[key], "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
    if vocab_size:
        paths["tokenizer"] = out / "tokenizer"
        texts = [r["text"] for r in tables["pretrain"]] + [r["prompt"] + r["target"] for r in tables["arithmetic"]]
        train_tokenizer(texts, vocab_size, paths["tokenizer"])
    return paths


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--size", default="small", choices=sorted(SIZES))
    ap.add_argument("--people", type=int, help="override the number of people of --size")
    ap.add_argument("--background-docs", type=int, help="override the number of generic pretraining documents of --size")
    ap.add_argument("--fact-copies", type=int, default=1, help="copies of each known person's texts in the pretraining corpus")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab-size", type=int, default=512, help="train a BPE tokenizer of this size (0: none)")
    args = ap.parse_args(argv)
    size = SIZES[args.size]
    size = replace(size, people=size.people if args.people is None else args.people, fact_copies=args.fact_copies,
                   background_docs=size.background_docs if args.background_docs is None else args.background_docs)
    if min(size.people, size.background_docs, size.fact_copies) < 1:
        raise SystemExit("smft_dist.data.synthetic: --people, --background-docs and --fact-copies must be >= 1")
    for key, path in generate(args.out, size, args.seed, args.vocab_size).items():
        print(f"{key:12s} {path}")


if __name__ == "__main__":
    main()
