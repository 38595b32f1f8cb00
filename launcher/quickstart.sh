#!/usr/bin/env bash
# Set up, then run the main job on the embedded default (CPU, bundled synthetic data).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launcher/setup.sh
export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m smft_dist.demo --config configs/tiny_cpu.yaml "$@"
