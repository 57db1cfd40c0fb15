#!/usr/bin/env bash
# Tools the test suite drives besides Python: git (workspace patches), tmux (the live
# console is checked in a real terminal) and openssl (test certificate authorities). Installed only where missing, as root on Debian.
set -euo pipefail
need=()
command -v git >/dev/null 2>&1 || need+=(git)
command -v tmux >/dev/null 2>&1 || need+=(tmux)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "airlock: installing ${need[*]} for the tests" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
else
    echo "airlock: the tests need ${need[*]}; install them" >&2
    exit 3
fi
