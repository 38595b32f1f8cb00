"""Environment check: ``python -m smft_dist.doctor``."""
print("doctor placeholder")
