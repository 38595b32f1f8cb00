"""A ``save_pretrained`` directory read piece by piece, so no process holds a whole value table.

:func:`load_dense` builds the model without value tables and loads every other weight;
:func:`saved_value_rows` names a table's tensor in the files as :class:`SavedRows`, which a
row-sharded table reads one row range (its shard) at a time. Single-file and sharded
(``model.safetensors.index.json``) saves are both read.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from safetensors import safe_open

from smft_dist.config import ConfigError
from smft_dist.model.hf import SMFTConfig
from smft_dist.model.transformer import Transformer
from smft_dist.model.value_table import SavedRows

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
PREFIX = "model."  # SMFTForCausalLM.base_model_prefix
TABLES = PREFIX + "value_tables."


def table_key(table_name: str) -> str:
    """The saved tensor name of value table ``table_name``."""
    return f"{TABLES}{table_name}.bag.weight"


def tensor_files(path: str | Path) -> dict[str, Path]:
    """Saved tensor name -> the safetensors file that holds it."""
    path = Path(path)
    if (path / INDEX).is_file():
        return {k: path / f for k, f in json.loads((path / INDEX).read_text())["weight_map"].items()}
    if (path / WEIGHTS).is_file():
        with safe_open(path / WEIGHTS, framework="pt") as f:
            return dict.fromkeys(f.keys(), path / WEIGHTS)
    raise ConfigError(f"{path}: neither {WEIGHTS} nor {INDEX} (not a safetensors save_pretrained directory)")


def load_dense(path: str | Path) -> Transformer:
    """The saved model with its value tables left unbound (no [N, v_dim] tensor is made)."""
    model = Transformer(SMFTConfig.from_pretrained(str(path)).to_model_config(), build_value_tables=False)
    by_file: dict[Path, list[str]] = defaultdict(list)
    for key, file in tensor_files(path).items():
        if key.startswith(PREFIX) and not key.startswith(TABLES):
            by_file[file].append(key)
    state = {}
    for file, keys in by_file.items():
        with safe_open(file, framework="pt") as f:
            state.update({k[len(PREFIX):]: f.get_tensor(k) for k in keys})
    missing, unexpected = model.load_state_dict(state, strict=False)
    if model.cfg.tie_embeddings:
        missing = [k for k in missing if k != "output.weight"]
    if missing or unexpected:
        raise ConfigError(f"{path}: saved weights do not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model


def saved_value_rows(path: str | Path, table_name: str) -> SavedRows:
    """Value table ``table_name`` of the saved model, to be read by row range."""
    key = table_key(table_name)
    file = tensor_files(path).get(key)
    if file is None:
        raise ConfigError(f"{path}: no saved value table {key}")
    with safe_open(file, framework="pt") as f:
        shape = tuple(f.get_slice(key).get_shape())
    return SavedRows(str(file), key, shape)
