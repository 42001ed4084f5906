#!/usr/bin/env bash
# What `make image` and `make image-test` need beyond scripts/bootstrap.sh: podman (with
# runc) to build and run the image, debootstrap to make a base image where no registry
# answers, systemd-analyze to check the unit. Idempotent: a second run installs nothing.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive
log() { printf 'image-bootstrap: %s\n' "$*" >&2; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo -E "$@"
    else
        log "need root to run: $*"
        exit 1
    fi
}

missing=()
for pkg in podman runc debootstrap systemd; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' \
        || missing+=("$pkg")
done
[ "${#missing[@]}" -eq 0 ] && exit 0
log "apt-get update"
as_root apt-get update -qq
log "installing ${missing[*]}"
as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
