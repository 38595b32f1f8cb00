"""Held-out evaluation of a causal LM: QA exact match / F1 by greedy generation, multiple-choice
log-likelihood accuracy, NLL and perplexity.

``model`` is any HF-style causal LM callable: ``model(input_ids=, attention_mask=)`` returning an
object with ``.logits`` [B, S, V] (or the logits tensor). Sequences are right-padded, so a causal
model needs no position handling; greedy generation of the smft :class:`Transformer` reads through
a KV cache. Under ``torch.distributed`` each rank evaluates examples ``rank::world`` and the sums
are all-reduced, so every rank returns the same numbers, equal to a single-process run. With
``lockstep`` (a model whose forward is itself collective: row-sharded value tables) every rank also
runs the same number of forwards with the same shapes: batches are padded to ``batch_size`` rows
and to the widest rank's width with rows that read and score nothing.

With ``answers_dir``, :func:`run_eval` also writes what the model answered, one line per example in
the task's order (``<answers_dir>/<task>.jsonl``; qa: the greedy answer and its scores, choice: the
picked ending), so which facts a run lost or learned can be read off, not only how many
(``python -m smft_dist.eval.answer_changes``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Sequence

import datasets
import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from smft_dist.config import EvalConfig, EvalTaskConfig
from smft_dist.data.packing import IGNORE, collate, collate_rows, encode, pad_row, tokenize_pairs, tokenize_text
from smft_dist.data.schemas import DataError
from smft_dist.data.sources import load_records
from smft_dist.eval.qa_metrics import contains_answer, exact_match, token_f1
from smft_dist.model.transformer import KVCache, Transformer

Model = Callable[..., object]


def _rank_world() -> tuple[int, int]:
    """This process's (rank, world) for splitting examples; (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _group_up() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_ranks_true(flag: bool, device: torch.device) -> bool:
    """``flag`` and-ed over all ranks (a collective when a process group is up). ``device``: where
    the collective's tensor lives, the model's (NCCL reduces CUDA tensors only)."""
    if not _group_up():
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def all_reduce_sums(values: Sequence[float], device: torch.device) -> list[float]:
    """Sum ``values`` over ranks in fp64 on ``device`` (the model's: NCCL reduces CUDA tensors only);
    the identity without a process group."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if _group_up():
        dist.all_reduce(t)
    return t.tolist()


def _max_over_ranks(values: Sequence[int], device: torch.device, lockstep: bool) -> list[int]:
    """Element-wise max over ranks in ``lockstep`` (shapes every rank must share), else ``values``."""
    if not lockstep or _rank_world()[1] == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def _lockstep_batch(batch: dict[str, torch.Tensor] | None, batch_size: int, device: torch.device, lockstep: bool):
    """In ``lockstep``: ``batch`` (None: this rank has run out of rows) right-padded to ``batch_size``
    rows and the widest rank's width with padding that reads and scores nothing; else ``batch``."""
    if not lockstep:
        return batch
    width = _max_over_ranks([batch["input_ids"].shape[1] if batch else 1], device, lockstep)[0]
    out = {}
    for key, fill in (("input_ids", 0), ("attention_mask", 0), ("labels", IGNORE)):
        t = torch.full((batch_size, width), fill, dtype=torch.long)
        if batch:
            t[: batch[key].shape[0], : batch[key].shape[1]] = batch[key]
        out[key] = t
    return out


