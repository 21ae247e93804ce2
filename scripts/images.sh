#!/usr/bin/env bash
# Build the merc images with podman and run docker-compose.yml's stack from them: no Docker engine needed.
#
#   scripts/images.sh              build (cached) + run the stack and check it; exit 0 only when every check held
#   scripts/images.sh build        only build the images
#   scripts/images.sh ci           as the first, but where podman cannot run here it says why and exits 0 (.ci/run)
#
# Needs podman, runc, debootstrap and espeak-ng (installed with apt when run as root), .venv (scripts/setup.sh),
# and disk: about 12 GB free for the CPU worker variant, 25 GB for the CUDA one.
#
# Images: localhost/merc-base:bookworm (a Debian bookworm root made with debootstrap, shaped like the official
# python:3.11-slim-bookworm: python and pip on PATH, since no registry is reachable to pull that one; its
# tar is cached under $MERC_IMAGE_CACHE), merc-api (docker/Dockerfile.api), merc-worker (docker/Dockerfile.worker,
# TORCH_VARIANT=$MERC_WORKER_VARIANT: cuda, the default image, or cpu) and localhost/merc-redis (Debian's
# redis-server on the same base). pip inside the builds is configured like this machine's pip (its config
# files and local wheel folders are mounted read-only), so wheels on this disk are not downloaded again.
# Running: docker/podman_stack.py (podman run with the compose file's commands, environment and volumes).
#
# Environment: MERC_IMAGE_CACHE (default ${XDG_CACHE_HOME:-~/.cache}/merc), MERC_WORKER_VARIANT (cuda|cpu,
# default cuda), MERC_DEBIAN_MIRROR, MERC_TORCH_INDEX (the wheel index for torch; default PyPI, since
# PyTorch's own index is not reachable here), MERC_BUILD_CUDA_TOO=1 (also build the other worker variant).
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-all}"
cache="${MERC_IMAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/merc}"
variant="${MERC_WORKER_VARIANT:-cuda}"
mirror="${MERC_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
base=localhost/merc-base:bookworm
mkdir -p "$cache"
t0=$(date +%s)
say() { echo "images: $*"; }
elapsed() { echo "$(( $(date +%s) - $1 )) s"; }
# where this machine cannot build or run containers: a reason, and in ci mode no failure
cannot() {
  if [ "$mode" = ci ]; then echo "images: skipped: $*"; exit 0; fi
  echo "images: $*" >&2; exit 1
}
case "$mode" in all | build | ci) ;; *) echo "usage: scripts/images.sh [all|build|ci]" >&2; exit 2 ;; esac

need=()
for tool in podman runc debootstrap espeak-ng; do command -v "$tool" >/dev/null 2>&1 || need+=("$tool"); done
if [ "${#need[@]}" -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  say "installing ${need[*]} (apt)"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}") >"$cache/apt.log" 2>&1 \
    || cannot "apt-get could not install ${need[*]} (see $cache/apt.log)"
fi
for tool in podman runc debootstrap espeak-ng; do
  command -v "$tool" >/dev/null 2>&1 || cannot "$tool is not installed (Debian package $tool) and this is not root with apt"
done
[ -x .venv/bin/python ] || cannot ".venv is missing: run scripts/setup.sh first"
free_gb=$(df -Pk /var/lib/containers 2>/dev/null | awk 'NR==2 {print int($4/1048576)}')
want_gb=$([ "$variant" = cpu ] && echo 12 || echo 25)
[ "${free_gb:-0}" -ge "$want_gb" ] || cannot "only ${free_gb:-?} GB free for the images, $want_gb GB needed"

# podman on this kind of machine: runc (crun fails on the cgroup setup), no default ulimits (refused), host network
cat >"$cache/containers.conf" <<'CONF'
[containers]
default_ulimits = []
netns = "host"
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
export CONTAINERS_CONF="$cache/containers.conf"

