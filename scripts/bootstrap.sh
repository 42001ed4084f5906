#!/usr/bin/env bash
# Bring a fresh Debian machine and a clean clone to the point where `make run`
# and `make test` work. Idempotent: a second run installs nothing.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV=.venv

log() { printf 'bootstrap: %s\n' "$*" >&2; }
# shellcheck source=scripts/apt.sh
. scripts/apt.sh

# System tools the tests and the demo run for real (chromium renders the status page).
apt_install redis-server restic litmus chromium fonts-dejavu-core
command -v python3 >/dev/null 2>&1 || apt_install python3

venv_ok() {
    [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1 \
        && "$VENV/bin/python" -m pip --version >/dev/null 2>&1
}

if ! venv_ok; then
    rm -rf "$VENV"
    log "creating $VENV"
    if ! python3 -m venv "$VENV" >/dev/null 2>&1; then
        rm -rf "$VENV"
        apt_install python3-venv
        python3 -m venv "$VENV"
    fi
fi

stamp="$VENV/.installed-$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -e "$stamp" ]; then
    log "pip install -e '.[test]'"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e '.[test]'
    rm -f "$VENV"/.installed-*
    touch "$stamp"
fi

# restic 0.18, the client the cluster's own images run (they are built from a newer
# Alpine than this machine's Debian): the tests run restic jobs with both versions.
# Debian 13's package is a static binary; it is fetched from the mirrors this machine
# already uses (their suite swapped for trixie) with a private apt state under var/,
# so the machine's own package sources and lists stay as they are.
RESTIC_NEW="$VENV/bin/restic-0.18"

# "<uri> <signed-by>" of the machine's first deb source for its own release's main suite.
own_debian_source() {
    local codename file
    codename=$(. /etc/os-release && printf '%s' "${VERSION_CODENAME:-}")
    [ -n "$codename" ] || return 1
    for file in /etc/apt/sources.list.d/*.sources; do
        [ -e "$file" ] || continue
        awk -v suite="$codename" '
            function flush() {
                if (types ~ /(^| )deb( |$)/ && (" " suites " ") ~ (" " suite " ") && uris != "")
                    { split(uris, u, " "); print u[1], (signed == "" ? "-" : signed); found = 1; exit }
                types = suites = uris = signed = ""
            }
            /^[ \t]*#/ { next }
            /^[ \t]*$/ { flush(); next }
            tolower($1) == "types:" { sub(/^[^:]*:[ \t]*/, ""); types = $0 }
            tolower($1) == "suites:" { sub(/^[^:]*:[ \t]*/, ""); suites = $0 }
            tolower($1) == "uris:" { sub(/^[^:]*:[ \t]*/, ""); uris = $0 }
            tolower($1) == "signed-by:" { sub(/^[^:]*:[ \t]*/, ""); signed = $0 }
            END { if (!found) flush() }
        ' "$file" | head -n1 | grep . && return 0
    done
    for file in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -e "$file" ] || continue
        # deb [signed-by=...] <uri> <suite> <components>
        awk -v suite="$codename" '
            $1 != "deb" { next }
            {
                signed = "-"; i = 2
                if ($2 ~ /^\[/) {
                    while (i <= NF) {
                        if ($i ~ /^\[?signed-by=/) { s = $i; sub(/^\[?signed-by=/, "", s); sub(/\]$/, "", s); signed = s }
                        if ($i ~ /\]$/) { i++; break }
                        i++
                    }
                }
                if ($(i + 1) == suite) { print $i, signed; exit }
            }
        ' "$file" | head -n1 | grep . && return 0
    done
    return 1
}

restic_new_ok() {
    [ -x "$RESTIC_NEW" ] && "$RESTIC_NEW" version 2>/dev/null | grep -q '^restic 0\.18\.'
}

fetch_restic_new() {
    local source uri signed state
    if ! source=$(own_debian_source); then
        log "no Debian source found in /etc/apt: cannot fetch restic 0.18"
        return 1
    fi
    read -r uri signed <<<"$source"
    state="$PWD/var/apt-trixie"
    rm -rf "$state"
    mkdir -p "$state/lists/partial" "$state/cache/archives/partial" "$state/parts" "$state/deb"
    {
        echo "Types: deb"
        echo "URIs: $uri"
        echo "Suites: trixie"
        echo "Components: main"
        [ "$signed" != "-" ] && echo "Signed-By: $signed"
    } >"$state/trixie.sources"
    local apt_opts=(
        -o "Dir::Etc::SourceList=/dev/null"
        -o "Dir::Etc::SourceParts=$state/parts"
        -o "Dir::State::Lists=$state/lists"
        -o "Dir::Cache=$state/cache"
        -o "Dir::State::status=/var/lib/dpkg/status"
        -o "APT::Architecture=$(dpkg --print-architecture)"
        -o "Debug::NoLocking=1"
    )
    mv "$state/trixie.sources" "$state/parts/"
    log "fetching restic 0.18 (Debian trixie's package)"
    apt-get "${apt_opts[@]}" update -qq >/dev/null
    (cd "$state/deb" && apt-get "${apt_opts[@]}" download restic >/dev/null)
    dpkg-deb -x "$state"/deb/restic_*.deb "$state/root"
    install -m 0755 "$state/root/usr/bin/restic" "$RESTIC_NEW"
    rm -rf "$state"
    restic_new_ok || { log "$RESTIC_NEW is not restic 0.18"; return 1; }
}

restic_new_ok || fetch_restic_new
