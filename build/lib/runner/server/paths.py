"""Where `airlock serve` listens, and the checks that keep its socket to its own user.

The server can start containers and is handed provider keys, so its socket must be
reachable by its user only. It lives in a directory of its own, mode 0700 and owned by
that user (under `$XDG_RUNTIME_DIR`, else `~/.cache`), and is itself mode 0600; never a
TCP port. Both ends check again: the client talks only to a socket its own uid owns in
such a directory, and the server answers only peers of its own uid (SO_PEERCRED).

Standard library only, and not even pathlib or typing: the thin client imports this
on every `airlock run`, where each millisecond of import shows. Paths are strings.
"""

from __future__ import annotations

import os
import socket
import stat
import struct

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    StrPath = str | os.PathLike[str]

SOCKET_ENV = "AIRLOCK_SERVE_SOCKET"  # an explicit socket path (tests, several servers)
NO_SERVE_ENV = "AIRLOCK_NO_SERVE"  # set: `airlock run` never asks a server
AUTO_SERVE_ENV = "AIRLOCK_AUTO_SERVE"  # "0": `airlock run` never starts one by itself
SOCKET_NAME = "serve.sock"


class InsecurePath(Exception):
    """The socket's directory or the socket could be reached by another user."""


def default_socket() -> str:
    explicit = os.environ.get(SOCKET_ENV)
    if explicit:
        return os.path.abspath(os.path.expanduser(explicit))
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and _private_dir(runtime):
        return os.path.join(runtime, "airlock", SOCKET_NAME)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "airlock", "serve", SOCKET_NAME)


def _private_dir(path: StrPath) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return (stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid()
            and not st.st_mode & 0o077)


def _check_private(path: StrPath, is_kind: Callable[[int], bool], kind: str, mode: str
                   ) -> None:
    """Raise InsecurePath unless `path` is a `kind` owned by us that no one else reaches."""
    path = os.fspath(path)
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise InsecurePath(f"{path}: {exc.strerror}") from None
    if not is_kind(st.st_mode):
        raise InsecurePath(f"{path} is not a {kind}")
    if st.st_uid != os.geteuid():
        raise InsecurePath(f"{path} is owned by uid {st.st_uid}, not {os.geteuid()}")
    if st.st_mode & 0o077:
        raise InsecurePath(f"{path} has mode {stat.S_IMODE(st.st_mode):04o}; it must be {mode}")


def check_dir(path: StrPath) -> None:
    """Raise InsecurePath unless `path` is a real directory of ours that only we reach."""
    _check_private(path, stat.S_ISDIR, "directory", "0700")


def check_socket(path: StrPath) -> None:
    """Raise InsecurePath unless `path` is a socket of ours, mode 0600, in a private dir."""
    check_dir(os.path.dirname(os.fspath(path)))
    _check_private(path, stat.S_ISSOCK, "socket", "0600")


def make_dir(path: StrPath) -> None:
    """Create the socket's directory 0700 (parents 0700 too), or check the one there."""
    old = os.umask(0o077)
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    finally:
        os.umask(old)
    check_dir(path)


def peer(sock: socket.socket) -> tuple[int, int]:
    """(pid, effective uid) of the process at the other end of a unix socket."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _gid = struct.unpack("3i", creds)
    return int(pid), int(uid)


def peer_uid(sock: socket.socket) -> int:
    return peer(sock)[1]
