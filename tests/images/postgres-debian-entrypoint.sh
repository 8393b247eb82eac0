#!/bin/bash
# The entrypoint of the Debian-package-shaped image: initdb, pg_ctl and postgres are not on PATH
# there, so it finds them in the newest server version directory, as pg_wrapper does, for itself
# only (the image's PATH, and so every `docker exec` and helper from it, stays without them).
set -euo pipefail
bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
PATH="$bin:$PATH" exec /usr/local/bin/docker-entrypoint.sh "$@"
