"""Sparse memory finetuning: slot counting, background statistics, top-t selection, methods."""
