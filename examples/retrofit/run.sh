#!/usr/bin/env bash
# Bring your own model and your own knowledge, end to end on the CPU (see README.md):
#   1. the synthetic world (quickstart's) and "the model the user already has": a plain
#      transformers Llama trained on the world's pretraining corpus, so it knows some facts;
#   2. retrofit: a memory layer beside the FFN of block 2, W2 = 0 (the model is exactly the original;
#      this example measures recovery, so it keeps w2_zero rather than the values_zero default);
#   3. recovery: method.name=memory_pretrain on the same text, only the memory trains;
#   4. background df statistics over that text, with the recovered model;
#   5. the new facts as QA pairs -> statements + rewrites (smft_dist.augment, template fallback);
#   6. SMFT on the augmented facts, one fact per step;
#   7. before/after tables: the user's model vs recovered, recovered vs after SMFT.
# Extra key=value arguments go to stage 6, e.g. `method.value_lr=100`.
set -euo pipefail
source "$(dirname "$0")/../../launcher/env.sh"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # 2 shared cores: one thread per process is fastest
EX=examples/retrofit DATA=data/quickstart OUT=runs/retrofit_example

[[ -f $DATA/facts_new.jsonl ]] || $PY -m smft_dist.data.synthetic --out "$DATA" --size small
[[ -f $OUT/user/config.json ]] || $PY $EX/user_model.py --config $EX/user_model.yaml
rm -rf "$OUT/retrofit" "$OUT/recovery" "$OUT/smft" "$OUT/eval_user" "$OUT/background.safetensors" "$OUT/facts_new_augmented.jsonl"
$PY -m smft_dist.evaluate --config $EX/smft.yaml --model "$OUT/user" --out "$OUT/eval_user" > /dev/null
$PY -m smft_dist.retrofit --model "$OUT/user" --layers 2 --out "$OUT/retrofit" --memory-init w2_zero n_keys=128 heads=4 topk=16 k_dim=64
"${RUN[@]}" -m smft_dist.train --config $EX/recovery.yaml
"${RUN[@]}" -m smft_dist.background --config $EX/smft.yaml --out "$OUT/background.safetensors" --batches 1000
$PY -m smft_dist.augment --kind facts --input $DATA/facts_new.jsonl --schema facts --max-examples 32 --model template -n 1 \
  --out "$OUT/facts_new_augmented.jsonl"
$PY $EX/qa_form.py "$OUT/facts_new_augmented.jsonl"
"${RUN[@]}" -m smft_dist.train --config $EX/smft.yaml "$@"
echo "recovery: the user's model (before) vs retrofitted + recovered (after)"
$PY -m smft_dist.eval.report "$OUT/eval_user/metrics.jsonl" "$OUT/recovery/metrics.jsonl"
echo "SMFT: recovered (before) vs after learning the new facts (after)"
$PY -m smft_dist.eval.report "$OUT/recovery/metrics.jsonl" "$OUT/smft/metrics.jsonl"
