#!/usr/bin/env bash
# Install emp (and the simulation connector) into .venv and run the demo: a hub on an
# embedded Valkey, three emp-worker processes with different capabilities, a mix of jobs
# shown live, then who ran what. Ctrl-C (or SIGTERM, SIGHUP) stops everything. Arguments go
# to emp-demo (--speed 4 runs the jobs four times faster, --exit stops after the summary,
# --keep keeps its temporary folder with the logs; --help for more).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
ensure_venv '.[hub]'
exec .venv/bin/emp-demo "$@"
