# Sourced by the other scripts: create .venv with Python >= 3.11 and install emp (and the
# simulation connector plugin, which the demo, tests and benchmarks use) into it.
ensure_venv() {
  local python="${PYTHON:-python3}"
  if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "emp needs Python 3.11 or newer; set PYTHON=/path/to/python3.11" >&2
    exit 2
  fi
  [ -x .venv/bin/python ] || "$python" -m venv .venv
  # The installs are editable: pip runs again only when what it reads changed (the extras
  # asked for, a pyproject.toml), which saves some 20 s a run.
  local stamp=.venv/emp-installed wanted
  wanted="$1 $(cat pyproject.toml plugins/*/pyproject.toml | sha256sum)"
  [ "$(cat "$stamp" 2>/dev/null)" = "$wanted" ] && return
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -e "$1" \
    -e plugins/emp-connector-simulation \
    -e plugins/emp-connector-a1111 \
    -e plugins/emp-connector-comfyui \
    -e plugins/emp-connector-rest \
    -e plugins/emp-connector-websocket
  echo "$wanted" >"$stamp"
}
