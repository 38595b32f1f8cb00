"""New knowledge to training records: QA pairs -> ``facts``, documents -> chunked ``documents``.

A QA pair becomes a statement and ``n`` paraphrases of it (the SMFT paper trains each TriviaQA fact
as a batch of paraphrases); a document is cut into chunks of whole sentences, each with ``n``
augmentations (its SimpleQA setting). The rewrites come from a :class:`Rewriter`: a local HF
instruct model (:class:`HFRewriter`: chat template, batched left-padded generation) or
:class:`TemplateRewriter`, a deterministic fallback for tests and for models too small to
paraphrase. Every candidate is cleaned (first line, whitespace collapsed), capped in length,
deduplicated; a fact's statement and paraphrases are kept only if they still mention the answer and
the subject (:func:`keeps_fact`), so a small model cannot teach a wrong fact. What the model cannot
fill after ``rounds`` tries the templates fill, and each output line says where its texts came from.

Units are generated ``batch`` at a time (their prompts batched together), each group seeded from
``seed`` and its units' indices; a run that resumes an interrupted output file regenerates the
group it stopped in and writes exactly what an uninterrupted run would.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol

import torch

from smft_dist.data.schemas import DataError
from smft_dist.eval.qa_metrics import normalize_answer

STATEMENT_PROMPT = "Rewrite the question and its answer as one short factual statement.\nQuestion: {question}\nAnswer: {answer}"
PARAPHRASE_PROMPT = "Paraphrase the following statement in different words, keeping every fact. Reply with the paraphrase only.\n{text}"
AUGMENT_PROMPT = "Rewrite the following passage in different words, keeping every fact. Reply with the rewrite only.\n{text}"

_PREFIXES = ("", "Fact: ", "Remember this: ", "Note: ", "Did you know? ", "Here is something true: ", "In short: ",
             "To be precise: ", "Worth knowing: ", "For the record: ", "Keep in mind: ", "As a matter of fact: ")
_SUFFIXES = ("", " That is correct.", " This is a fact.", " Remember it.", " It is true.", " Now you know.")
_POSSESSIVE = re.compile(r"['’]s\b")


class Rewriter(Protocol):
    """Makes the texts of a batch of units, one seed per unit (a model sampling the batch at once
    seeds it from the first). ``name`` is recorded in each line's source."""

    name: str

    def statements(self, pairs: list[tuple[str, str]], seeds: list[int], sample: bool) -> list[str]: ...

    def variants(self, texts: list[str], prompt: str, counts: list[int], seeds: list[int]) -> list[list[str]]: ...


def template_statement(question: str, answer: str) -> str:
    """The statement "Q? A."."""
    return f"{question.strip()} {answer.strip()}."


def framings(text: str, n: int, seed: int) -> list[str]:
    """``n`` framings of ``text`` (prefix x suffix, at most 71 besides the text itself), in an order
    drawn from ``seed``."""
    combos = [p + text + s for p in _PREFIXES for s in _SUFFIXES][1:]
    order = torch.randperm(len(combos), generator=torch.Generator().manual_seed(seed)).tolist()
    return [combos[i] for i in order[:n]]


class TemplateRewriter:
    """Deterministic rewrites: :func:`template_statement` and :func:`framings`."""

    name = "template"

    def statements(self, pairs: list[tuple[str, str]], seeds: list[int], sample: bool) -> list[str]:
        return [template_statement(q, a) for q, a in pairs]

    def variants(self, texts: list[str], prompt: str, counts: list[int], seeds: list[int]) -> list[list[str]]:
        return [framings(t, n, s) for t, n, s in zip(texts, counts, seeds)]


