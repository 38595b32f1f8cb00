"""Batch streams for training: deterministic, resumable, sharded over data-parallel ranks.

A stream yields batches ``{input_ids, attention_mask, labels}`` (long [b, S], b = the global
``batch_size`` / world size) for one epoch per ``iter()``; the next ``iter()`` runs the next epoch.
``state_dict()`` taken after a batch resumes with the batch after it.

* text, map-style: rows (packed or padded) in a seeded per-epoch order; global batch ``k`` is rows
  ``order[k*B:(k+1)*B]`` and rank ``r`` takes the ``r``-th slice of it, so W ranks with batch b see
  exactly what one rank with batch W*b sees. A last incomplete global batch is dropped.
* text, streaming: the ``IterableDataset`` is split with ``split_dataset_by_node``; each rank
  batches its own shard and resumes through the dataset's own ``state_dict`` (a shuffle buffer is
  refilled on resume, so exact resume needs ``shuffle: false``).
* facts / documents: one record per batch, in file order unless ``shuffle``; its texts are cycled to
  ``batch_size`` rows, each padded (never packed) to ``seq_len``; rank ``r`` takes the ``r``-th
  slice of the rows. Under ``score: answer`` (facts) a row's labels score only the answer's tokens.
"""

from __future__ import annotations

from typing import Callable, Iterator

import datasets
import torch
from datasets.distributed import split_dataset_by_node
from transformers import PreTrainedTokenizerBase

from smft_dist.config import ConfigError, StreamConfig
from smft_dist.data.packing import IGNORE, collate, collate_rows, pad_row, tokenize_answers, tokenize_groups, tokenize_text
from smft_dist.data.schemas import DataError
from smft_dist.data.sources import load_records

Batch = dict[str, torch.Tensor]


class IndexedStream:
    """Batches over ``num_records`` indexed records; ``make_batch(indices)`` builds the local batch
    from the record indices of one global batch."""

    def __init__(self, num_records: int, records_per_batch: int, make_batch: Callable[[list[int]], Batch], *, shuffle: bool, seed: int):
        self.num_records = num_records
        self.records_per_batch = records_per_batch
        self.make_batch = make_batch
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.position = 0  # global batches consumed in this epoch

    def __len__(self) -> int:
        return self.num_records // self.records_per_batch

    def order(self, epoch: int) -> list[int]:
        """Record order of ``epoch``: a permutation seeded by (seed, epoch), or file order."""
        if not self.shuffle:
            return list(range(self.num_records))
        return torch.randperm(self.num_records, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)).tolist()

    def __iter__(self) -> Iterator[Batch]:
        order = self.order(self.epoch)
        n = self.records_per_batch
        while self.position < len(self):
            indices = order[self.position * n : (self.position + 1) * n]
            self.position += 1
            yield self.make_batch(indices)
        self.epoch += 1
        self.position = 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


class IterableStream:
    """Batches of ``batch_size`` rows from a (rank-local) streaming dataset of padded rows."""

    def __init__(self, dataset: datasets.IterableDataset, batch_size: int):
        self.dataset = dataset
        self.batch_size = batch_size
        self.epoch = 0

    def __iter__(self) -> Iterator[Batch]:
        self.dataset.set_epoch(self.epoch)
        rows: list[dict] = []
        for row in self.dataset:
            rows.append(row)
            if len(rows) == self.batch_size:
                yield collate_rows(rows)
                rows = []
        self.epoch += 1

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "dataset": self.dataset.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.dataset.load_state_dict(state["dataset"])


def check_answers_fit(groups: datasets.Dataset, seq_len: int, where: str) -> None:
    """Raise :class:`DataError` naming ``where`` and the record at the first text whose scored
    (answer) tokens do not all lie within ``seq_len`` (truncation would drop them from the loss)."""
    for i, labels in enumerate(groups["labels"]):
        for k, row in enumerate(labels):
            scored = [p for p, t in enumerate(row) if t != IGNORE]
            if not scored or scored[-1] >= seq_len:
                raise DataError(f"{where}: record {i}: the answer's tokens in text {k} do not fit in seq_len={seq_len}; raise seq_len")


def build_stream(
    cfg: StreamConfig,
    tokenizer: PreTrainedTokenizerBase,
    *,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    cache_dir: str | None = None,
    num_proc: int | None = None,
) -> IndexedStream | IterableStream:
    """The stream ``cfg`` describes, for data-parallel ``rank`` of ``world_size``.

    Text (and dclm) sources give packed (``cfg.pack``) or padded pretraining rows; facts and
    documents sources give one record in ``cfg.batch_size`` variants per batch, every real token
    scored, or (``cfg.score`` answer) only the answer's (:func:`check_answers_fit` first).
    """
    if cfg.batch_size % world_size:
        raise ConfigError(f"batch_size: {cfg.batch_size} is not divisible by the world size {world_size}")
    local = cfg.batch_size // world_size
    lo, hi = rank * local, (rank + 1) * local
    src = cfg.source
    pad_id = tokenizer.pad_token_id

    if src.schema in ("facts", "documents"):
        if src.streaming:
            raise ConfigError(f"{src.path}: {src.schema} streams are map-style; set streaming: false")
        records = load_records(src, src.schema, cache_dir)
        if cfg.score == "answer":
            groups = tokenize_answers(records, tokenizer, src.path, num_proc)
            check_answers_fit(groups, cfg.seq_len, src.path)
        else:
            groups = tokenize_groups(records, tokenizer, num_proc)

        def make_group_batch(indices: list[int]) -> Batch:
            group = groups[indices[0]]
            ids = group["ids"]
            labels = group.get("labels", [None] * len(ids))  # None: every real token scored
            texts = [j % len(ids) for j in range(lo, hi)]
            return collate_rows([pad_row(ids[k], cfg.seq_len, pad_id, labels[k]) for k in texts])

        stream = IndexedStream(len(groups), 1, make_group_batch, shuffle=cfg.shuffle, seed=seed)
    else:
        records = load_records(src, "text", cache_dir)
        if src.streaming:
            records = split_dataset_by_node(records, rank=rank, world_size=world_size)
            if cfg.shuffle:
                records = records.shuffle(seed=seed, buffer_size=10_000)
            return IterableStream(tokenize_text(records, tokenizer, cfg.seq_len, cfg.pack), local)
        rows = tokenize_text(records, tokenizer, cfg.seq_len, cfg.pack, num_proc)

        def make_row_batch(indices: list[int]) -> Batch:
            return collate(rows[indices[lo:hi]])

        stream = IndexedStream(len(rows), cfg.batch_size, make_row_batch, shuffle=cfg.shuffle, seed=seed)
    if len(stream) == 0:
        raise DataError(f"{src.path}: too little data for one batch of {cfg.batch_size}")
    return stream
