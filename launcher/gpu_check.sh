#!/usr/bin/env bash
# One-GPU check (benchmarks/gpu_check.py): every path the CPU test suite cannot run, one
# PASS / FAIL / SKIP (reason) line each with its figures; exit status 1 on any FAIL. At most 8 minutes.
#
#   bash launcher/gpu_check.sh             # on a CUDA machine, from the repo root
#   bash launcher/gpu_check.sh --dry-run   # CPU, tiny shapes, gloo (the test suite runs this)
#
# It runs the machine's python3 (override: PYTHON=...), not .venv, and needs no setup.sh: on a
# machine without a package registry it uses what is installed and SKIPs what does not import.
# Wheels in .whl/, if any, are installed (--no-index --no-deps) into /tmp/smft-site first.
#
# On a GPU machine with torch preinstalled and no package registry, copy a .whl/ folder along with
# the repo. Pure-Python wheels that let more checks run there (built on a machine with one; ~10 MB):
#   echo /.whl/ >> .git/info/exclude
#   DS_BUILD_OPS=0 python3 -m pip wheel --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 -d .whl hjson pydantic pydantic-core annotated-types typing-inspection \
#     datasets dill multiprocess
# TorchRec needs fbgemm_gpu built for the machine's torch (the CUDA wheel is ~465 MB): without it the
# TorchRec checks report SKIP; the DeepSpeed check needs deepspeed only.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/smft-site .whl/*.whl
  export PYTHONPATH="/tmp/smft-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
  HF_HUB_DISABLE_PROGRESS_BARS=1 TRANSFORMERS_VERBOSITY=error
if [[ " $* " == *" --dry-run "* ]]; then export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"; fi
exec timeout --signal=INT 470 "$PY" -m benchmarks.gpu_check "$@"
