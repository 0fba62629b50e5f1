#!/usr/bin/env bash
# Install and configure podman + buildah on a Debian/Ubuntu machine without a Docker
# engine, so that `make -C docker build DOCKER=podman` and `kfp-grpo run --runner docker`
# work there (the CI machine, a fresh VM). Run as root. Idempotent.
#
#   docker/setup-podman.sh             # packages + containers.conf
#   docker/setup-podman.sh --service   # ... and start podman's Docker-compatible API
#                                      #     (then: export DOCKER_HOST=unix:///run/podman/podman.sock)
#
# What it writes: /etc/containers/containers.conf.d/50-kfp-grpo.conf with
#   - runtime = "runc": crun refuses hybrid cgroup v1/v2 hosts; runc works on both;
#   - default_ulimits within the host's hard limits: podman otherwise asks for more open
#     files / processes than an unprivileged host (or a container CI runner) allows, and
#     every `podman run` fails with `setrlimit ...: Operation not permitted`.
# Environment: KFP_GRPO_PODMAN_SOCKET (default /run/podman/podman.sock).
set -euo pipefail

SOCKET="${KFP_GRPO_PODMAN_SOCKET:-/run/podman/podman.sock}"
CONF_DIR=/etc/containers/containers.conf.d
CONF="$CONF_DIR/50-kfp-grpo.conf"
PACKAGES=(podman buildah runc mmdebstrap uidmap fuse-overlayfs containernetworking-plugins)

die() { echo "setup-podman: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (it installs packages and writes $CONF)"
command -v apt-get >/dev/null || die "needs apt-get (Debian/Ubuntu); install ${PACKAGES[*]} by hand"

missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup-podman: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# A limit no higher than the host's hard limit ("unlimited" counts as no cap).
cap() { local want=$1 hard=$2; if [ "$hard" != unlimited ] && [ "$hard" -lt "$want" ]; then echo "$hard"; else echo "$want"; fi; }
nofile=$(cap 20000 "$(ulimit -Hn)")
nproc=$(cap 32768 "$(ulimit -Hu)")

mkdir -p "$CONF_DIR"
cat > "$CONF.tmp" <<EOF
# Written by kfp-grpo's docker/setup-podman.sh.
[containers]
default_ulimits = ["nofile=${nofile}:${nofile}", "nproc=${nproc}:${nproc}"]

[engine]
runtime = "runc"
EOF
mv "$CONF.tmp" "$CONF"
echo "setup-podman: wrote $CONF (runc; nofile=$nofile, nproc=$nproc)"

if [ "${1:-}" = "--service" ]; then
    if curl -fsS --unix-socket "$SOCKET" http://d/_ping >/dev/null 2>&1; then
        echo "setup-podman: the Docker API is already served at $SOCKET"
    else
        mkdir -p "$(dirname "$SOCKET")"
        rm -f "$SOCKET"
        nohup podman system service --time=0 "unix://$SOCKET" >/var/log/podman-service.log 2>&1 &
        for _ in $(seq 50); do
            curl -fsS --unix-socket "$SOCKET" http://d/_ping >/dev/null 2>&1 && break
            sleep 0.2
        done
        curl -fsS --unix-socket "$SOCKET" http://d/_ping >/dev/null 2>&1 \
            || die "podman system service did not answer on $SOCKET (see /var/log/podman-service.log)"
        echo "setup-podman: the Docker API is served at $SOCKET (log: /var/log/podman-service.log)"
    fi
    echo "export DOCKER_HOST=unix://$SOCKET"
fi
