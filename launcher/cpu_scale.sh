#!/usr/bin/env bash
# The CPU-scale setting the learning/forgetting frontier is measured on (2^16 memory slots):
#   1. generate a larger synthetic world (600 people) and its tokenizer: 68,000 generic documents (read
#      about once in pretraining, so held-out NLL keeps measuring generic text) and 45 copies of each
#      known person's texts (the facts are seen as often as when a small corpus was re-read 45 times);
#   2. pretrain the memory model on it (runs/cpu_scale/pretrain; resumes from its checkpoints);
#   3. collect background df + access counts (tfidf and kl rankings);
#   4. split the known facts by their relation to the new ones (smft_dist.eval.related: same answer
#      or not), then evaluate the starting model (known-fact F1 = what there is to forget).
# Then: python -m benchmarks.pareto --grid benchmarks/grids/cpu_scale.yaml [--workers N]
# Extra key=value arguments go to stage 2, e.g. `train.steps=8000`. NPROC=2 runs stages 2-3 on 2 gloo processes.
set -euo pipefail
source "$(dirname "$0")/env.sh"
DATA=data/cpu_scale OUT=runs/cpu_scale

[[ -f $DATA/facts_new.jsonl ]] || $PY -m smft_dist.data.synthetic --out "$DATA" --size small --people 600 \
  --background-docs 68000 --fact-copies 45
[[ -f $OUT/pretrain/hf/config.json ]] || "${RUN[@]}" -m smft_dist.train --config configs/cpu_scale_pretrain.yaml "$@"
[[ -f $OUT/background.safetensors ]] || \
  "${RUN[@]}" -m smft_dist.background --config configs/cpu_scale_smft.yaml --out "$OUT/background.safetensors" --batches 1000
[[ -f $DATA/facts_known_other.jsonl ]] || $PY -m smft_dist.eval.related --known "$DATA/facts_known.jsonl" \
  --new "$DATA/facts_new.jsonl" --max-known 256 --max-new 64 --out "$DATA"
for n in 256 900; do  # the stream-length grids (benchmarks/grids/cpu_scale_stream*.yaml)
  [[ -f $DATA/related_$n/facts_known_other.jsonl ]] || $PY -m smft_dist.eval.related --known "$DATA/facts_known.jsonl" \
    --new "$DATA/facts_new.jsonl" --max-known 256 --max-new $n --out "$DATA/related_$n"
done
[[ -f $OUT/start/metrics.jsonl ]] || \
  $PY -m smft_dist.evaluate --config configs/cpu_scale_smft.yaml --model "$OUT/pretrain/hf" --out "$OUT/start" > /dev/null
grep '"split": "memory"' "$OUT/pretrain/metrics.jsonl" | tail -1
grep '"split": "eval"' "$OUT/start/metrics.jsonl" | tail -1
echo "TensorBoard: .venv/bin/tensorboard --logdir $OUT"
