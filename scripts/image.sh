#!/usr/bin/env bash
# `make image`: build the image from containers/Containerfile, then print its size, its
# Python and rclone versions, and check that nothing needed only to build it is inside.
#
#   scripts/image.sh [IMAGE]            (default localhost/rclone-gateway:latest)
#
# The base: BASE_IMAGE if set; else the Containerfile's default when it is here or a
# registry gives it; else one made on this machine from Debian's packages
# (scripts/image-base.sh). The build stage's pip uses this machine's pip configuration:
# its settings, the files they name (certificates, constraints) and the local package
# directories are mounted into that stage only; the final stage is built without them.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

image=${1:-localhost/rclone-gateway:latest}
podman=${PODMAN:-podman}
containerfile=containers/Containerfile
local_base=localhost/rclone-gateway-base:bookworm
python=${PYTHON:-.venv/bin/python}
log() { printf 'image: %s\n' "$*" >&2; }

default_base=$(sed -n 's/^ARG BASE_IMAGE=//p' "$containerfile")
base=${BASE_IMAGE:-}
if [ -z "$base" ]; then
    if "$podman" image exists "$default_base" \
            || "$podman" pull --quiet "$default_base" >/dev/null 2>&1; then
        base=$default_base
    else
        log "no registry gives $default_base: a base from Debian's packages instead"
        "$podman" image exists "$local_base" || scripts/image-base.sh "$local_base"
        base=$local_base
    fi
fi
log "base $base"

# The machine's pip configuration, merged into one file for the build stage.
work=$(mktemp -d /var/tmp/image-pip.XXXXXX)
trap 'rm -rf "$work"' EXIT
mounts=()
"$python" - "$work" >"$work/mounts" <<'PY'
import os, subprocess, sys
from pathlib import Path

work = Path(sys.argv[1])
listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], check=True,
                        capture_output=True, text=True, env={**os.environ}).stdout
order = {"global": 0, "user": 1, "site": 2, ":env:": 3}  # pip's own precedence
settings: dict[str, tuple[int, str]] = {}
for line in listed.splitlines():
    key, _, value = line.partition("=")
    variant, _, name = key.rpartition(".")
    rank = order.get(variant.split(".")[0], 0)
    if name and rank >= settings.get(name, (-1, ""))[0]:
        settings[name] = (rank, value.strip().strip("'\""))

mounts: dict[str, str] = {}  # host path -> path in the build stage

def visible(token: str) -> str:
    """A token of a setting as the build stage sees it, its file or directory mounted."""
    url = token.startswith("file://")
    path = token[len("file://"):] if url else token
    if not path.startswith("/") or not os.path.exists(path):
        return token
    if os.path.isdir(path):
        # A directory keeps its path; an index's links may climb above ".../simple".
        top = os.path.dirname(path.rstrip("/")) if path.rstrip("/").endswith("/simple") else path
        mounts[top] = top
        return token
    inside = f"/pip-host/{len(mounts)}-{os.path.basename(path)}"
    mounts[path] = inside
    return ("file://" if url else "") + inside

lines = ["[global]"]
for name, (_, value) in sorted(settings.items()):
    lines.append(f"{name} = " + " ".join(visible(t) for t in value.split()))
(work / "pip.conf").write_text("\n".join(lines) + "\n")
for host, inside in mounts.items():
    print(f"{host}:{inside}:ro")
PY
while read -r mount; do mounts+=(--volume "$mount"); done <"$work/mounts"
mounts+=(--volume "$work/pip.conf:/pip-host/pip.conf:ro")

args=(--network host --file "$containerfile" --build-arg "BASE_IMAGE=$base"
      --build-arg PIP_CONFIG_FILE=/pip-host/pip.conf)
start=$(date +%s)
log "build stage (pip, with this machine's pip configuration)"
"$podman" build --quiet --target build "${mounts[@]}" "${args[@]}" . >/dev/null
log "final stage"
"$podman" build --quiet "${args[@]}" --tag "$image" . >/dev/null
log "built $image in $(( $(date +%s) - start )) s"

# What is in it.
size=$("$podman" image inspect --format '{{.Size}}' "$image")
run=("$podman" run --rm --network none --entrypoint)
python_version=$("${run[@]}" python3 "$image" --version)
rclone_version=$("${run[@]}" rclone "$image" version)
rclone_version=${rclone_version%%$'\n'*}
printf '%s\n' "image    $image" \
    "size     $(( size / 1000000 )) MB ($size bytes)" \
    "python   $python_version" \
    "rclone   $rclone_version"
"${run[@]}" python3 "$image" -c '
import glob, importlib.util, os, shutil, sys
found = []
for tool in ("pip", "pip3", "gcc", "cc", "c++", "make"):
    if shutil.which(tool):
        found.append(shutil.which(tool))
for module in ("pip", "setuptools", "wheel", "ensurepip"):
    if importlib.util.find_spec(module):
        found.append(f"python module {module}")
for pattern in ("/var/lib/apt/lists/*", "/var/cache/apt/archives/*.deb", "/src", "/pip-host",
                "/usr/lib/gcc*", "/usr/include/python3*",
                "/opt/rclone-gateway/lib/python3*/site-packages/pip"):
    found += [p for p in glob.glob(pattern) if not p.endswith(("/lock", "/partial"))]
venv = "/opt/rclone-gateway/bin/python"
if os.system(venv + " -c \"import pip\" 2>/dev/null") == 0:
    found.append("pip in the virtual environment")
if found:
    sys.exit("build-only contents in the image: " + ", ".join(found))
print("contents no pip, no compiler, no apt lists, no sources")
'
