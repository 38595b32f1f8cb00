#!/usr/bin/env bash
# Set up, then run the main job on the embedded default (CPU, bundled synthetic data):
#   1. generate the synthetic world (known facts, new facts, background text) and its tokenizer;
#   2. pretrain a tiny memory model on it (cached in runs/quickstart/pretrain);
#   3. collect background df statistics;
#   4. learn the new facts by sparse memory finetuning, one fact per step;
#   5. print learning (new facts) and forgetting (known facts, held-out text) before vs after.
# Extra key=value arguments go to stage 4, e.g. `method.top_t=128` or `method.name=full_ft sparse_optim.type=adamw`.
# NPROC=2 runs stages 2-4 on 2 gloo processes.
set -euo pipefail
source "$(dirname "$0")/env.sh"
DATA=data/quickstart OUT=runs/quickstart

[[ -f $DATA/facts_new.jsonl ]] || $PY -m smft_dist.data.synthetic --out "$DATA" --size small
[[ -f $OUT/pretrain/hf/config.json ]] || "${RUN[@]}" -m smft_dist.train --config configs/quickstart_pretrain.yaml
[[ -f $OUT/background.safetensors ]] || \
  "${RUN[@]}" -m smft_dist.background --config configs/quickstart_smft.yaml --out "$OUT/background.safetensors" --batches 1000
rm -rf "$OUT/smft" "$OUT/before"
$PY -m smft_dist.evaluate --config configs/quickstart_smft.yaml --model "$OUT/pretrain/hf" --out "$OUT/before" > /dev/null
"${RUN[@]}" -m smft_dist.train --config configs/quickstart_smft.yaml "$@"
$PY -m smft_dist.eval.report "$OUT/before/metrics.jsonl" "$OUT/smft/metrics.jsonl"
echo "TensorBoard: .venv/bin/tensorboard --logdir $OUT"
