#!/usr/bin/env bash
# The test command: installs the package with its test extras, makes sure a Docker engine
# answers (starting dockerd if needed), builds the test images once, then runs pytest.
# Usage: bash tests/run.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m pip install -q --disable-pip-version-check -e '.[test]' 2>&1 | grep -v -E 'WARNING: (Running pip as|Location)' || true

if ! docker info >/dev/null 2>&1; then
  if ! command -v dockerd >/dev/null; then
    echo "tests: no Docker engine and no dockerd (apt-get install docker.io, or run .ci/run)" >&2
    [ "${CI:-}" = true ] && exit 1
  else
    echo "tests: starting dockerd"
    (nohup dockerd >/tmp/toybox-dockerd.log 2>&1 &)
    for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
    docker info >/dev/null 2>&1 || { tail -n 30 /tmp/toybox-dockerd.log >&2; exit 1; }
  fi
fi
if docker info >/dev/null 2>&1; then
  bash tests/images/build-images.sh
  # leftovers of an earlier, killed run
  docker ps -aq --filter label=toybox-backupd.test | xargs -r docker rm -f >/dev/null 2>&1 || true
fi

python3 -m ruff check .
lint-imports --no-cache >/dev/null || lint-imports --no-cache  # architecture contracts (pyproject.toml)
exec python3 -m pytest -p no:cacheprovider "$@"
