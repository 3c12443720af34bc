#!/usr/bin/env bash
# packaging/docker/compose.yaml run for real; needs a Docker daemon with Compose v2 (CI's
# `container` job runs it on GitHub; scripts/test_container.py tests the image without one).
# Builds both images from this checkout, starts Redis, the hub and the simulation worker,
# then checks: the hub's HEALTHCHECK says healthy; it runs as a non-root user; a job is
# completed by the worker and its output stored on the hub's volume; after `down` and `up`
# (volumes kept) the job is still there (Redis AOF on its volume). Removes everything after.
set -euo pipefail
cd "$(dirname "$0")/.."

export COMPOSE_FILE=packaging/docker/compose.yaml COMPOSE_PROJECT_NAME=emp-ci
export COMPOSE_PROFILES=simulation
EMP_VERSION=$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
EMP_AUTH_TOKEN=$(python3 -c 'import secrets; print(secrets.token_hex(32))')
export EMP_VERSION EMP_AUTH_TOKEN EMP_HUB_IMAGE=localhost/emp-hub-ci EMP_PUBLISH=18001
hub=http://127.0.0.1:$EMP_PUBLISH
auth=(-H "Authorization: Bearer $EMP_AUTH_TOKEN")

cleanup() {
  status=$?
  if [ "$status" -ne 0 ]; then
    docker compose logs --no-color --timestamps || true  # what went wrong
  fi
  docker compose down --volumes --remove-orphans --timeout 90 || true
  exit "$status"
}
trap cleanup EXIT

docker compose build
docker compose up --detach --wait --wait-timeout 180 --pull never

container=$(docker compose ps --quiet hub)
[ "$(docker inspect --format '{{.State.Health.Status}}' "$container")" = healthy ]
[ "$(docker compose exec -T hub id -u)" != 0 ]
[ "$(docker inspect --format '{{index .Config.Labels "org.opencontainers.image.version"}}' "$container")" = "$EMP_VERSION" ]
curl -fsS "$hub/health/ready"

job=$(curl -fsS "${auth[@]}" -H 'Content-Type: application/json' \
  -d '{"service": "simulation", "payload": {"prompt": "a fox"}, "wait": true, "timeout": 120}' \
  "$hub/api/jobs")
field() { python3 -c 'import json, sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"; }
job_id=$(field job_id <<<"$job")
[ "$(field status <<<"$job")" = completed ] || { echo "not completed: $job" >&2; exit 1; }
name=$(curl -fsS "${auth[@]}" "$hub/api/jobs/$job_id/outputs" | python3 -c 'import json, sys; print(json.load(sys.stdin)[0]["name"])')
docker compose exec -T hub find /data/outputs -name "$name" -type f | grep -q .

# The data outlives the containers: down (volumes kept), up, the job is still there.
docker compose down --timeout 90
docker compose up --detach --wait --wait-timeout 180 --pull never
[ "$(curl -fsS "${auth[@]}" "$hub/api/jobs/$job_id" | field status)" = completed ]
echo "compose: job $job_id completed and kept across a restart"
