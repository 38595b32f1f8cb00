"""Tokenizers: train a small byte-level BPE in HF format, or load any HF tokenizer from a path."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from smft_dist.config import ConfigError

PAD, BOS, EOS = "<pad>", "<s>", "</s>"


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE (with ``<pad>``, ``<s>``, ``</s>``) on ``texts``; save it to ``out_dir``.

    The saved directory loads with ``AutoTokenizer.from_pretrained(out_dir)``. Any byte sequence is
    encodable (the 256 byte symbols are always in the vocabulary), so ``vocab_size`` must be > 259.
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size <= len(alphabet) + 3:
        raise ConfigError(f"vocab_size={vocab_size} must exceed the {len(alphabet)} byte symbols + 3 special tokens")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS], initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS)
    fast.save_pretrained(str(out_dir))
    return fast


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Any HF tokenizer from a local directory (or hub name); a missing pad token becomes eos."""
    if not str(path):
        raise ConfigError("data.tokenizer: not set (a local tokenizer directory or a hub name)")
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"data.tokenizer: cannot load {path!r} ({first})") from None
    if tok.eos_token_id is None:
        raise ConfigError(f"data.tokenizer: {path} has no eos token")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok
