"""Analyses of finished runs (python -m smft_dist.analysis.<name>)."""
