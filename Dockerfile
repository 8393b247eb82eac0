# toybox-backupd: the backup sidecar of the TOYBOX stack. The same image is the default helper
# image for volume archives (HELPER_IMAGE unset), so it carries GNU tar, find, zstd and tzdata.
#
#   docker build -t toybox-backupd:latest .                       # on python:3.11-slim-bookworm
#   docker build --build-arg BASE_IMAGE=debian:bookworm-slim -t toybox-backupd:latest .
#
# It works on a python:3.11-slim base (that image's Python) and on a plain Debian 12 base
# (Debian's python3): the application always lives in a venv at /opt/venv, built in the first
# stage with whichever python3 the base has; the runtime stage gets the venv, not pip or wheels.
# No `# syntax=` line on purpose: it would make BuildKit fetch a frontend image from a registry.
ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS build
# pip trusts the system CA bundle (a TLS-inspecting proxy's CA can be added there); override
# with --build-arg PIP_CERT= to use pip's own bundle.
ARG PIP_CERT=/etc/ssl/certs/ca-certificates.crt
ARG PIP_INDEX_URL=https://pypi.org/simple
ENV DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 \
    PIP_CERT=${PIP_CERT} PIP_INDEX_URL=${PIP_INDEX_URL}
RUN set -eu; \
    need=""; \
    command -v python3 >/dev/null || need="python3 python3-venv"; \
    [ -s /etc/ssl/certs/ca-certificates.crt ] || need="$need ca-certificates"; \
    if [ -z "$need" ] && ! python3 -m venv /tmp/venv-probe >/dev/null 2>&1; then need="python3-venv"; fi; \
    rm -rf /tmp/venv-probe; \
    if [ -n "$need" ]; then \
      apt-get update -qq; \
      apt-get install -y -qq --no-install-recommends $need >/dev/null; \
      rm -rf /var/lib/apt/lists/*; \
    fi; \
    python3 -m venv /opt/venv; \
    /opt/venv/bin/pip install -q "setuptools>=68" wheel

# Dependencies first, from pyproject.toml alone (a stub package), so a source change does not
# download them again.
COPY pyproject.toml /src/pyproject.toml
RUN set -eu; \
    mkdir -p /src/toybox_backupd; touch /src/toybox_backupd/__init__.py /src/README.md; \
    /opt/venv/bin/pip install -q --no-build-isolation /src; \
    /opt/venv/bin/pip uninstall -q -y toybox-backupd; \
    rm -rf /src/toybox_backupd /src/build /src/*.egg-info

COPY toybox_backupd /src/toybox_backupd
RUN set -eu; \
    /opt/venv/bin/pip install -q --no-deps --no-build-isolation /src; \
    /opt/venv/bin/pip uninstall -q -y pip setuptools wheel; \
    /opt/venv/bin/toybox-backupd --version

# ---------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE}
ARG BACKUPD_UID=10001
ARG BACKUPD_GID=10001
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="toybox-backupd" \
      org.opencontainers.image.description="Backup sidecar: pg_dump, full and differential volume archives, email reports" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="MIT"

# tini: PID 1 that forwards SIGTERM to the daemon and reaps zombies. GNU tar/findutils/zstd:
# the helper containers' tools (and a restore by hand). tzdata: TZ=Asia/Tokyo and friends.
# python3 only when the base has none (plain Debian): the venv points at the same interpreter
# path the build stage used. Only what the base lacks is installed: a base that has them all
# (tini included) builds without a Debian mirror.
RUN set -eu; \
    export DEBIAN_FRONTEND=noninteractive; \
    need=""; \
    command -v tini >/dev/null || need="$need tini"; \
    tar --version 2>/dev/null | grep -q 'GNU tar' || need="$need tar"; \
    command -v find >/dev/null || need="$need findutils"; \
    command -v zstd >/dev/null || need="$need zstd"; \
    [ -e /usr/share/zoneinfo/Asia/Tokyo ] || need="$need tzdata"; \
    [ -s /etc/ssl/certs/ca-certificates.crt ] || need="$need ca-certificates"; \
    command -v python3 >/dev/null || need="$need python3"; \
    if [ -n "$need" ]; then \
      apt-get update -qq; \
      apt-get install -y -qq --no-install-recommends $need >/dev/null; \
      rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb; \
    fi; \
    [ -x /usr/bin/tini ] || ln -s "$(command -v tini)" /usr/bin/tini; \
    getent group backupd >/dev/null || groupadd --gid "$BACKUPD_GID" backupd; \
    id -u backupd >/dev/null 2>&1 || useradd --uid "$BACKUPD_UID" --gid backupd --no-create-home \
            --home-dir /var/lib/toybox-backupd --shell /usr/sbin/nologin backupd; \
    mkdir -p /backups /var/lib/toybox-backupd /etc/toybox-backupd; \
    chown backupd:backupd /backups /var/lib/toybox-backupd; \
    chmod 0700 /var/lib/toybox-backupd

COPY --from=build /opt/venv /opt/venv

# LOG_FORMAT=json: one JSON object per line for `docker compose logs` and log shippers (set
# LOG_FORMAT=console in .env for key=value lines; a command run at a terminal prints console
# lines anyway). TOYBOX_ENV_FILE: settings come from the environment (compose's env_file); a
# file is read only if mounted at this path. TOYBOX_LOG_MIRROR: `backup`, `restore`, `verify`
# and `reindex` run with `docker compose exec` copy their log lines to PID 1's output, so
# `docker compose logs` shows them too.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    LOG_FORMAT=json \
    BACKUP_DIR=/backups \
    STATE_DIR=/var/lib/toybox-backupd \
    TOYBOX_ENV_FILE=/etc/toybox-backupd/env \
    TOYBOX_LOG_MIRROR=/proc/1/fd/1

# Backups and the SQLite history/catalog. Keep /backups on the host (a bind mount) or better,
# on another disk: it is what a new host needs to recover (`toybox-backupd reindex`).
VOLUME ["/backups", "/var/lib/toybox-backupd"]
WORKDIR /var/lib/toybox-backupd

# Non-root. The Docker socket is reached through a supplementary group with the socket's gid
# (compose: group_add: ["${DOCKER_GID}"]). Helper containers run as root by themselves (they
# must read every file of a volume and restore ownership); this process does not need to.
USER ${BACKUPD_UID}:${BACKUPD_GID}

HEALTHCHECK --interval=1m --timeout=30s --start-period=2m --retries=3 \
    CMD ["toybox-backupd", "healthcheck"]

ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["toybox-backupd", "run"]
