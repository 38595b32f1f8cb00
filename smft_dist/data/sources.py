"""Record sources: local jsonl / parquet / text files or hub datasets, loaded with HF ``datasets``
and converted to one canonical schema (:mod:`smft_dist.data.schemas`).

A malformed local jsonl file (bad JSON, a missing or null field) or a jsonl / text file with bytes
that are not UTF-8 raises :class:`DataError` naming the file and line.
"""

from __future__ import annotations

import codecs
import glob
import json
from pathlib import Path

import datasets
import pyarrow.parquet as pq

from smft_dist.config import SourceConfig
from smft_dist.data import hub_formats
from smft_dist.data.schemas import FIELDS, DataError

_SUFFIX_FORMAT = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".txt": "text", ".text": "text"}
UTF8_CHUNK = 16 << 20  # bytes decoded at a time by check_utf8


def load_records(src: SourceConfig, want: str, cache_dir: str | None = None) -> datasets.Dataset | datasets.IterableDataset:
    """Load ``src`` and return it in the canonical schema ``want`` (columns exactly ``FIELDS[want]``)."""
    if want not in FIELDS:
        raise ValueError(f"unknown schema {want!r}")
    raw_fields = hub_formats.raw_fields(src.schema, want)
    fmt = resolve_format(src)
    if fmt == "hub":
        ds = datasets.load_dataset(src.path, src.name, split=src.split, streaming=src.streaming, cache_dir=cache_dir)
        _check_columns(ds, raw_fields, src.path)
    else:
        files = resolve_files(src.path)
        ds = _load_local(files, fmt, raw_fields, src.streaming, cache_dir)
    if src.max_examples is not None:
        ds = ds.take(src.max_examples) if isinstance(ds, datasets.IterableDataset) else ds.select(range(min(src.max_examples, len(ds))))
    return hub_formats.convert(ds, src.schema, want)


def resolve_format(src: SourceConfig) -> str:
    """``src.format``, or for ``auto`` the file suffix (``hub`` when the path is no local file)."""
    if src.format != "auto":
        return src.format
    files = glob.glob(src.path) if any(c in src.path for c in "*?[") else [src.path]
    p = Path(files[0]) if files else Path(src.path)
    if p.is_dir():
        p = next((f for f in sorted(p.iterdir()) if f.suffix in _SUFFIX_FORMAT), p)
    if p.exists():
        if p.suffix not in _SUFFIX_FORMAT:
            raise DataError(f"{p}: cannot tell the format from the suffix; set format to jsonl, parquet or text")
        return _SUFFIX_FORMAT[p.suffix]
    return "hub"


def resolve_files(path: str) -> list[str]:
    """The data files behind a local file, directory (its data files, sorted) or glob."""
    p = Path(path)
    if p.is_dir():
        files = sorted(str(f) for f in p.iterdir() if f.suffix in _SUFFIX_FORMAT)
    else:
        files = sorted(glob.glob(path))
    if not files:
        raise DataError(f"{path}: no data files found")
    return files


def _load_local(files: list[str], fmt: str, fields: tuple[str, ...], streaming: bool, cache_dir: str | None):
    builder = {"jsonl": "json", "parquet": "parquet", "text": "text"}[fmt]
    if fmt != "parquet":  # pyarrow's UnicodeDecodeError names neither file nor line
        for f in files:
            check_utf8(f)
    try:
        ds = datasets.load_dataset(builder, data_files=files, split="train", streaming=streaming, cache_dir=cache_dir)
        if not streaming:
            if len(ds) == 0:
                raise DataError(f"{', '.join(files)}: has no records")
            _check_columns(ds, fields, ", ".join(files))
        return ds
    except Exception as e:  # find the file (and line) at fault, outside this handler
        failure = e
    empty = [f for f in files if _has_no_records(f, fmt)]
    if empty:
        raise DataError(f"{empty[0]}: has no records") from None
    check = {"jsonl": check_jsonl, "parquet": _check_parquet}.get(fmt)
    for f in files if check else ():
        check(f, fields)
    if isinstance(failure, DataError):
        raise failure
    raise DataError(f"{', '.join(files)}: {type(failure).__name__}: {failure}".splitlines()[0]) from failure


def _has_no_records(path: str, fmt: str) -> bool:
    """The file is empty, blank, or a parquet file of zero rows."""
    if fmt == "parquet":
        return Path(path).stat().st_size == 0 or pq.ParquetFile(path).metadata.num_rows == 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            if chunk.strip():
                return False
    return True


def _check_columns(ds, fields: tuple[str, ...], where: str) -> None:
    """Every field is a column and (map-style) has no nulls."""
    columns = ds.column_names
    if columns is None:  # a streamed hub dataset whose features are unknown until read
        return
    for name in fields:
        if name not in columns:
            raise DataError(f"{where}: missing field {name!r} (columns: {', '.join(columns)})")
        if isinstance(ds, datasets.Dataset) and ds.data.column(name).null_count:
            raise DataError(f"{where}: field {name!r} is null in some records")


def check_utf8(path: str) -> None:
    """Raise :class:`DataError` ``path:line: not UTF-8 ...`` at the first byte that is not UTF-8."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    with open(path, "rb") as fh:
        try:
            while chunk := fh.read(UTF8_CHUNK):
                decoder.decode(chunk)
            decoder.decode(b"", final=True)
            return
        except UnicodeDecodeError:
            pass
        fh.seek(0)  # find the line: a newline byte is never part of a multi-byte sequence
        for lineno, line in enumerate(fh, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 (byte 0x{line[e.start]:02x} at column {e.start + 1}); "
                                "re-encode the file as UTF-8") from None


def check_jsonl(path: str, fields: tuple[str, ...]) -> None:
    """Raise :class:`DataError` ``path:line: ...`` at the first bad JSON line or missing/null field."""
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            for name in fields:
                if record.get(name) is None:
                    raise DataError(f"{path}:{lineno}: missing field {name!r}")


def _check_parquet(path: str, fields: tuple[str, ...]) -> None:
    table = pq.read_table(path)
    for name in fields:
        if name not in table.column_names:
            raise DataError(f"{path}: missing field {name!r}")
        column = table.column(name)
        if column.null_count:
            row = next(i for i, v in enumerate(column.is_null().to_pylist()) if v)
            raise DataError(f"{path}: row {row}: field {name!r} is null")
