"""Memory-layer language model."""

from smft_dist.model.memory import MemoryLayer, product_key_topk
from smft_dist.model.transformer import Transformer, lm_loss
from smft_dist.model.value_table import LocalValueTable, ValueTable
from smft_dist.model.hf import SMFTConfig, SMFTForCausalLM
from smft_dist.model.hf_retrofit import retrofit

__all__ = ["LocalValueTable", "MemoryLayer", "SMFTConfig", "SMFTForCausalLM", "Transformer", "ValueTable", "lm_loss", "product_key_topk", "retrofit"]
