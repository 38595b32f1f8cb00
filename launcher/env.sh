# Sourced by the stage scripts (quickstart.sh, cpu_scale.sh): set up (a no-op when ready), then the
# run environment: PY (the venv's python) and RUN (torchrun on NPROC local gloo processes, default 1).
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash launcher/setup.sh
export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
  HF_DATASETS_DISABLE_PROGRESS_BARS=1 HF_HUB_DISABLE_PROGRESS_BARS=1 TRANSFORMERS_VERBOSITY=error
PY=.venv/bin/python
RUN=(.venv/bin/torchrun --standalone --nproc-per-node "${NPROC:-1}")
