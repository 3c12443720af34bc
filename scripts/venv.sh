# Sourced by the other scripts: create .venv with Python >= 3.11 and install emp (and the
# simulation connector plugin, which the demo, tests and benchmarks use) into it.
ensure_venv() {
  local python="${PYTHON:-python3}"
  if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "emp needs Python 3.11 or newer; set PYTHON=/path/to/python3.11" >&2
    exit 2
  fi
  [ -x .venv/bin/python ] || "$python" -m venv .venv
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -e "$1" \
    -e plugins/emp-connector-simulation -e plugins/emp-connector-comfyui
}
