#!/usr/bin/env bash
# Put a gVisor runsc that real agents can work in at /usr/local/lib/airlock/runsc-<date>/runsc
# and print its path.
#
# Debian 12's runsc (0.0~20221219) rejects statx's AT_NO_AUTOMOUNT flag, which coreutils
# always passes: `ls`, `stat`, `find -newer`... answer EINVAL for every path. Debian 13's
# (0.0~20240729, a static binary with no dependencies) does not. It is fetched with the
# ordinary apt client from the mirror the host's own apt configuration names, with a
# private sources list, lists and cache: the host's apt sources and state are never
# touched, and the package's signature is checked with Debian's archive keyring.
#
# Usage: scripts/fetch-runsc.sh [SUITE]     (default trixie; root not needed)
set -euo pipefail

SUITE=${1:-trixie}
MIN_DATE=20240729
PREFIX=${AIRLOCK_RUNSC_PREFIX:-/usr/local/lib/airlock}
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
here=$(cd "$(dirname "$0")/.." && pwd)

say() { printf 'airlock-runsc: %s\n' "$*" >&2; }

runsc_date() {  # the release date in a runsc's --version, e.g. 20240729
    "$1" --version 2>/dev/null | grep -o '20[0-9]\{6\}' | head -n 1 || true
}

for existing in "$(command -v runsc || true)" "$PREFIX"/runsc-*/runsc; do
    if [ -n "$existing" ] && [ -x "$existing" ] && [ "$(runsc_date "$existing")" -ge "$MIN_DATE" ] 2>/dev/null; then
        echo "$existing"
        exit 0
    fi
done

command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null || {
    say "apt-get and dpkg-deb are needed to fetch Debian's runsc"; exit 3; }
[ -f "$KEYRING" ] || { say "$KEYRING is missing (apt-get install debian-archive-keyring)"; exit 3; }

# The host's Debian mirror: the first `deb` source for the main archive (not security).
mirror=$(python3 - "$here/runner/images/hostconfig.py" <<'PY'
import importlib.util, sys
spec = importlib.util.spec_from_file_location("hostconfig", sys.argv[1])
mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
for uri, suites, comps in mod.apt_sources():
    if "main" in comps and "security" not in uri and "debian" in uri:
        print(uri.rstrip("/")); break
PY
)
[ -n "$mirror" ] || { say "no Debian mirror in the host's apt configuration"; exit 3; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/cache" "$work/archives/partial"
echo "deb [signed-by=$KEYRING] $mirror $SUITE main" > "$work/sources.list"
: > "$work/status"
opts=(-o "Dir::Etc::sourcelist=$work/sources.list" -o "Dir::Etc::sourceparts=-"
      -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache"
      -o "Dir::Cache::archives=$work/archives" -o "Dir::State::status=$work/status"
      -o "Debug::NoLocking=1" -o "APT::Sandbox::User=root")
say "fetching runsc from Debian $SUITE at $mirror (private apt state in $work)"
apt-get "${opts[@]}" -qq update
(cd "$work" && apt-get "${opts[@]}" -qq download runsc)
deb=$(ls "$work"/runsc_*.deb)
dpkg-deb -x "$deb" "$work/root"
date=$(runsc_date "$work/root/usr/bin/runsc")
if [ -z "$date" ] || [ "$date" -lt "$MIN_DATE" ]; then
    say "Debian $SUITE's runsc is ${date:-of unknown date}, older than $MIN_DATE"; exit 3
fi
dest="$PREFIX/runsc-$date"
mkdir -p "$dest"
install -m 0755 "$work/root/usr/bin/runsc" "$dest/runsc.tmp"
mv "$dest/runsc.tmp" "$dest/runsc"
say "installed $("$dest/runsc" --version | head -n 1) at $dest/runsc"
echo "$dest/runsc"
