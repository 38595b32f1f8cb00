#!/usr/bin/env bash
# Create .venv and install the pinned smft-dist stack from nothing.
#
# torch, FBGEMM and TorchRec move in lockstep: FBGEMM's operators are compiled against one torch
# ABI, so fbgemm-gpu(-cpu) 1.8.0 loads only on torch 2.13 (1.9.0 fails to load there) and
# torchrec 1.8.0 is built for fbgemm 1.8. The stages below exist because each package's own
# metadata would otherwise pull the wrong build:
#   1. torch==2.13.0 first and exactly: a looser spec resolves to a multi-GB CUDA wheel.
#   2. fbgemm-gpu-cpu (CPU) or fbgemm-gpu (CUDA), pinned to 1.8.0.
#   3. torchrec --no-deps (it declares the CUDA fbgemm-gpu), then its real runtime deps.
#   4. deepspeed is an sdist: --no-build-isolation so its build sees the torch installed here
#      instead of pulling a CUDA torch into an isolated build env.
#   5. the rest, constrained to the torch already installed; then this package, editable.
# A stamp of this file + pyproject.toml makes a second run on a ready environment a no-op.
#
# Env: SMFT_DEVICE=cpu|cuda (default cpu), SMFT_VENV (default .venv), PYTHON (default python3),
#      SMFT_TORCH_PIP_ARGS (extra pip options for the torch stage).
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE="${SMFT_DEVICE:-cpu}"
VENV="${SMFT_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION=2.13.0
FBGEMM_VERSION=1.8.0
TORCHREC_VERSION=1.8.0
DEEPSPEED_VERSION=0.19.8

case "$DEVICE" in
  cpu) FBGEMM_PKG="fbgemm-gpu-cpu==${FBGEMM_VERSION}" ;;
  cuda) FBGEMM_PKG="fbgemm-gpu==${FBGEMM_VERSION}" ;;
  *) echo "setup.sh: SMFT_DEVICE must be 'cpu' or 'cuda', got '$DEVICE'" >&2; exit 2 ;;
esac

STAMP="$VENV/.smft-setup-stamp"
WANT="$DEVICE $(cat launcher/setup.sh pyproject.toml | sha256sum | cut -d' ' -f1)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
  echo "setup.sh: $VENV is ready ($DEVICE)"
  exit 0
fi

[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --disable-pip-version-check -q)
CONSTRAINTS="$VENV/smft-constraints.txt"
echo "torch==${TORCH_VERSION}" > "$CONSTRAINTS"

echo "setup.sh: [1/5] torch ${TORCH_VERSION} ($DEVICE)"
"${PIP[@]}" --upgrade pip wheel setuptools
# PyPI's Linux torch wheel is the CUDA build; a machine with a local CPU wheel (find-links) takes
# that one. SMFT_TORCH_PIP_ARGS adds pip options, e.g. an --index-url of a CUDA-specific mirror.
# shellcheck disable=SC2086
"${PIP[@]}" ${SMFT_TORCH_PIP_ARGS:-} "torch==${TORCH_VERSION}"
echo "setup.sh: [2/5] $FBGEMM_PKG"
"${PIP[@]}" -c "$CONSTRAINTS" "$FBGEMM_PKG"
echo "setup.sh: [3/5] torchrec ${TORCHREC_VERSION} (--no-deps) + its runtime deps"
"${PIP[@]}" --no-deps "torchrec==${TORCHREC_VERSION}"
"${PIP[@]}" -c "$CONSTRAINTS" tensordict "torchmetrics==1.0.3" tqdm pyre-extensions iopath
echo "setup.sh: [4/5] deepspeed ${DEEPSPEED_VERSION} (--no-build-isolation)"
"${PIP[@]}" -c "$CONSTRAINTS" hjson msgpack ninja numpy packaging psutil py-cpuinfo pydantic einops
DS_BUILD_OPS=0 DS_ACCELERATOR="${DS_ACCELERATOR:-$DEVICE}" \
  "${PIP[@]}" -c "$CONSTRAINTS" --no-build-isolation "deepspeed==${DEEPSPEED_VERSION}"
echo "setup.sh: [5/5] transformers, datasets, tensorboard, peft, matplotlib, pytest, smft-dist"
"${PIP[@]}" -c "$CONSTRAINTS" transformers tokenizers datasets tensorboard peft safetensors pyyaml matplotlib \
  pytest pytest-timeout
"${PIP[@]}" -c "$CONSTRAINTS" --no-deps --no-build-isolation -e .
"$PY" -m pip check 2>&1 | grep -v "torchrec .* requires fbgemm-gpu, which is not installed" | grep -v "^No broken" || true

DS_ACCELERATOR="${DS_ACCELERATOR:-$DEVICE}" "$PY" -m smft_dist.doctor
echo "$WANT" > "$STAMP"
echo "setup.sh: done ($VENV, $DEVICE)"
