#!/usr/bin/env bash
# Build the images the tests run, without any image registry:
#   toybox-test/debian:bookworm   debootstrap'd Debian 12 (minbase), imported with `docker import`
#   toybox-test/postgres:15       Debian's postgresql-15 on top of it
# The base image is built once and reused while it exists. The PostgreSQL image carries the label
# toybox-test.inputs, a hash of what it is built from (its Dockerfile, its entrypoint, the base
# image's id): it is rebuilt whenever that differs, so an edited entrypoint is never run from a
# stale image. --force rebuilds both.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
force=${1:-}
base=toybox-test/debian:bookworm
pg=toybox-test/postgres:15
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

have() { docker image inspect "$1" >/dev/null 2>&1; }

if [ "$force" = --force ] || ! have "$base"; then
  root=$(mktemp -d /tmp/toybox-rootfs.XXXXXX)
  trap 'rm -rf "$root"' EXIT
  echo "building $base with debootstrap (a few minutes, once)"
  debootstrap --variant=minbase --include=ca-certificates,tzdata,zstd,procps \
    bookworm "$root" "$mirror" >/tmp/toybox-debootstrap.log 2>&1 \
    || { tail -n 30 /tmp/toybox-debootstrap.log; exit 1; }
  cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  tar -C "$root" -c . | docker import \
    -c 'ENV LANG=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    -c 'CMD ["/bin/bash"]' - "$base" >/dev/null
  rm -rf "$root"; trap - EXIT
fi

inputs=$( { cat "$here/postgres.Dockerfile" "$here/postgres-entrypoint.sh"
            docker image inspect -f '{{.Id}}' "$base"; } | sha256sum | cut -c1-16)
label() { docker image inspect -f '{{index .Config.Labels "toybox-test.inputs"}}' "$1" 2>/dev/null; }
if [ "$force" = --force ] || [ "$(label "$pg")" != "$inputs" ]; then
  echo "building $pg (inputs $inputs)"
  docker build -q --network host --label "toybox-test.inputs=$inputs" -t "$pg" \
    -f "$here/postgres.Dockerfile" "$here" >/dev/null
fi
echo "images ready: $base $pg"