class HFRewriter:
    """A local ``transformers`` causal LM; prompts go through its chat template when it has one and
    are generated ``batch_size`` at a time, left-padded. ``temperature`` 0 samples nothing (greedy)."""

    def __init__(self, path: str, batch_size: int = 16, max_new_tokens: int = 64, temperature: float = 0.8,
                 top_p: float = 0.95, device: str | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.name = str(path)
        self.tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype="auto").to(self.device).eval()
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self.temperature, self.top_p = temperature, top_p

    def _complete(self, prompts: list[str], seed: int, sample: bool) -> list[str]:
        tok, out = self.tokenizer, []
        sample = sample and self.temperature > 0
        chat = tok.chat_template is not None
        if chat:
            prompts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True) for p in prompts]
        for lo in range(0, len(prompts), self.batch_size):
            enc = tok(prompts[lo : lo + self.batch_size], return_tensors="pt", padding=True, add_special_tokens=not chat).to(self.device)
            torch.manual_seed(seed * 1_000_003 + lo)
            with torch.no_grad():
                ids = self.model.generate(**enc, do_sample=sample, temperature=self.temperature if sample else None,
                                          top_p=self.top_p if sample else None, max_new_tokens=self.max_new_tokens,
                                          pad_token_id=tok.pad_token_id)
            out += tok.batch_decode(ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        return out

    def statements(self, pairs: list[tuple[str, str]], seeds: list[int], sample: bool) -> list[str]:
        return self._complete([STATEMENT_PROMPT.format(question=q, answer=a) for q, a in pairs], seeds[0], sample)

    def variants(self, texts: list[str], prompt: str, counts: list[int], seeds: list[int]) -> list[list[str]]:
        outs = iter(self._complete([prompt.format(text=t) for t, n in zip(texts, counts) for _ in range(n)], seeds[0], sample=True))
        return [[next(outs) for _ in range(n)] for n in counts]


@dataclass
class AugmentConfig:
    """How many texts per unit, what a usable one looks like, how many units go together."""

    n: int = 64  # paraphrases per fact / augmentations per chunk
    seed: int = 0
    max_chars: int = 400  # candidates longer than this and than twice their source are dropped
    rounds: int = 3  # generation rounds per unit (statement, then paraphrases) before the templates fill the rest
    chunk_words: int = 120  # documents: chunk length cap in words (whole sentences)
    batch: int = 16  # units generated together (their prompts batched)


def clean(text: str) -> str:
    """First non-empty line, whitespace collapsed."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return re.sub(r"\s+", " ", lines[0]) if lines else ""


def _key(text: str) -> str:
    return re.sub(r"\W+", " ", text.casefold()).strip()


def subject_of(question: str) -> str | None:
    """What a fact is about, as :func:`keeps_fact` checks it: the question's longest run of
    capitalized words after its first word (the first run on a tie, a possessive 's dropped), e.g.
    "Zodu Bogaku" in every question of the synthetic world ("What is the name of Zodu Bogaku's
    pet?"); None when there is no capitalized word after the first."""
    runs, run = [], []
    for word in [*question.split()[1:], ""]:
        word = _POSSESSIVE.sub("", word.strip(".,;:!?\"'“”‘’()[]"))
        if word[:1].isupper():
            run.append(word)
        elif run:
            runs.append(run)
            run = []
    return " ".join(max(runs, key=len)) if runs else None


def _normalized(text: str) -> str:
    return normalize_answer(_POSSESSIVE.sub("", text))


def mentions(text: str, phrase: str) -> bool:
    """Whether ``phrase`` occurs in ``text`` as whole words, both normalized as the QA metric
    normalizes answers (after dropping possessive 's, so "Zodu Bogaku's pet" mentions "Zodu Bogaku")."""
    return f" {_normalized(phrase)} " in f" {_normalized(text)} "


def keeps_fact(text: str, answers: list[str], subject: str | None) -> bool:
    """Whether a rewrite still states the fact: it mentions one of the answers and the subject."""
    return any(mentions(text, a) for a in answers) and (subject is None or mentions(text, subject))


class Pool:
    """Up to ``n`` distinct usable texts for one unit. A candidate is cut to its first line and
    dropped when empty, longer than ``limit``, already seen (``exclude`` counts as seen), or when it
    fails ``check`` (those are counted in ``rejected``); ``templated`` counts the texts the
    templates supplied."""

    def __init__(self, n: int, limit: int, check: Callable[[str], bool] | None = None, exclude: Iterable[str] = ()):
        self.n, self.limit, self.check = n, limit, check
        self.seen = {_key(t) for t in exclude}
        self.kept: list[str] = []
        self.rejected = self.templated = 0

    @property
    def missing(self) -> int:
        return self.n - len(self.kept)

    def offer(self, candidates: Iterable[str]) -> int:
        """Keep the usable candidates (until full); returns how many were kept."""
        before = len(self.kept)
        for c in map(clean, candidates):
            if not c or len(c) > self.limit or _key(c) in self.seen or not self.missing:
                continue
            self.seen.add(_key(c))
            if self.check is None or self.check(c):
                self.kept.append(c)
            else:
                self.rejected += 1
        return len(self.kept) - before


def fill(texts: list[str], prompt: str, rewriter: Rewriter, cfg: AugmentConfig, seeds: list[int],
         checks: list[Callable[[str], bool]] | None = None) -> list[Pool]:
    """Per text, ``cfg.n`` distinct usable variants that pass its check: ``cfg.rounds`` batched
    rounds of the rewriter over the texts still short, then the templates fill the rest (fewer only
    if they run out)."""
    pools = [Pool(cfg.n, max(cfg.max_chars, 2 * len(t)), check, exclude=[t])  # a long chunk's augmentations are long too
             for t, check in zip(texts, checks or [None] * len(texts))]
    for r in range(cfg.rounds):
        todo = [i for i, p in enumerate(pools) if p.missing]
        if not todo:
            break
        outs = rewriter.variants([texts[i] for i in todo], prompt, [pools[i].missing for i in todo], [seeds[i] * 31 + r for i in todo])
        for i, out in zip(todo, outs):
            pools[i].offer(out)
    for text, pool, seed in zip(texts, pools, seeds):
        pool.templated = pool.offer(framings(text, len(_PREFIXES) * len(_SUFFIXES), seed))
    return pools


def chunk_document(text: str, max_words: int) -> list[str]:
    """Whole sentences packed greedily into chunks of at most ``max_words`` words (a longer
    sentence is a chunk of its own)."""
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())) if s]
    chunks, current = [], []
    for s in sentences:
        if current and len(" ".join(current + [s]).split()) > max_words:
            chunks.append(" ".join(current))
            current = []
        current.append(s)
    return chunks + ([" ".join(current)] if current else [])


