#!/usr/bin/env bash
# Make a Docker Engine reachable for Airlock.
#
# An engine that already answers (DOCKER_HOST or the default socket) is used as it
# is: nothing on it is changed. Only where none answers, and only as root on Debian,
# do we install Debian's docker.io and runsc and start a dockerd of our own with
# gVisor registered under the runtime name "runsc" (and once more, on gVisor's ptrace
# platform, as "runsc-ptrace": no idle cost per sandbox, for dense hosts). Anywhere
# else we say what to install and exit 3 (the CLI's "environment not ready").
set -euo pipefail

say() { printf 'airlock-engine: %s\n' "$*" >&2; }

engine_answers() {
    command -v docker >/dev/null 2>&1 && timeout 10 docker info >/dev/null 2>&1
}

if engine_answers; then
    say "using the Docker Engine at ${DOCKER_HOST:-the default socket} (left unchanged)"
    exit 0
fi

if [ -n "${DOCKER_HOST:-}" ]; then
    say "DOCKER_HOST=${DOCKER_HOST} does not answer; start that engine or unset DOCKER_HOST"
    exit 3
fi

if [ "$(id -u)" != 0 ] || [ ! -f /etc/debian_version ] || ! command -v apt-get >/dev/null; then
    say "no Docker Engine answers. Install Docker Engine (and gVisor's runsc for the strict preset), start it, then retry."
    exit 3
fi

# The runtime arguments this design needs: runsc refuses --network none without
# --network=none, cannot connect to bind-mounted host unix sockets without
# --host-uds=open, and ignores the OCI seccomp profile without --oci-seccomp.
CONF_DIR=/etc/airlock
CONF=$CONF_DIR/dockerd.json
LOG=/var/log/airlock-dockerd.log

need=()
command -v dockerd >/dev/null 2>&1 || need+=(docker.io)
command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
if [ ${#need[@]} -gt 0 ]; then
    say "installing Debian packages: ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # The package's own service start is refused in this kind of machine; we start dockerd below.
    apt-get install -y -qq --no-install-recommends "${need[@]}" iproute2 >/dev/null
fi

# Debian 12's own runsc (2022-12) fails `ls`/`stat` (statx); a newer one comes from
# Debian 13. Only if that cannot be had is the older one installed, with a warning
# (`airlock doctor` says the same).
if ! RUNSC=$("$(dirname "$0")/fetch-runsc.sh"); then
    say "WARNING: no runsc from Debian 13; using Debian's own (ls/stat fail under it, see airlock doctor)"
    command -v runsc >/dev/null 2>&1 || apt-get install -y -qq --no-install-recommends runsc >/dev/null
    RUNSC=$(command -v runsc)
fi

mkdir -p "$CONF_DIR"
cat > "$CONF.tmp" <<JSON
{
  "runtimes": {
    "runsc": {
      "path": "$RUNSC",
      "runtimeArgs": ["--network=none", "--host-uds=open", "--oci-seccomp"]
    },
    "runsc-ptrace": {
      "path": "$RUNSC",
      "runtimeArgs": ["--network=none", "--host-uds=open", "--oci-seccomp", "--platform=ptrace"]
    }
  }
}
JSON
mv "$CONF.tmp" "$CONF"

say "starting dockerd (log: $LOG)"
# its own session: the engine outlives the shell (and its process group) that set it up
setsid nohup dockerd --config-file "$CONF" >"$LOG" 2>&1 < /dev/null &

for _ in $(seq 1 60); do
    if engine_answers; then
        say "engine ready: $(docker version --format '{{.Server.Version}}' 2>/dev/null)"
        exit 0
    fi
    sleep 1
done
say "dockerd did not answer within 60 s; see $LOG"
tail -n 20 "$LOG" >&2 || true
exit 3
