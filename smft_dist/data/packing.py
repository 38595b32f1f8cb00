"""Token sequences to fixed-length rows: tokenization with ``datasets.map``, packing for
pretraining, per-example padding for fact and document streams.

Every row has ``input_ids``, ``attention_mask`` (1 = real token) and ``labels`` of one length.
``labels`` follow the HF convention (aligned with ``input_ids``; the model shifts), with -100 on
padding and on tokens that are not scored (a prompt; under a stream's ``score: answer``, every token
of a fact's text but those of its answer).
"""

from __future__ import annotations

import re
from typing import Sequence

import datasets
import torch
from transformers import PreTrainedTokenizerBase

from smft_dist.data.schemas import DataError

IGNORE = -100


def _specials(tokenizer: PreTrainedTokenizerBase, bos: bool, eos: bool) -> tuple[list[int], list[int]]:
    """The ids put before (the tokenizer's bos, if it has one) and after (eos) each text."""
    first = [tokenizer.bos_token_id] if bos and tokenizer.bos_token_id is not None else []
    return first, [tokenizer.eos_token_id] if eos else []


def encode(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], bos: bool = True, eos: bool = True) -> list[list[int]]:
    """Token ids of each text, with the tokenizer's bos (if it has one) first and eos last."""
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    first, end = _specials(tokenizer, bos, eos)
    return [first + x + end for x in ids]


def answer_span(text: str, answer: str) -> tuple[int, int] | None:
    """Character span [start, end) of the last case-insensitive occurrence of ``answer`` (stripped)
    in ``text``; None when there is none or the answer is blank."""
    answer = answer.strip()
    matches = list(re.finditer(f"(?=({re.escape(answer)}))", text, re.IGNORECASE)) if answer else []
    return matches[-1].span(1) if matches else None


def encode_span(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], spans: Sequence[tuple[int, int]]) -> tuple[list[list[int]], list[list[int]]]:
    """(ids, labels) of each text: its :func:`encode` ids (bos, eos) and labels that score only the
    tokens whose characters overlap the text's span [start, end) (a fast tokenizer's offsets), IGNORE
    elsewhere (bos and eos included)."""
    enc = tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True)
    first, end = _specials(tokenizer, True, True)
    ids, labels = [], []
    for x, offsets, (a, b) in zip(enc["input_ids"], enc["offset_mapping"], spans):
        ids.append(first + x + end)
        labels.append([IGNORE] * len(first) + [t if s < b and e > a else IGNORE for t, (s, e) in zip(x, offsets)] + [IGNORE] * len(end))
    return ids, labels


def pad_row(ids: Sequence[int], seq_len: int, pad_id: int, labels: Sequence[int] | None = None) -> dict[str, list[int]]:
    """One row of ``seq_len``: ``ids`` truncated or right-padded; ``labels`` default to ``ids``."""
    ids = list(ids[:seq_len])
    labels = list(ids if labels is None else labels[:seq_len])
    pad = seq_len - len(ids)
    return {"input_ids": ids + [pad_id] * pad, "attention_mask": [1] * len(ids) + [0] * pad, "labels": labels + [IGNORE] * pad}


def pack(sequences: Sequence[Sequence[int]], seq_len: int, pad_id: int) -> list[dict[str, list[int]]]:
    """Concatenate ``sequences`` and cut into rows of ``seq_len``; the last row is padded."""
    flat = [t for seq in sequences for t in seq]
    return [pad_row(flat[i : i + seq_len], seq_len, pad_id) for i in range(0, len(flat), seq_len)]


ROW_FIELDS = ("input_ids", "attention_mask", "labels")


def _columns(rows: list[dict[str, list[int]]]) -> dict[str, list[list[int]]]:
    return {k: [r[k] for r in rows] for k in ROW_FIELDS}


def tokenize_text(ds, tokenizer: PreTrainedTokenizerBase, seq_len: int, packed: bool, num_proc: int | None = None):
    """``text`` records to rows of ``seq_len``: packed across documents, or one padded (and
    truncated) row per document. Map-style results are cached by ``datasets``."""
    pad_id = tokenizer.pad_token_id

    def fn(batch):
        seqs = encode(tokenizer, batch["text"])
        rows = pack(seqs, seq_len, pad_id) if packed else [pad_row(s, seq_len, pad_id) for s in seqs]
        return _columns(rows)

    kwargs = {"num_proc": num_proc, "desc": "tokenize"} if isinstance(ds, datasets.Dataset) else {}
    return ds.map(fn, batched=True, remove_columns=["text"], **kwargs)


def tokenize_pairs(ds, tokenizer: PreTrainedTokenizerBase, seq_len: int, num_proc: int | None = None) -> datasets.Dataset:
    """``lm_pair`` records to padded rows whose labels score only the target (and eos)."""
    pad_id = tokenizer.pad_token_id

    def fn(batch):
        prompts = encode(tokenizer, batch["prompt"], eos=False)
        targets = encode(tokenizer, batch["target"], bos=False)
        rows = [pad_row(p + t, seq_len, pad_id, [IGNORE] * len(p) + t) for p, t in zip(prompts, targets)]
        return _columns(rows)

    return ds.map(fn, batched=True, remove_columns=["prompt", "target"], num_proc=num_proc, desc="tokenize")


def tokenize_groups(ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, num_proc: int | None = None) -> datasets.Dataset:
    """``facts`` / ``documents`` records to ``ids``: the token ids of each training text of the
    record (its paraphrases or augmentations; the fact or document itself when there are none)."""
    main, variants = ("fact", "paraphrases") if "fact" in ds.column_names else ("document", "augmentations")

    def fn(batch):
        return {"ids": [encode(tokenizer, list(v) or [m]) for m, v in zip(batch[main], batch[variants])]}

    return ds.map(fn, batched=True, remove_columns=ds.column_names, num_proc=num_proc, desc="tokenize")


def tokenize_answers(ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, where: str, num_proc: int | None = None) -> datasets.Dataset:
    """``facts`` records to ``ids`` and ``labels``: per training text (as :func:`tokenize_groups`
    picks them), its token ids and labels that score only the tokens of the record's answer (its
    last case-insensitive occurrence, :func:`answer_span`). A text without its answer raises
    :class:`DataError` naming ``where`` (the source), the record index and the text."""

    def fn(batch, indices):
        ids, labels = [], []
        for i, fact, paraphrases, answer in zip(indices, batch["fact"], batch["paraphrases"], batch["answer"]):
            texts = list(paraphrases) or [fact]
            spans = [answer_span(text, answer) for text in texts]
            if None in spans:
                raise DataError(f"{where}: record {i}: the answer {answer!r} is not in the text {texts[spans.index(None)]!r}")
            x, y = encode_span(tokenizer, texts, spans)
            ids.append(x)
            labels.append(y)
        return {"ids": ids, "labels": labels}

    return ds.map(fn, batched=True, with_indices=True, remove_columns=ds.column_names, num_proc=num_proc, desc="tokenize")


def collate(rows: dict[str, list[list[int]]]) -> dict[str, torch.Tensor]:
    """Columnar rows (as ``Dataset.__getitem__`` returns them) to a batch of long tensors [B, S]."""
    return {k: torch.tensor(rows[k], dtype=torch.long) for k in ROW_FIELDS}


def collate_rows(rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    """Rows as :func:`pad_row` makes them to a batch of long tensors [B, S]."""
    return collate(_columns(rows))
