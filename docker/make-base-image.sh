#!/usr/bin/env bash
# Build a stand-in for the Dockerfiles' base image locally, for machines that reach
# the Debian and PyPI mirrors but no container registry.
#
#   docker/make-base-image.sh            # every FROM name of docker/*.Dockerfile (skips existing ones)
#   docker/make-base-image.sh --force    # rebuild even if it exists
#   DOCKER=docker docker/make-base-image.sh   # with Docker instead of podman
#
# What it makes: Debian bookworm (mmdebstrap, minbase variant) with python3, pip, venv
# and ca-certificates, imported under the FROM name (python:3.11.13-slim-bookworm) so
# the Dockerfiles build unchanged. It is Debian's Python 3.11.2, not 3.11.13, and has no
# Python headers (the CUDA images install python3-dev when their base lacks Python.h).
# Pip may install into the system Python (EXTERNALLY-MANAGED removed, as in the official
# image), and `python`/`pip` are on PATH in /usr/local/bin. Docs, man pages and locales
# are left out. ~30-90 s, ~150 MB. Needs root, mmdebstrap and podman or docker
# (docker/setup-podman.sh installs them).
#
# The Debian mirrors are those apt uses on this machine (bookworm, bookworm-updates,
# bookworm-security entries of /etc/apt/sources.list and /etc/apt/sources.list.d/),
# else deb.debian.org; DEBIAN_MIRRORS (newline-separated one-line `deb ...` entries)
# overrides them.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
SUITE=bookworm
PACKAGES=python3,python3-pip,python3-venv,ca-certificates,passwd

die() { echo "make-base-image: $*" >&2; exit 1; }

force=0
names=()
for arg in "$@"; do
    case "$arg" in
        --force) force=1 ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
        -*) die "unknown option $arg" ;;
        *) names+=("$arg") ;;
    esac
done
if [ ${#names[@]} -eq 0 ]; then  # the distinct FROM images of the Dockerfiles
    mapfile -t names < <(awk 'toupper($1) == "FROM" {print $2}' "$HERE"/*.Dockerfile | sort -u)
fi

ENGINE="${DOCKER:-}"
if [ -z "$ENGINE" ]; then
    for e in podman docker; do command -v "$e" >/dev/null && { ENGINE=$e; break; }; done
fi
[ -n "$ENGINE" ] && command -v "$ENGINE" >/dev/null || die "no container engine found (podman or docker; run docker/setup-podman.sh)"

todo=()
for name in "${names[@]}"; do
    if [ "$force" = 0 ] && "$ENGINE" image inspect "$name" >/dev/null 2>&1; then
        echo "make-base-image: $name exists (--force rebuilds it)"
    else
        todo+=("$name")
    fi
done
[ ${#todo[@]} -gt 0 ] || exit 0

[ "$(id -u)" = 0 ] || die "must run as root (mmdebstrap's root mode)"
command -v mmdebstrap >/dev/null || die "mmdebstrap is not installed (run docker/setup-podman.sh)"

# One-line `deb` entries of apt's configuration for the bookworm suites.
host_mirrors() {
    local keyring=/usr/share/keyrings/debian-archive-keyring.gpg opts=""
    [ -f "$keyring" ] && opts="[signed-by=$keyring] "
    {
        for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
            [ -f "$f" ] && awk '$1 == "deb" {sub(/^deb +(\[[^]]*\] +)?/, ""); print}' "$f"
        done
        for f in /etc/apt/sources.list.d/*.sources; do  # deb822 stanzas
            [ -f "$f" ] && awk '
                function flush() { if (types ~ /(^| )deb( |$)/ && enabled != "no")
                                       for (i = 1; i <= nu; i++) for (j = 1; j <= ns; j++) print u[i], s[j], comps
                                   types = ""; enabled = ""; comps = ""; nu = 0; ns = 0 }
                /^[ \t]*$/ { flush(); next }
                /^#/ { next }
                { key = tolower($1); sub(/:$/, "", key); $1 = "" ; sub(/^ +/, "") }
                key == "types" { types = $0 } key == "enabled" { enabled = tolower($0) }
                key == "uris" { nu = split($0, u, " ") } key == "suites" { ns = split($0, s, " ") }
                key == "components" { comps = $0 }
                END { flush() }' "$f"
        done
    } | awk -v suite="$SUITE" '$2 == suite || $2 == suite "-updates" || $2 == suite "-security"' \
      | sort -u | sed "s|^|deb ${opts}|"
}

mirrors="${DEBIAN_MIRRORS:-$(host_mirrors)}"
if [ -z "$mirrors" ]; then
    mirrors="deb http://deb.debian.org/debian $SUITE $SUITE-updates main
deb http://deb.debian.org/debian-security $SUITE-security main"
fi
mapfile -t mirror_args <<< "$mirrors"
echo "make-base-image: Debian $SUITE from:"; printf '  %s\n' "${mirror_args[@]}"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# merged-usr hook: merged /usr by symlinks + usr-is-merged, instead of the usrmerge package
# and the perl it drags in (~50 MB).
hooks=()
[ -d /usr/share/mmdebstrap/hooks/merged-usr ] && hooks=(--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr)
mmdebstrap --variant=minbase --include="$PACKAGES" "${hooks[@]}" \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --customize-hook='rm -f "$1"/usr/lib/python3.*/EXTERNALLY-MANAGED' \
    --customize-hook='ln -sf /usr/bin/python3 "$1"/usr/local/bin/python' \
    --customize-hook='ln -sf /usr/bin/pip3 "$1"/usr/local/bin/pip' \
    --customize-hook='rm -rf "$1"/var/cache/apt/* "$1"/var/lib/apt/lists/* "$1"/var/log/*' \
    "$SUITE" "$work/rootfs.tar" "${mirror_args[@]}"

python_version="$(tar -xOf "$work/rootfs.tar" ./var/lib/dpkg/status \
    | awk '/^Package: python3$/ {p = 1} p && /^Version:/ && !v {v = $2} END {print v}')"
# Name it as a pull would (podman would otherwise file a short name under localhost/).
qualified() {
    local first="${1%%/*}"
    if [[ "$1" != */* ]]; then echo "docker.io/library/$1"
    elif [[ "$first" != *.* && "$first" != *:* && "$first" != localhost ]]; then echo "docker.io/$1"
    else echo "$1"; fi
}
first="$(qualified "${todo[0]}")"
"$ENGINE" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change "LABEL io.kfp-grpo.stand-in=\"Debian $SUITE python3 $python_version (docker/make-base-image.sh)\"" \
    --change 'CMD ["python3"]' \
    "$work/rootfs.tar" "$first" >/dev/null
for name in "${todo[@]:1}"; do "$ENGINE" tag "$first" "$(qualified "$name")"; done
echo "make-base-image: built ${todo[*]} (Debian $SUITE, python3 $python_version)"
