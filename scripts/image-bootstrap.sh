#!/usr/bin/env bash
# What `make image` and `make image-test` need beyond scripts/bootstrap.sh: podman (with
# runc) to build and run the image, debootstrap to make a base image where no registry
# answers, systemd-analyze to check the unit. Idempotent: a second run installs nothing.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
log() { printf 'image-bootstrap: %s\n' "$*" >&2; }
# shellcheck source=scripts/apt.sh
. scripts/apt.sh

apt_install podman runc debootstrap systemd