def fact_units(records, source: str) -> Iterator[dict]:
    """``qa`` records -> units {question, answer (the first), answers, source}."""
    for i, r in enumerate(records):
        if not r["answers"]:
            raise DataError(f"{source}: record {i} has no answer")
        yield {"question": r["question"], "answer": r["answers"][0], "answers": r["answers"], "source": {"input": source, "record": i}}


def document_units(records, source: str, max_words: int) -> Iterator[dict]:
    """``text`` records -> units {text, source} (one per chunk)."""
    for i, r in enumerate(records):
        for j, chunk in enumerate(chunk_document(r["text"], max_words)):
            yield {"text": chunk, "source": {"input": source, "record": i, "chunk": j}}


def _seeds(cfg: AugmentConfig, first: int, count: int) -> list[int]:
    return [cfg.seed * 1_000_003 + index for index in range(first, first + count)]


def make_facts(units: list[dict], first: int, rewriter: Rewriter, cfg: AugmentConfig) -> list[dict]:
    """``facts`` lines for consecutive units, the first at index ``first``: a statement and ``n``
    paraphrases each, generated in batches across the units. A model text is kept only if it
    mentions an answer and the subject (:func:`keeps_fact`); the statement gets ``cfg.rounds`` tries
    (greedy, then sampled) before the template "Q? A." stands in. The source adds the generator,
    the subject checked, ``kept`` / ``rejected`` (model texts kept / dropped for missing the answer
    or subject, distinct ones), ``template_statement`` and ``template_fill`` (paraphrases the
    templates supplied)."""
    seeds = _seeds(cfg, first, len(units))
    subjects = [subject_of(u["question"]) for u in units]
    checks = [partial(keeps_fact, answers=u["answers"], subject=s) for u, s in zip(units, subjects)]
    statements = [Pool(1, cfg.max_chars, check) for check in checks]
    for r in range(cfg.rounds):
        todo = [i for i, p in enumerate(statements) if p.missing]
        if not todo:
            break
        outs = rewriter.statements([(units[i]["question"], units[i]["answer"]) for i in todo], [seeds[i] * 31 + r for i in todo], sample=r > 0)
        for i, out in zip(todo, outs):
            statements[i].offer([out])
    texts = [p.kept[0] if p.kept else template_statement(u["question"], u["answer"]) for u, p in zip(units, statements)]
    paraphrases = fill(texts, PARAPHRASE_PROMPT, rewriter, cfg, seeds, checks)
    lines = []
    for u, subject, text, st, para in zip(units, subjects, texts, statements, paraphrases):
        source = {**u["source"], "generator": rewriter.name, "subject": subject, "kept": len(st.kept) + len(para.kept) - para.templated,
                  "rejected": st.rejected + para.rejected, "template_statement": not st.kept, "template_fill": para.templated}
        lines.append({"fact": text, "paraphrases": para.kept, "question": u["question"], "answer": u["answer"], "source": source})
    return lines


