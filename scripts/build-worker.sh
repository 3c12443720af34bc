#!/usr/bin/env bash
# Build the single-file worker: dist/emp-worker-<version>-<os>-<arch> (PyInstaller onefile).
#
# It makes a clean virtual environment (build/worker-venv) holding only the worker's
# dependencies (`pip install .`, without the hub extra), the five connector plugins under
# plugins/ and PyInstaller, then runs packaging/pyinstaller/emp-worker.spec. The last line of
# its output is the path of the binary.
#
# Reproducible: SOURCE_DATE_EPOCH (default: the last commit's time) is the build date the
# binary reports and the time stamp of everything in it; PYTHONHASHSEED defaults to 0. Two
# builds of one commit from the same path with the same Python give the same bytes.
#
#   PYTHON=python3.11 scripts/build-worker.sh      # the Python to build with (>= 3.11)
#   EMP_BUILD_DIR=/tmp/b scripts/build-worker.sh   # where build/ and dist/ go (default: .)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
python=${PYTHON:-python3}
out=${EMP_BUILD_DIR:-$root}
venv=$out/build/worker-venv
work=$out/build/pyinstaller
dist=$out/dist

export PYTHONHASHSEED=${PYTHONHASHSEED:-0}
if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
  SOURCE_DATE_EPOCH=$(git log -1 --format=%ct 2>/dev/null || date +%s)
fi
export SOURCE_DATE_EPOCH
commit=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
if [ "$commit" != unknown ] && [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then
  commit="$commit-dirty"
fi

case "$(uname -s)" in
  Linux) os=linux ;;
  Darwin) os=macos ;;
  *) echo "build-worker.sh: unsupported OS $(uname -s)" >&2; exit 2 ;;
esac
case "$(uname -m)" in
  x86_64 | amd64) arch=x86_64 ;;
  aarch64 | arm64) arch=arm64 ;;
  *) echo "build-worker.sh: unsupported architecture $(uname -m)" >&2; exit 2 ;;
esac

echo "build-worker.sh: a clean environment in $venv" >&2
rm -rf "$venv" "$work"
"$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check --quiet)
"${pip[@]}" install --upgrade pip
# Copies of the sources, so that building them leaves nothing in the checkout.
src=$work/src
mkdir -p "$src"
sources=(pyproject.toml README.md emp_protocol emp_worker plugins)
if git rev-parse --git-dir >/dev/null 2>&1; then  # tracked and new files, never ignored ones
  git ls-files -z --cached --others --exclude-standard -- "${sources[@]}" \
    | tar --null -T - -cf - | tar -xf - -C "$src"
else
  cp -R "${sources[@]}" "$src"
fi
"${pip[@]}" install --no-compile "$src" "$src"/plugins/emp-connector-* \
  -r packaging/pyinstaller/build-requirements.txt

version=$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("emp"))')
name=emp-worker-$version-$os-$arch
mkdir -p "$work/info"
printf '{"commit": "%s", "built": "%s"}\n' "$commit" \
  "$("$venv/bin/python" -c 'import datetime, os; print(datetime.datetime.fromtimestamp(int(os.environ["SOURCE_DATE_EPOCH"]), datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))')" \
  > "$work/info/build_info.json"

echo "build-worker.sh: PyInstaller ($name)" >&2
EMP_BINARY_NAME=$name EMP_BUILD_INFO=$work/info/build_info.json \
  "$venv/bin/python" -m PyInstaller --noconfirm --clean --log-level WARN \
  --workpath "$work/work" --distpath "$dist" packaging/pyinstaller/emp-worker.spec >&2
echo "$dist/$name"
