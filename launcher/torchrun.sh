#!/usr/bin/env bash
# Single-node multi-process run with torchrun.
#   NPROC=2 bash launcher/torchrun.sh configs/quickstart_pretrain.yaml [key=value ...]
# NPROC defaults to the GPU count (or 2 on CPU, gloo). Multi-node: see slurm/torchrun.sbatch.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG="${1:?usage: launcher/torchrun.sh CONFIG [key=value ...]}"; shift
if [[ -z "${NPROC:-}" ]]; then
  NPROC=$(.venv/bin/python -c "import torch; print(torch.cuda.device_count() or 2)")
fi
.venv/bin/python -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" || export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
exec .venv/bin/torchrun --standalone --nproc-per-node "$NPROC" -m smft_dist.train --config "$CONFIG" "$@"