def make_documents(units: list[dict], first: int, rewriter: Rewriter, cfg: AugmentConfig) -> list[dict]:
    """``documents`` lines for consecutive units, the first at index ``first``: the chunk and ``n``
    augmentations, generated in batches across the units."""
    pools = fill([u["text"] for u in units], AUGMENT_PROMPT, rewriter, cfg, _seeds(cfg, first, len(units)))
    return [{"document": u["text"], "augmentations": p.kept, "source": {**u["source"], "generator": rewriter.name, "template_fill": p.templated}}
            for u, p in zip(units, pools)]


def written_units(out: Path) -> list[dict]:
    """Sources of the complete lines already in ``out``; a torn last line is cut off."""
    if not out.exists():
        return []
    data = out.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        out.write_bytes(complete)
    try:
        return [json.loads(line)["source"] for line in complete.decode("utf-8").splitlines()]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise DataError(f"{out}: exists and is not augment output; remove it or choose another output") from None


def augment(units: Iterator[dict], make: Callable[[list[dict], int, Rewriter, AugmentConfig], list[dict]], rewriter: Rewriter,
            cfg: AugmentConfig, out: str | Path, limit: int | None = None) -> int:
    """Write one line per unit to ``out`` (jsonl), ``cfg.batch`` units per :func:`make` call,
    resuming after the lines already there (the group a resume starts in is generated whole, as an
    uninterrupted run generates it); returns the number of lines the file holds. ``limit`` stops
    after that many lines in total."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = written_units(out)
    units = iter(units)
    count = 0
    with out.open("a", encoding="utf-8") as fh:
        while (limit is None or count < limit) and (group := list(islice(units, cfg.batch))):
            first, wanted = count, len(group) if limit is None else min(len(group), limit - count)
            for index, unit in enumerate(group[:wanted], first):
                if index < len(done) and {k: done[index].get(k) for k in unit["source"]} != unit["source"]:
                    raise DataError(f"{out}:{index + 1}: written from other input ({done[index]}); remove it or choose another output")
            count = first + wanted
            if count > len(done):
                for line in make(group, first, rewriter, cfg)[max(len(done) - first, 0) : wanted]:
                    fh.write(json.dumps(line, ensure_ascii=False) + "\n")
                    fh.flush()
    return max(count, len(done))
