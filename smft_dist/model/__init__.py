"""Memory-layer language model."""

from smft_dist.model.memory import MemoryLayer, product_key_topk
from smft_dist.model.transformer import Transformer, lm_loss
from smft_dist.model.value_table import LocalValueTable, ValueTable

__all__ = ["LocalValueTable", "MemoryLayer", "Transformer", "ValueTable", "lm_loss", "product_key_topk"]
