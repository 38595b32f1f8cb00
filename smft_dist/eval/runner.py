"""Held-out evaluation of a causal LM: QA exact match / F1 by greedy generation, multiple-choice
log-likelihood accuracy, NLL and perplexity.

``model`` is any HF-style causal LM callable: ``model(input_ids=, attention_mask=)`` returning an
object with ``.logits`` [B, S, V] (or the logits tensor). Sequences are right-padded, so a causal
model needs no position handling. Under ``torch.distributed`` each rank evaluates examples
``rank::world`` and the sums are all-reduced, so every rank returns the same numbers, equal to a
single-process run. With ``shard=False`` every rank evaluates everything in lockstep instead: a
model whose forward is itself collective (row-sharded value tables) needs every rank to run the
same forwards with the same shapes.
"""

from __future__ import annotations

import math
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
from smft_dist.eval.metrics import exact_match, token_f1

Model = Callable[..., object]


def _rank_world(shard: bool = True) -> tuple[int, int]:
    """This process's (rank, world) for splitting examples; (0, 1) when not sharding."""
    if shard and dist.is_available() and dist.is_initialized():
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


def all_reduce_sums(values: Sequence[float], device: torch.device, shard: bool = True) -> list[float]:
    """Sum ``values`` over ranks in fp64 on ``device`` (the model's: NCCL reduces CUDA tensors only);
    the identity without a process group or when not sharding."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if shard and _group_up():
        dist.all_reduce(t)
    return t.tolist()


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


@torch.no_grad()
def greedy_generate(
    model: Model, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], max_new_tokens: int, stop: str = "\n",
    lockstep: bool = False,
) -> list[str]:
    """Greedy continuations of ``prompts``, each cut at eos or at the first ``stop`` string.
    ``lockstep``: stop early only when every rank is done (collective forwards)."""
    device = _device(model)
    seqs = encode(tokenizer, prompts, eos=False)
    lengths = [len(s) for s in seqs]
    width = max(lengths) + max_new_tokens
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    new: list[list[int]] = [[] for _ in seqs]
    done = [False] * len(seqs)
    for _ in range(max_new_tokens):
        cur = max(lengths)
        logits = logits_of(model, ids[:, :cur].to(device), mask[:, :cur].to(device))
        nxt = logits[torch.arange(len(seqs)), torch.tensor(lengths) - 1].argmax(-1).tolist()
        for i, tok in enumerate(nxt):
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
    return [tokenizer.decode(n, skip_special_tokens=True).split(stop)[0].strip() for n in new]


def evaluate_qa(
    model: Model, tokenizer: PreTrainedTokenizerBase, records: datasets.Dataset, *, prompt: str, batch_size: int,
    max_new_tokens: int, shard: bool = True,
) -> dict[str, float]:
    """Exact match and token F1 (max over gold answers) of greedy answers to ``qa`` records."""
    rank, world = _rank_world(shard)
    part = records.select(range(rank, len(records), world))
    em = f1 = 0.0
    for start in range(0, len(part), batch_size):
        chunk = part[start : start + batch_size]
        prompts = [prompt.format(question=q) for q in chunk["question"]]
        preds = greedy_generate(model, tokenizer, prompts, max_new_tokens, lockstep=not shard)
        for pred, answers in zip(preds, chunk["answers"]):
            em += exact_match(pred, answers)
            f1 += token_f1(pred, answers)
    em, f1, n = all_reduce_sums([em, f1, len(part)], _device(model), shard)
    return {"em": em / max(n, 1), "f1": f1 / max(n, 1), "count": n}


@torch.no_grad()
def evaluate_choice(
    model: Model, tokenizer: PreTrainedTokenizerBase, records: datasets.Dataset, *, batch_size: int, norm: str = "chars",
    shard: bool = True,
) -> dict[str, float]:
    """Accuracy of picking the ending with the highest log-likelihood given the context,
    normalized by the ending's characters (``chars``, HellaSwag acc_norm), tokens, or ``none``."""
    rank, world = _rank_world(shard)
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
    for start in range(0, len(rows), batch_size):
        logprob, _ = sequence_logprobs(model, _pad_batch(rows[start : start + batch_size], tokenizer.pad_token_id))
        for i, lp in enumerate(logprob.tolist(), start):
            scores[owners[i]].append(lp / max(lengths[i], 1))
    correct = sum(max(range(len(s)), key=s.__getitem__) == label for s, label in zip(scores, part["label"]))
    correct, n = all_reduce_sums([correct, len(part)], _device(model), shard)
    return {"acc": correct / max(n, 1), "count": n}


@torch.no_grad()
def evaluate_nll(model: Model, rows: datasets.Dataset, *, batch_size: int, shard: bool = True) -> dict[str, float]:
    """Mean NLL per scored token (nats) and perplexity over tokenized rows (input_ids, attention_mask, labels)."""
    rank, world = _rank_world(shard)
    part = rows.select(range(rank, len(rows), world))
    total = tokens = 0.0
    for start in range(0, len(part), batch_size):
        logprob, count = sequence_logprobs(model, collate(part[start : start + batch_size]))
        total -= logprob.sum().item()
        tokens += count.sum().item()
    total, tokens = all_reduce_sums([total, tokens], _device(model), shard)
    nll = total / max(tokens, 1)
    return {"nll": nll, "ppl": math.exp(min(nll, 700.0)), "tokens": tokens}


def _materialize(ds) -> datasets.Dataset:
    return datasets.Dataset.from_list(list(ds)) if isinstance(ds, datasets.IterableDataset) else ds


def run_task(
    model: Model, tokenizer: PreTrainedTokenizerBase, task: EvalTaskConfig, cfg: EvalConfig, cache_dir: str | None = None,
    shard: bool = True,
) -> dict[str, float]:
    """One evaluation task; its metrics by name."""
    src = task.source
    if src.streaming and src.max_examples is None:
        raise DataError(f"{src.path}: a streamed evaluation source needs max_examples")
    if task.kind == "qa":
        records = _materialize(load_records(src, "qa", cache_dir))
        return evaluate_qa(model, tokenizer, records, prompt=cfg.qa_prompt, batch_size=cfg.batch_size,
                           max_new_tokens=cfg.max_new_tokens, shard=shard)
    if task.kind == "choice":
        return evaluate_choice(model, tokenizer, _materialize(load_records(src, "choice", cache_dir)), batch_size=cfg.batch_size,
                               norm=cfg.choice_norm, shard=shard)
    if src.schema in ("lm_pair", "gsm8k"):
        rows = tokenize_pairs(_materialize(load_records(src, "lm_pair", cache_dir)), tokenizer, task.seq_len)
    else:
        rows = tokenize_text(_materialize(load_records(src, "text", cache_dir)), tokenizer, task.seq_len, packed=True)
    return evaluate_nll(model, rows, batch_size=cfg.batch_size, shard=shard)


def run_eval(
    model: Model, tokenizer: PreTrainedTokenizerBase, cfg: EvalConfig, cache_dir: str | None = None, shard: bool = True
) -> dict[str, float]:
    """Every task of ``cfg``, results keyed ``task/metric``; the model is in eval mode meanwhile.
    ``shard=False``: every rank evaluates every example in lockstep (collective forwards)."""
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        return {f"{task.name}/{k}": v for task in cfg.tasks for k, v in run_task(model, tokenizer, task, cfg, cache_dir, shard).items()}
    finally:
        if was_training:
            model.train()
