#!/usr/bin/env bash
# Make a Debian bookworm base image from Debian's own packages, for machines where no
# image registry answers: `debootstrap --variant=minbase`, trimmed the way the registry's
# debian:bookworm-slim is (no documentation, man pages or locales, no apt lists), imported
# as one layer. The Debian mirror is this machine's own, read from its apt sources.
#
#   scripts/image-base.sh TAG
set -euo pipefail

tag=${1:?usage: image-base.sh TAG}
podman=${PODMAN:-podman}
log() { printf 'image-base: %s\n' "$*" >&2; }

# The first mirror this machine's apt uses for SUITE (deb822 sources, else sources.list).
mirror() {
    local suite=$1 file found=""
    for file in /etc/apt/sources.list.d/*.sources; do
        [ -e "$file" ] || continue
        found=$(awk -v suite="$suite" 'BEGIN { RS = ""; FS = "\n" }
             {
               uris = ""; suites = ""; types = ""
               for (i = 1; i <= NF; i++) {
                 if ($i ~ /^URIs:/)   { uris = $i;   sub(/^URIs:[ \t]*/, "", uris) }
                 if ($i ~ /^Suites:/) { suites = $i; sub(/^Suites:[ \t]*/, "", suites) }
                 if ($i ~ /^Types:/)  { types = $i }
               }
               if (types ~ /(^|[ \t])deb([ \t]|$)/ && index(" " suites " ", " " suite " ")) {
                 split(uris, u, /[ \t]+/); print u[1]; exit
               }
             }' "$file")
        [ -n "$found" ] && { echo "$found"; return 0; }
    done
    for file in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -e "$file" ] || continue
        found=$(awk -v suite="$suite" '$1 == "deb" { for (i = 2; i < NF; i++)
                    if ($i ~ /^[a-z]+:/ && $(i + 1) == suite) { print $i; exit } }' "$file")
        [ -n "$found" ] && { echo "$found"; return 0; }
    done
    return 0
}

url=$(mirror bookworm)
[ -n "$url" ] || { log "no bookworm mirror in this machine's apt sources"; exit 1; }
security=$(mirror bookworm-security)

root=$(mktemp -d /var/tmp/image-base.XXXXXX)
chmod 0755 "$root"  # the image's /
trap 'rm -rf "$root"' EXIT
log "debootstrap --variant=minbase bookworm from this machine's mirror"
debootstrap --variant=minbase --keyring=/usr/share/keyrings/debian-archive-keyring.gpg \
    bookworm "$root" "$url" >"$root.log" 2>&1 || { tail -n 30 "$root.log" >&2; exit 1; }
rm -f "$root.log"

# What debian:bookworm-slim leaves out, and keeps out of later `apt-get install`s.
cat >"$root/etc/dpkg/dpkg.cfg.d/slim" <<'CFG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
CFG
find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete
rm -rf "$root"/usr/share/{man,groff,info,locale,lintian,linda}/* \
       "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin \
       "$root"/var/cache/apt/archives/*.deb "$root"/var/log/* "$root"/tmp/* "$root"/run/*
# Apt inside a build: the machine's mirrors, for bookworm and its security updates.
rm -f "$root/etc/apt/sources.list"
cat >"$root/etc/apt/sources.list.d/debian.sources" <<SRC
Types: deb
URIs: $url
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
if [ -n "$security" ]; then
    cat >>"$root/etc/apt/sources.list.d/debian.sources" <<SRC

Types: deb
URIs: $security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi
: >"$root/etc/resolv.conf"
: >"$root/etc/hostname"

log "importing the tree as $tag"
tar -C "$root" --numeric-owner -cf - . \
    | "$podman" import --quiet --change 'CMD ["bash"]' - "$tag" >/dev/null
"$podman" image inspect --format '{{.Id}}' "$tag" >/dev/null
log "made $tag"
