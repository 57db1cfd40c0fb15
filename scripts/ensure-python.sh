#!/usr/bin/env bash
# A python3 that can make virtual environments; on Debian as root, install it if missing.
set -euo pipefail
PY=${1:-python3}
if command -v "$PY" >/dev/null 2>&1 && "$PY" -c 'import venv, ensurepip' >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "airlock: installing python3 and python3-venv" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq python3 python3-venv python3-pip >/dev/null
    exit 0
fi
echo "airlock: Python 3.11+ with the venv module is needed (Debian: apt-get install python3-venv)" >&2
exit 3
