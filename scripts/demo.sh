#!/usr/bin/env bash
# Install emp into .venv and run the demo: an embedded Valkey, a mix of jobs, three
# simulated workers with different capabilities, and what the broker did with each job.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
ensure_venv '.[hub]'
exec .venv/bin/emp-broker-demo "$@"
