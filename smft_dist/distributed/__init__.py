"""Distributed engine: TorchRec row-sharded value tables + a DeepSpeed engine over the dense model.

``env`` (launch environment, process group), ``sharding`` (value tables as TorchRec EBCs),
``weighted_dist`` (score gradients through the sharded lookup), ``dense`` (DeepSpeed),
``parallelize`` (composition + one train step), ``nonfinite`` (NaN/inf loss, gradient and row checks),
``checkpoint`` (DCP + DeepSpeed, checksums, HF export).
"""
