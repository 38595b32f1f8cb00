"""Data: sources, tokenizer, packing / padding, training streams, the synthetic world."""

from __future__ import annotations

from smft_dist.data.schemas import FIELDS, DataError
from smft_dist.data.sources import load_records
from smft_dist.data.streams import IndexedStream, IterableStream, build_stream
from smft_dist.data.tokenizer import load_tokenizer, train_tokenizer

__all__ = ["FIELDS", "DataError", "IndexedStream", "IterableStream", "build_stream", "load_records", "load_tokenizer", "train_tokenizer"]