def _batch_starts(num_rows: int, batch_size: int, device: torch.device, lockstep: bool) -> range:
    """Offsets of this rank's batches; in ``lockstep`` as many as the rank with the most rows needs."""
    n = _max_over_ranks([-(-num_rows // batch_size)], device, lockstep)[0]
    return range(0, n * batch_size, batch_size)


def _device(model: Model) -> torch.device:
    params = model.parameters() if hasattr(model, "parameters") else iter(())
    return next(params, torch.empty(0)).device


def logits_of(model: Model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=input_ids, attention_mask=attention_mask)
    return out if isinstance(out, torch.Tensor) else out.logits


def sequence_logprobs(model: Model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the summed log-probability of the scored tokens (labels != -100, each predicted
    from the tokens before it) and their number."""
    device = _device(model)
    logits = logits_of(model, batch["input_ids"].to(device), batch["attention_mask"].to(device)).float()
    targets = batch["labels"][:, 1:].to(device)
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="none")
    scored = targets != IGNORE
    return -(nll.view_as(targets).double() * scored).sum(1).cpu(), scored.sum(1).cpu()


def _pad_batch(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """(ids, labels) pairs right-padded to the longest."""
    width = max(len(ids) for ids, _ in rows)
    return collate_rows([pad_row(ids, width, pad_id, labels) for ids, labels in rows])


def _cached_transformer(model: Model) -> Transformer | None:
    """The smft Transformer inside ``model`` (itself or an HF wrapper's ``.model``): it decodes with a KV cache."""
    base = model if isinstance(model, Transformer) else getattr(model, "model", None)
    return base if isinstance(base, Transformer) else None


@torch.no_grad()
def greedy_generate(
    model: Model, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], max_new_tokens: int, stop: str = "\n",
    lockstep: bool = False, rows: int | None = None,
) -> list[str]:
    """Greedy continuations of ``prompts``, each cut at eos or at the first ``stop`` string.

    The smft Transformer reads the prompts once and then one token per step through a KV cache;
    other models re-read the prefix every step. ``lockstep`` (collective forwards; the smft
    Transformer only): every rank runs ``rows`` rows (padded with empty ones) of the widest rank's
    prompt width, and stops only when every rank is done.
    """
    device = _device(model)
    seqs = encode(tokenizer, prompts, eos=False) if prompts else []
    real = len(seqs)
    cached = _cached_transformer(model)
    if lockstep:
        if cached is None:
            raise ValueError("greedy_generate: lockstep decoding needs the smft Transformer (KV cache)")
        seqs += [[] for _ in range((rows or real) - real)]  # empty rows: all padding, done from the start
    lengths = [len(s) for s in seqs]
    width = _max_over_ranks([max(lengths, default=1)], device, lockstep)[0]
    ids = torch.full((len(seqs), width + max_new_tokens), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    new: list[list[int]] = [[] for _ in seqs]
    done = [i >= real for i in range(len(seqs))]
    cache = KVCache() if cached is not None else None
    for step in range(max_new_tokens):
        if cache is None:
            cur = max(lengths)
            logits = logits_of(model, ids[:, :cur].to(device), mask[:, :cur].to(device))
            last = logits[torch.arange(len(seqs)), torch.tensor(lengths) - 1]
        elif step == 0:  # the prompts, right-padded
            logits = cached(ids[:, :width].to(device), mask[:, :width].to(device), cache=cache)
            last = logits[torch.arange(len(seqs)), torch.tensor(lengths) - 1]
        else:  # each row's latest token; finished rows feed padding
            live = torch.tensor([[not d] for d in done])
            fed = torch.tensor([[new[i][-1] if not d else tokenizer.pad_token_id] for i, d in enumerate(done)])
            last = cached(fed.to(device), live.long().to(device), cache=cache)[:, 0]
        for i, tok in enumerate(last.argmax(-1).tolist()):
            if done[i]:
                continue
            if tok == tokenizer.eos_token_id:
                done[i] = True
                continue
            ids[i, lengths[i]], mask[i, lengths[i]] = tok, 1
            lengths[i] += 1
            new[i].append(tok)
            done[i] = stop in tokenizer.decode(new[i])
        if (_all_ranks_true(all(done), device) if lockstep else all(done)):
            break
    return [tokenizer.decode(n, skip_special_tokens=True).split(stop)[0].strip() for n in new[:real]]


def evaluate_qa(
    model: Model, tokenizer: PreTrainedTokenizerBase, records: datasets.Dataset, *, prompt: str, batch_size: int,
    max_new_tokens: int, lockstep: bool = False, answers: list[dict] | None = None,
) -> dict[str, float]:
    """Exact match, token F1 (max over gold answers) and answer containment (a gold answer's words
    inside the answer: format-free) of greedy answers to ``qa`` records; ``answers`` collects this
    rank's examples (index, question, gold answers, the answer, its scores)."""
    rank, world = _rank_world()
    part = records.select(range(rank, len(records), world))
    em = f1 = contains = 0.0
    for start in _batch_starts(len(part), batch_size, _device(model), lockstep):
        chunk = part[start : start + batch_size]
        prompts = [prompt.format(question=q) for q in chunk["question"]]
        preds = greedy_generate(model, tokenizer, prompts, max_new_tokens, lockstep=lockstep, rows=batch_size)
        for i, (question, pred, golds) in enumerate(zip(chunk["question"], preds, chunk["answers"])):
            scores = {"em": exact_match(pred, golds), "f1": token_f1(pred, golds), "contains": contains_answer(pred, golds)}
            em, f1, contains = em + scores["em"], f1 + scores["f1"], contains + scores["contains"]
            if answers is not None:
                answers.append({"index": rank + (start + i) * world, "question": question, "answers": golds, "prediction": pred, **scores})
    em, f1, contains, n = all_reduce_sums([em, f1, contains, len(part)], _device(model))
    return {"em": em / max(n, 1), "f1": f1 / max(n, 1), "contains": contains / max(n, 1), "count": n}


@torch.no_grad()
def evaluate_choice(
    model: Model, tokenizer: PreTrainedTokenizerBase, records: datasets.Dataset, *, batch_size: int, norm: str = "chars",
    lockstep: bool = False, answers: list[dict] | None = None,
) -> dict[str, float]:
    """Accuracy of picking the ending with the highest log-likelihood given the context,
    normalized by the ending's characters (``chars``, HellaSwag acc_norm), tokens, or ``none``;
    ``answers`` collects this rank's examples (index, context, label, the picked ending)."""
    rank, world = _rank_world()
    part = records.select(range(rank, len(records), world))
    rows, owners, lengths = [], [], []
    for ex, (context, endings, label) in enumerate(zip(part["context"], part["endings"], part["label"])):
        if not 0 <= label < len(endings):
            raise DataError(f"choice record {rank + ex * world}: label {label} is not an index into its {len(endings)} endings")
        ctx = encode(tokenizer, [context], eos=False)[0]
        for ending, end_ids in zip(endings, encode(tokenizer, endings, bos=False, eos=False)):
            rows.append((ctx + end_ids, [IGNORE] * len(ctx) + end_ids))
            owners.append(ex)
            lengths.append({"chars": len(ending), "tokens": len(end_ids), "none": 1}[norm])
    scores: list[list[float]] = [[] for _ in range(len(part))]
    device = _device(model)
    for start in _batch_starts(len(rows), batch_size, device, lockstep):
        chunk = rows[start : start + batch_size]
        batch = _lockstep_batch(_pad_batch(chunk, tokenizer.pad_token_id) if chunk else None, batch_size, device, lockstep)
        logprob, _ = sequence_logprobs(model, batch)
        for i, lp in enumerate(logprob.tolist()[: len(chunk)], start):
            scores[owners[i]].append(lp / max(lengths[i], 1))
    picked = [max(range(len(s)), key=s.__getitem__) for s in scores]
    correct = sum(p == label for p, label in zip(picked, part["label"]))
    if answers is not None:
        answers.extend({"index": rank + j * world, "context": context, "label": label, "picked": p, "correct": p == label}
                       for j, (context, label, p) in enumerate(zip(part["context"], part["label"], picked)))
    correct, n = all_reduce_sums([correct, len(part)], _device(model))
    return {"acc": correct / max(n, 1), "count": n}


@torch.no_grad()
def evaluate_nll(model: Model, rows: datasets.Dataset, *, batch_size: int, lockstep: bool = False) -> dict[str, float]:
    """Mean NLL per scored token (nats) and perplexity over tokenized rows (input_ids, attention_mask, labels)."""
    rank, world = _rank_world()
    part = rows.select(range(rank, len(rows), world))
    total = tokens = 0.0
    device = _device(model)
    for start in _batch_starts(len(part), batch_size, device, lockstep):
        chunk = part[start : start + batch_size]
        batch = _lockstep_batch(collate(chunk) if chunk["input_ids"] else None, batch_size, device, lockstep)
        logprob, count = sequence_logprobs(model, batch)
        total -= logprob.sum().item()
        tokens += count.sum().item()
    total, tokens = all_reduce_sums([total, tokens], _device(model))
    nll = total / max(tokens, 1)
    return {"nll": nll, "ppl": math.exp(min(nll, 700.0)), "tokens": tokens}


def _materialize(ds) -> datasets.Dataset:
    return datasets.Dataset.from_list(list(ds)) if isinstance(ds, datasets.IterableDataset) else ds


def run_task(
    model: Model, tokenizer: PreTrainedTokenizerBase, task: EvalTaskConfig, cfg: EvalConfig, cache_dir: str | None = None,
    lockstep: bool = False, answers: list[dict] | None = None,
) -> dict[str, float]:
    """One evaluation task; its metrics by name. ``answers`` collects this rank's examples of a qa or
    choice task."""
    src = task.source
    if src.streaming and src.max_examples is None:
        raise DataError(f"{src.path}: a streamed evaluation source needs max_examples")
    if task.kind == "qa":
        records = _materialize(load_records(src, "qa", cache_dir))
        return evaluate_qa(model, tokenizer, records, prompt=cfg.qa_prompt, batch_size=cfg.batch_size,
                           max_new_tokens=cfg.max_new_tokens, lockstep=lockstep, answers=answers)
    if task.kind == "choice":
        return evaluate_choice(model, tokenizer, _materialize(load_records(src, "choice", cache_dir)), batch_size=cfg.batch_size,
                               norm=cfg.choice_norm, lockstep=lockstep, answers=answers)
    if src.schema in ("lm_pair", "gsm8k"):
        rows = tokenize_pairs(_materialize(load_records(src, "lm_pair", cache_dir)), tokenizer, task.seq_len)
    else:
        rows = tokenize_text(_materialize(load_records(src, "text", cache_dir)), tokenizer, task.seq_len, packed=True)
    return evaluate_nll(model, rows, batch_size=cfg.batch_size, lockstep=lockstep)


def write_answers(path: Path, answers: list[dict]) -> None:
    """Gather every rank's examples and write them, in the task's order, as JSON lines (rank 0)."""
    if _group_up() and dist.get_world_size() > 1:
        parts: list[list[dict] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, answers)
        answers = [a for part in parts for a in part]
    if _rank_world()[0] == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(a) + "\n" for a in sorted(answers, key=lambda a: a["index"])))


def run_eval(
    model: Model, tokenizer: PreTrainedTokenizerBase, cfg: EvalConfig, cache_dir: str | None = None, lockstep: bool = False,
    answers_dir: str | Path | None = None,
) -> dict[str, float]:
    """Every task of ``cfg``, results keyed ``task/metric``; the model is in eval mode meanwhile.
    ``lockstep``: the model's forward is collective, so every rank runs equal-shaped batches.
    ``answers_dir``: also write each qa and choice task's answers there (collective)."""
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        results = {}
        for task in cfg.tasks:
            answers = [] if answers_dir is not None and task.kind in ("qa", "choice") else None
            results.update({f"{task.name}/{k}": v for k, v in run_task(model, tokenizer, task, cfg, cache_dir, lockstep, answers).items()})
            if answers is not None:
                write_answers(Path(answers_dir) / f"{task.name}.jsonl", answers)
        return results
    finally:
        if was_training:
            model.train()