# ---------------------------------------------------------------- the base: Debian bookworm + python3.11 + pip
build_base() {
  local tarball="$cache/bookworm-python311.tar" root="$cache/root.tmp"
  if podman image exists "$base"; then
    say "base $base present"
    return
  fi
  if [ ! -s "$tarball" ]; then
    local t; t=$(date +%s)
    rm -rf "$root"
    say "debootstrap bookworm into $root ($mirror)"
    nice -n 10 debootstrap --variant=minbase --include=python3.11,python3-pip,ca-certificates,netbase \
      bookworm "$root" "$mirror" >"$cache/debootstrap.log" 2>&1 \
      || { tail -20 "$cache/debootstrap.log" >&2; exit 1; }
    # the official image's shape: `python` and `pip` on PATH, pip installing into /usr/local (no PEP 668 refusal)
    rm -f "$root/usr/lib/python3.11/EXTERNALLY-MANAGED"
    ln -sf /usr/bin/python3.11 "$root/usr/local/bin/python"
    ln -sf /usr/bin/pip3 "$root/usr/local/bin/pip"
    cat >"$root/etc/apt/sources.list" <<SOURCES
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
SOURCES
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/cache/apt/*.bin "$root"/var/lib/apt/lists/* \
      "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/locale/*
    tar -C "$root" -cf "$tarball.part" . && mv "$tarball.part" "$tarball"
    rm -rf "$root"
    say "base root built in $(elapsed "$t") ($(du -h "$tarball" | cut -f1) tar, cached)"
  fi
  podman import --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' "$tarball" "$base" >/dev/null 2>&1
  say "base $base imported from $tarball"
}

# ---------------------------------------------------------------- pip inside the builds = this machine's pip
pip_mounts=()
pip_setup() {
  # every setting this machine's pip has (files and PIP_* variables), written as one config file
  local conf="$cache/pip.conf" key value dir
  python3 -m pip config list 2>/dev/null | python3 -c '
import re, sys
settings = {}
for line in sys.stdin:
    m = re.match(r"^(?::env:|global)\.([\w-]+)=(.*)$", line.strip())
    if m:
        settings[m.group(1)] = m.group(2).strip("\x27\"")
if "cert" in settings:  # the CA bundle this machine trusts (a TLS proxy), mounted at this path below
    settings["cert"] = "/etc/merc-build-ca.crt"
print("[global]")
for k, v in settings.items():
    print(f"{k} = {v}")
' >"$conf"
  pip_mounts=(-v "$conf:/etc/pip.conf:ro")
  local ca; ca="$(python3 -m pip config list 2>/dev/null | sed -n "s/^.*\.cert='\(.*\)'$/\1/p" | head -1)"
  [ -n "$ca" ] && [ -f "$ca" ] && pip_mounts+=(-v "$ca:/etc/merc-build-ca.crt:ro")
  # /etc/xdg/pip and the local wheel folders and indexes the settings name, mounted at the same paths
  local dirs=()
  [ -d /etc/xdg/pip ] && dirs+=(/etc/xdg/pip)
  while read -r value; do
    for dir in $value; do
      dir="${dir#file://}"
      case "$dir" in /etc/merc-build-ca.crt | /etc/xdg/pip/*) continue ;; /*) ;; *) continue ;; esac
      [ -f "$dir" ] && dir="$(dirname "$dir")"
      dir="${dir%/simple}"; dir="${dir%/}"
      [ -d "$dir" ] && dirs+=("$dir")
    done
  done < <(sed -n 's/^[a-z-]* = //p' "$conf")
  while read -r dir; do pip_mounts+=(-v "$dir:$dir:ro"); done < <(printf '%s\n' "${dirs[@]}" | sort -u)
  say "pip config for the builds: $(grep -c = "$conf") settings, ${#pip_mounts[@]} mount arguments"
}

build() {  # build NAME DOCKERFILE [ARGS...]
  local name="$1" file="$2" t; shift 2
  t=$(date +%s)
  nice -n 10 podman build --format docker --network host --from "$base" "${pip_mounts[@]}" --layers \
    -f "$file" -t "$name" "$@" . >"$cache/build-${name//[:\/]/-}.log" 2>&1 \
    || { tail -40 "$cache/build-${name//[:\/]/-}.log" >&2; say "build of $name failed"; exit 1; }
  say "built $name in $(elapsed "$t"): $(podman image inspect "$name" --format '{{.Size}}' | awk '{printf "%.0f MB", $1/1e6}')"
}

build_base
podman run --rm "$base" python -c 'import sys; assert sys.version_info[:2] == (3, 11)' >"$cache/podman-run.log" 2>&1 \
  || cannot "podman cannot run a container here: $(tail -3 "$cache/podman-run.log" | tr '\n' ' ')"
pip_setup
torch_index="${MERC_TORCH_INDEX:-https://pypi.org/simple}"
build merc-api docker/Dockerfile.api
worker_args=(--build-arg "TORCH_INDEX=$torch_index" --build-arg "TORCH_VARIANT=$variant")
if [ "$variant" = cpu ]; then
  # PyTorch's CPU index (torch 2.14.1+cpu, torchvision 0.29.1+cpu) is out of reach here and PyPI's x86_64 torch is a
  # CUDA build: take the newest CPU build this machine's pip can get (here the 2.13.0+cpu wheel on disk), unless set
  spec="${MERC_CPU_TORCH_SPEC:-}"
  for candidate in "torch==2.14.1+cpu torchvision==0.29.1+cpu" "torch==2.13.0+cpu"; do
    [ -n "$spec" ] && break
    # shellcheck disable=SC2086
    if python3 -m pip install -q --dry-run --no-deps --ignore-installed $candidate >/dev/null 2>&1; then
      spec="$candidate"
    fi
  done
  [ -n "$spec" ] || cannot "no CPU build of torch is reachable (set MERC_TORCH_INDEX=https://download.pytorch.org/whl/cpu)"
  say "CPU worker: $spec"
  worker_args+=(--build-arg "TORCH_SPEC=$spec")
fi
build "merc-worker:$variant" docker/Dockerfile.worker "${worker_args[@]}"
podman tag "merc-worker:$variant" merc-worker:latest
build localhost/merc-redis - <<'REDIS'
FROM localhost/merc-base:bookworm
RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/*
CMD ["redis-server"]
REDIS
say "images: merc-api, merc-worker (= merc-worker:$variant), localhost/merc-redis, base $base; built in $(elapsed "$t0")"
podman image prune -f >/dev/null || true
if [ "$mode" = build ]; then exit 0; fi

status=0
.venv/bin/python docker/podman_stack.py --variant "$variant" || status=$?
say "$(elapsed "$t0") in all"
exit "$status"
