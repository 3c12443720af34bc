#!/usr/bin/env bash
# Install emp with everything its tests need into .venv, then run the whole test suite.
# Extra arguments go to pytest (e.g. scripts/test.sh -k lease). The tests start their own
# embedded Valkey; set EMP_TEST_REDIS_URL=redis://host:port/db to use another server.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
ensure_venv '.[hub,test,lint]'
exec .venv/bin/python -m pytest "$@"
