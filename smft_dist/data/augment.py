"""New knowledge to training records: QA pairs -> ``facts``, documents -> chunked ``documents``.

A QA pair becomes a statement and ``n`` paraphrases of it (the SMFT paper trains each TriviaQA fact
as a batch of paraphrases); a document is cut into chunks of whole sentences, each with ``n``
augmentations (its SimpleQA setting). The rewrites come from a :class:`Rewriter`: a local HF
instruct model (:class:`HFRewriter`: chat template, batched sampling) or :class:`TemplateRewriter`,
a deterministic fallback for tests and for models too small to paraphrase. Every candidate is
cleaned (first line, whitespace collapsed), capped in length, deduplicated; what the model cannot
fill after ``rounds`` tries the templates fill, and each output line says where it came from.

Each unit (a QA pair or a chunk) is generated alone from ``seed`` and its index, so a run that
resumes an interrupted output file writes exactly what an uninterrupted run would.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Protocol

import torch

from smft_dist.data.schemas import DataError

STATEMENT_PROMPT = "Rewrite the question and its answer as one short factual statement.\nQuestion: {question}\nAnswer: {answer}"
PARAPHRASE_PROMPT = "Paraphrase the following statement in different words, keeping every fact. Reply with the paraphrase only.\n{text}"
AUGMENT_PROMPT = "Rewrite the following passage in different words, keeping every fact. Reply with the rewrite only.\n{text}"

_PREFIXES = ("", "Fact: ", "Remember this: ", "Note: ", "Did you know? ", "Here is something true: ", "In short: ",
             "To be precise: ", "Worth knowing: ", "For the record: ", "Keep in mind: ", "As a matter of fact: ")
_SUFFIXES = ("", " That is correct.", " This is a fact.", " Remember it.", " It is true.", " Now you know.")


class Rewriter(Protocol):
    """Makes the texts of one unit. ``name`` is recorded in each line's source."""

    name: str

    def statement(self, question: str, answer: str, seed: int) -> str: ...

    def variants(self, text: str, prompt: str, n: int, seed: int) -> list[str]: ...


class TemplateRewriter:
    """Deterministic rewrites: the statement "Q? A." and framings of the text (prefix x suffix, at
    most 72 distinct), in an order drawn from the seed."""

    name = "template"

    def statement(self, question: str, answer: str, seed: int) -> str:
        return f"{question.strip()} {answer.strip()}."

    def variants(self, text: str, prompt: str, n: int, seed: int) -> list[str]:
        combos = [p + text + s for p in _PREFIXES for s in _SUFFIXES][1:]  # the text itself is not a variant
        order = torch.randperm(len(combos), generator=torch.Generator().manual_seed(seed)).tolist()
        return [combos[i] for i in order[:n]]


class HFRewriter:
    """A local ``transformers`` causal LM; prompts go through its chat template when it has one."""

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

    def statement(self, question: str, answer: str, seed: int) -> str:
        return self._complete([STATEMENT_PROMPT.format(question=question, answer=answer)], seed, sample=False)[0]

    def variants(self, text: str, prompt: str, n: int, seed: int) -> list[str]:
        return self._complete([prompt.format(text=text)] * n, seed, sample=True)


@dataclass
class AugmentConfig:
    """How many texts per unit and what a usable one looks like."""

    n: int = 64  # paraphrases per fact / augmentations per chunk
    seed: int = 0
    max_chars: int = 400  # candidates longer than this and than twice their source are dropped
    rounds: int = 2  # generation rounds per unit before the templates fill the rest
    chunk_words: int = 120  # documents: chunk length cap in words (whole sentences)


def clean(text: str) -> str:
    """First non-empty line, whitespace collapsed."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return re.sub(r"\s+", " ", lines[0]) if lines else ""


def _key(text: str) -> str:
    return re.sub(r"\W+", " ", text.casefold()).strip()


def fill(text: str, prompt: str, rewriter: Rewriter, cfg: AugmentConfig, seed: int) -> tuple[list[str], int]:
    """``cfg.n`` distinct usable variants of ``text`` (fewer only if the templates run out) and how
    many of them the templates supplied."""
    seen, kept = {_key(text)}, []
    limit = max(cfg.max_chars, 2 * len(text))  # a long chunk's augmentations are long too

    def take(candidates: list[str]) -> None:
        for c in map(clean, candidates):
            if c and len(c) <= limit and _key(c) not in seen and len(kept) < cfg.n:
                seen.add(_key(c))
                kept.append(c)

    for r in range(cfg.rounds):
        if len(kept) < cfg.n:
            take(rewriter.variants(text, prompt, cfg.n - len(kept), seed * 31 + r))
    generated = len(kept)
    take(TemplateRewriter().variants(text, prompt, len(_PREFIXES) * len(_SUFFIXES), seed))
    return kept, len(kept) - generated


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
    """``qa`` records -> units {question, answer, source}."""
    for i, r in enumerate(records):
        if not r["answers"]:
            raise DataError(f"{source}: record {i} has no answer")
        yield {"question": r["question"], "answer": r["answers"][0], "source": {"input": source, "record": i}}


def document_units(records, source: str, max_words: int) -> Iterator[dict]:
    """``text`` records -> units {text, source} (one per chunk)."""
    for i, r in enumerate(records):
        for j, chunk in enumerate(chunk_document(r["text"], max_words)):
            yield {"text": chunk, "source": {"input": source, "record": i, "chunk": j}}


def make_fact(unit: dict, index: int, rewriter: Rewriter, cfg: AugmentConfig) -> dict:
    """A ``facts`` line: statement (model, else template), ``n`` paraphrases, question, answer, source."""
    seed = cfg.seed * 1_000_003 + index
    q, a = unit["question"], unit["answer"]
    statement = clean(rewriter.statement(q, a, seed))
    from_template = not statement or len(statement) > cfg.max_chars
    if from_template:
        statement = TemplateRewriter().statement(q, a, seed)
    paraphrases, filled = fill(statement, PARAPHRASE_PROMPT, rewriter, cfg, seed)
    source = {**unit["source"], "generator": rewriter.name, "template_statement": from_template, "template_fill": filled}
    return {"fact": statement, "paraphrases": paraphrases, "question": q, "answer": a, "source": source}


def make_document(unit: dict, index: int, rewriter: Rewriter, cfg: AugmentConfig) -> dict:
    """A ``documents`` line: the chunk, ``n`` augmentations, source."""
    augmentations, filled = fill(unit["text"], AUGMENT_PROMPT, rewriter, cfg, cfg.seed * 1_000_003 + index)
    return {"document": unit["text"], "augmentations": augmentations,
            "source": {**unit["source"], "generator": rewriter.name, "template_fill": filled}}


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


def augment(units: Iterator[dict], make: Callable[[dict, int, Rewriter, AugmentConfig], dict], rewriter: Rewriter, cfg: AugmentConfig, out: str | Path,
            limit: int | None = None) -> int:
    """Write one line per unit to ``out`` (jsonl), resuming after the lines already there; returns
    the number of lines the file holds. ``limit`` stops after that many lines in total."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = written_units(out)
    with out.open("a", encoding="utf-8") as fh:
        count = 0
        for index, unit in enumerate(units):
            if limit is not None and index >= limit:
                break
            if index < len(done):
                if {k: done[index].get(k) for k in unit["source"]} != unit["source"]:
                    raise DataError(f"{out}:{index + 1}: written from other input ({done[index]}); remove it or choose another output")
            else:
                fh.write(json.dumps(make(unit, index, rewriter, cfg), ensure_ascii=False) + "\n")
                fh.flush()
            count = index + 1
    return max(count, len(done))
