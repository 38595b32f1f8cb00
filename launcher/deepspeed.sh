#!/usr/bin/env bash
# Run with the DeepSpeed launcher (reads a hostfile for multi-node; see `deepspeed --help`).
#   NPROC=2 bash launcher/deepspeed.sh configs/quickstart_pretrain.yaml [key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG="${1:?usage: launcher/deepspeed.sh CONFIG [key=value ...]}"; shift
.venv/bin/python -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" || export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
exec .venv/bin/deepspeed ${HOSTFILE:+--hostfile "$HOSTFILE"} --num_gpus "${NPROC:-2}" --no_local_rank \
  --module smft_dist.train --config "$CONFIG" "$@"
