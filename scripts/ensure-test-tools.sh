#!/usr/bin/env bash
# Tools the test suite drives besides Python: git (workspace patches), tmux (the live
# console is checked in a real terminal), openssl (test certificate authorities),
# PostgreSQL's server binaries (the service's store is tested on a real server that the
# suite starts itself) and Debian's chromium (`airlock view` is driven in a real headless
# browser through Playwright, which is told to use this executable: no browser download
# of its own). Installed only where missing, as root on Debian.
set -euo pipefail
need=()
command -v git >/dev/null 2>&1 || need+=(git)
command -v tmux >/dev/null 2>&1 || need+=(tmux)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null || need+=(postgresql)
[ -x /usr/bin/chromium ] || need+=(chromium)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "airlock: installing ${need[*]} for the tests" >&2
    export DEBIAN_FRONTEND=noninteractive
    if [[ " ${need[*]} " == *" postgresql "* ]]; then
        # Only the binaries: no cluster of the system's own, no server started by it
        # (the tests start theirs in a temporary directory).
        mkdir -p /etc/postgresql-common
        if ! grep -qs '^create_main_cluster' /etc/postgresql-common/createcluster.conf; then
            echo 'create_main_cluster = false' >> /etc/postgresql-common/createcluster.conf
        fi
    fi
    apt-get update -qq && apt-get install -y -qq --no-install-recommends -o Dpkg::Options::=--force-confold "${need[@]}" >/dev/null
else
    echo "airlock: the tests need ${need[*]}; install them" >&2
    exit 3
fi
