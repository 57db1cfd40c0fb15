"""The workspace as the policy gives it: read-only, a private copy, or the host's own.

In copy mode the agent gets a copy on a size-capped tmpfs the host mounts for the run
(`filesystem.copy_size`, `copy_files`): whatever the agent writes, the host's disk is
never touched and its memory is bounded by the cap. Under runc and runsc alike the pages
the agent writes are charged to the sandbox's own memory cgroup (measured: a write of
150 MiB showed as 150 MiB of shmem in the container's cgroup under both), so they also
count against `resources.memory`; the seed copy is charged to the host process.

At the end the changes come back as a patch, bounded before anything is diffed: files
over `patch_file_size` (apparent size, so a sparse file counts in full) are listed, not
read; each remaining file is diffed by its own git process under a memory limit and a
timeout; the patch stops growing at `patch_size`. What is left out is listed, never
dropped silently. The copy is made without following symlinks, and the walk and git
both treat links as links, so an agent cannot make the host read outside its copy.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import resource
import shutil
import stat
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from runner.errors import BadInput, NotReady

PAGE = 4096
# tmpfs keeps a symlink target shorter than this in the inode itself, longer in a page.
SHORT_SYMLINK = 128
MOUNT_SOURCE = "airlock-workspace"  # how gc finds a copy's mount left by a dead run
DIFF_MEMORY = 1 << 30  # address space of one git diff (8 MiB of one-byte lines peaks ~540 MB)
DIFF_FILE_TIMEOUT = 30.0  # seconds for one file's diff
PATCH_DEADLINE = 120.0  # seconds for the whole patch step
LEFT_OUT_LISTED = 1000  # entries of the left-out list kept in the report and the event
LEFT_OUT_PATH = 512  # characters of a left-out path kept (the agent chose it)

_MS_NOSUID, _MS_NODEV = 2, 4
_MNT_DETACH = 2


@dataclass(frozen=True)
class CopyLimits:
    size: int
    files: int


@dataclass(frozen=True)
class PatchLimits:
    size: int
    file_size: int
    deadline: float = PATCH_DEADLINE


@dataclass
class PreparedWorkspace:
    host_path: Path | None  # what the sandbox sees at /workspace
    writable: bool
    origin: Path | None  # the user's directory
    copy: Path | None = None
    limits: CopyLimits | None = None
    # The newest inode change time in the copy right after it was made: a file whose
    # ctime is not later was not touched by the agent (ctime cannot be set from inside).
    copied_ctime_ns: int = 0


@dataclass
class Patch:
    text: str = ""
    left_out: list[dict[str, object]] = field(default_factory=list)
    left_out_count: int = 0
    files: int = 0  # files whose diff is in `text`

    def leave_out(self, path: str, reason: str, size: int, sparse: bool = False) -> None:
        self.left_out_count += 1
        if len(self.left_out) < LEFT_OUT_LISTED:
            shown = path if len(path) <= LEFT_OUT_PATH else path[:LEFT_OUT_PATH] + "..."
            entry: dict[str, object] = {"path": shown, "reason": reason, "size": size}
            if sparse:
                entry["sparse"] = True
            self.left_out.append(entry)


def prepare(origin: Path | None, mode: str, scratch: Path, uid: int, gid: int,
            limits: CopyLimits | None = None) -> PreparedWorkspace:
    if origin is None:
        return PreparedWorkspace(None, False, None)
    origin = origin.resolve()
    if not origin.is_dir():
        raise BadInput(f"workspace {origin} is not a directory")
    if mode == "ro":
        return PreparedWorkspace(origin, False, origin)
    if mode == "rw":
        return PreparedWorkspace(origin, True, origin)
    limits = limits or CopyLimits(1 << 30, 100_000)
    need, files = footprint(origin)
    if need > limits.size or files > limits.files:
        raise BadInput(_too_big(origin, need, files, limits))
    copy = scratch / "workspace"
    copy.mkdir(mode=0o700)
    mount_tmpfs(copy, limits, uid, gid, stat.S_IMODE(origin.stat().st_mode))
    try:
        newest = _seed(origin, copy, uid, gid, limits)
    except BaseException:
        unmount(copy)
        raise
    return PreparedWorkspace(copy, True, origin, copy, limits, newest)


def _seed(origin: Path, copy: Path, uid: int, gid: int, limits: CopyLimits) -> int:
    """Copy the workspace into `copy` (an empty, size-capped tmpfs), owned by the
    sandbox user; return the newest inode change time in the copy."""
    try:
        shutil.copytree(origin, copy, symlinks=True, dirs_exist_ok=True,
                        ignore=lambda d, names: [n for n in names if _special(Path(d) / n)])
    except (OSError, shutil.Error) as exc:
        if _is_enospc(exc):  # the workspace grew while it was being copied
            raise BadInput(_too_big(origin, *footprint(origin), limits)) from None
        raise
    os.chmod(copy, stat.S_IMODE(origin.stat().st_mode))
    newest = 0
    for dirpath, dirnames, filenames in os.walk(copy):
        for name in [*dirnames, *filenames]:
            os.lchown(Path(dirpath) / name, uid, gid)
            newest = max(newest, os.lstat(Path(dirpath) / name).st_ctime_ns)
    os.lchown(copy, uid, gid)
    return max(newest, os.lstat(copy).st_ctime_ns)


POOLED_RO_MAX = 64 << 20  # bytes: a read-only workspace copied into a pooled sandbox
# Files, directories and links of one: a snapshot is on the host's disk, and empty
# files weigh nothing in bytes (measured: 200,000 empty files passed the byte cap and
# took 22 s and 200,000 of the host's inodes to copy; a cold run binds them in 0.2 s).
POOLED_RO_FILES = 20_000


def pooled_mode(origin: Path | None, mode: str) -> str | None:
    """How a run's workspace would go into a pooled sandbox: "none", "ro" or "copy";
    None when it cannot (rw: the host's own directory must be the mount; a read-only
    workspace too big to copy quickly, which a cold start binds for free)."""
    if origin is None:
        return "none"
    if mode == "copy":
        return "copy"
    if mode == "ro" and origin.is_dir():
        need, files = footprint(origin.resolve())
        if need <= POOLED_RO_MAX and files <= POOLED_RO_FILES:
            return "ro"
    return None


def fill_pooled(origin: Path, mode: str, target: Path, uid: int, gid: int,
                limits: CopyLimits) -> PreparedWorkspace:
    """The workspace placed in a claimed sandbox's directory, mounted when the pool
    created it (under gVisor a mount made after the start is not seen inside): a copy
    on its size-capped tmpfs (copy), or a snapshot it sees read-only (ro)."""
    origin = origin.resolve()
    if not origin.is_dir():
        raise BadInput(f"workspace {origin} is not a directory")
    if mode == "copy":
        need, files = footprint(origin)
        if need > limits.size or files > limits.files:
            raise BadInput(_too_big(origin, need, files, limits))
        newest = _seed(origin, target, uid, gid, limits)
        return PreparedWorkspace(target, True, origin, target, limits, newest)
    copied = 0
    entries = 0

    def skip(directory: str, names: list[str]) -> list[str]:
        # Every entry passes here before it is made, directories and links included.
        nonlocal entries
        entries += len(names)
        if entries > 2 * POOLED_RO_FILES:
            raise BadInput(f"workspace {origin} grew past {2 * POOLED_RO_FILES} files "
                           "while it was copied into the sandbox")
        return [n for n in names if _special(Path(directory) / n)]

    def bounded_copy(src: str, dst: str) -> None:
        # measured before the claim, but the directory may grow while it is copied
        nonlocal copied
        copied += os.lstat(src).st_size
        if copied > 2 * POOLED_RO_MAX:
            raise BadInput(f"workspace {origin} grew past {_mib(2 * POOLED_RO_MAX)} "
                           "while it was copied into the sandbox")
        shutil.copy2(src, dst, follow_symlinks=False)

    shutil.copytree(origin, target, symlinks=True, dirs_exist_ok=True,
                    copy_function=bounded_copy, ignore=skip)
    _same_owners(origin, target)
    os.chmod(target, stat.S_IMODE(origin.stat().st_mode) | 0o555)
    return PreparedWorkspace(target, False, origin)


def _same_owners(origin: Path, target: Path) -> None:
    """The snapshot's owners as the bind mount of a cold run would show them: a copy made
    by root is root's, and the sandbox's user could no longer read its own 0600 files."""
    for dirpath, dirnames, filenames in os.walk(target):
        for name in [".", *dirnames, *filenames]:
            copied = Path(dirpath, name)
            try:
                st = os.lstat(origin / copied.relative_to(target))
                os.lchown(copied, st.st_uid, st.st_gid)
            except OSError:
                continue


def footprint(root: Path) -> tuple[int, int]:
    """Bytes and inodes a copy of `root` takes on tmpfs (pages, not file sizes)."""
    need, files = 0, 1
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                need += -(-st.st_size // PAGE) * PAGE
            elif stat.S_ISLNK(st.st_mode):
                need += PAGE if st.st_size >= SHORT_SYMLINK else 0
            elif not stat.S_ISDIR(st.st_mode):
                continue  # not copied
            files += 1
    return need, files


def _too_big(origin: Path, need: int, files: int, limits: CopyLimits) -> str:
    return (f"workspace {origin} needs {_mib(need)} in {files} files; copy mode holds at most "
            f"filesystem.copy_size {_mib(limits.size)} in filesystem.copy_files {limits.files} "
            "(raise them in the policy, or use workspace: ro)")


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _is_enospc(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    if isinstance(exc, shutil.Error):  # copytree gathers per-file errors as text
        return any("No space left" in str(e) for e in exc.args[0])
    return False


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def mount_tmpfs(target: Path, limits: CopyLimits, uid: int, gid: int, mode: int) -> None:
    # No noexec: the agent runs what is in its workspace (./configure, scripts), as it
    # could in the plain directory before. nosuid/nodev: nothing there is privileged.
    opts = f"size={limits.size},nr_inodes={limits.files},mode={mode:o},uid={uid},gid={gid}"
    if _libc().mount(MOUNT_SOURCE.encode(), os.fsencode(target), b"tmpfs",
                     _MS_NOSUID | _MS_NODEV, opts.encode()) != 0:
        err = ctypes.get_errno()
        target.rmdir()
        raise NotReady(
            f"copy mode needs a size-capped filesystem for the workspace copy and mounting "
            f"one failed: {os.strerror(err)}",
            hint="run Airlock as root (it mounts a tmpfs per run), or use workspace: ro")


def unmount(target: Path) -> None:
    """Detach the copy's tmpfs (its memory is freed when the last user lets go)."""
    _libc().umount2(os.fsencode(target), _MNT_DETACH)


def leftover_mounts(prefix: str) -> list[Path]:
    """Copies still mounted under scratch directories whose names start with `prefix`."""
    out: list[Path] = []
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        parts = line.split()
        if len(parts) >= 3 and parts[0] == MOUNT_SOURCE and parts[2] == "tmpfs":
            path = Path(parts[1].replace("\\040", " "))
            if path.parent.name.startswith(prefix):
                out.append(path)
    return out


def usage(ws: PreparedWorkspace) -> tuple[int, int] | None:
    """Free bytes and free inodes of the copy's filesystem, None without a copy."""
    if ws.copy is None:
        return None
    try:
        st = os.statvfs(ws.copy)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize, st.f_favail


def _special(path: Path) -> bool:
    mode = path.lstat().st_mode
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode))


GIT_DIR = ".git"


def _index(root: Path, unreadable: list[str]) -> dict[str, os.stat_result]:
    """Every file and link under `root` by relative path, never following a link; what
    cannot be read (a path past PATH_MAX, say) goes to `unreadable`, not silently away."""
    out: dict[str, os.stat_result] = {}

    def note(exc: OSError) -> None:
        unreadable.append(os.path.relpath(exc.filename or str(root), root))

    for dirpath, dirnames, filenames in os.walk(root, onerror=note):
        rel_dir = os.path.relpath(dirpath, root)
        # Git's own metadata is not the agent's change: `git status` alone rewrites
        # .git/index, and `git apply` refuses any patch that touches .git (so would a
        # host that applies a patch: hooks and config there run code).
        dirnames[:] = [d for d in dirnames if d != GIT_DIR]
        filenames = [f for f in filenames if f != GIT_DIR]
        for name in [*dirnames, *filenames]:
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                unreadable.append(rel)
                continue
            if stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode):
                out[rel] = st
    return out


def _same_content(a: Path, b: Path, deadline: float) -> bool | None:
    """True/False, or None when the deadline came first."""
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            if time.monotonic() > deadline:
                return None
            ca, cb = fa.read(1 << 20), fb.read(1 << 20)
            if ca != cb:
                return False
            if not ca:
                return True


def _changed(ws: PreparedWorkspace, rel: str, a: os.stat_result | None,
             b: os.stat_result | None, deadline: float) -> bool | None:
    assert ws.origin is not None and ws.copy is not None
    if a is None or b is None or stat.S_IFMT(a.st_mode) != stat.S_IFMT(b.st_mode):
        return True
    if stat.S_ISLNK(a.st_mode):
        return os.readlink(ws.origin / rel) != os.readlink(ws.copy / rel)
    if a.st_size != b.st_size or stat.S_IMODE(a.st_mode) & 0o111 != stat.S_IMODE(b.st_mode) & 0o111:
        return True
    if b.st_ctime_ns <= ws.copied_ctime_ns and a.st_mtime_ns == b.st_mtime_ns:
        return False  # untouched since the copy, and the origin did not move either
    same = _same_content(ws.origin / rel, ws.copy / rel, deadline)
    return None if same is None else not same


def _limit_diff() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (DIFF_MEMORY, DIFF_MEMORY))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


@dataclass
class _Change:
    rel: str
    added: bool
    deleted: bool
    size: int
    sparse: bool


class _Differ:
    """Runs git on one pair of paths in the view directory, within the caps."""

    def __init__(self, view: Path, limits: PatchLimits, deadline: float) -> None:
        git = shutil.which("git")
        if git is None:
            raise BadInput("git is needed on the host to compute the workspace patch")
        self.git, self.view, self.deadline = git, view, deadline
        self.env = {"PATH": os.environ.get("PATH", ""), "HOME": "/nonexistent",
                    "GIT_CONFIG_NOSYSTEM": "1", "LC_ALL": "C"}

    def diff(self, left: str, right: str, timeout: float) -> bytes | str:
        """git's output, or why there is none (timeout, diff_failed, deadline)."""
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            return "deadline"
        try:
            proc = subprocess.run(
                [self.git, "-c", "core.quotepath=off", "diff", "--no-index", "--binary",
                 "--no-color", "--no-ext-diff", "--no-textconv", "--no-prefix", "--",
                 left, right],
                cwd=self.view, capture_output=True, env=self.env, preexec_fn=_limit_diff,
                timeout=max(0.1, min(timeout, remaining)))
        except subprocess.TimeoutExpired:
            return "timeout"
        return proc.stdout if proc.returncode in (0, 1) else "diff_failed"


def patch(ws: PreparedWorkspace, limits: PatchLimits | None = None) -> Patch:
    """The agent's changes as a unified diff (git format, binary-safe), within the caps."""
    out = Patch()
    if ws.copy is None or ws.origin is None:
        return out
    limits = limits or PatchLimits(32 << 20, 8 << 20)
    deadline = time.monotonic() + limits.deadline
    # Devices, fifos and sockets the agent made have no place in a patch, and reading
    # a fifo would hang the host. What cannot be reached (a path past PATH_MAX) is
    # listed by the walk below, never a reason to lose the rest.
    for dirpath, dirnames, filenames in os.walk(ws.copy):
        for name in [*dirnames, *filenames]:
            p = Path(dirpath) / name
            with contextlib.suppress(OSError):
                if _special(p):
                    p.unlink()
    # git runs in a directory where a -> the origin and b -> the copy, so its own header
    # names are already a/<path> and b/<path>; n holds empty directories that stand for
    # the origin's side of directories the agent created.
    view = ws.copy.parent / "diff-view"
    shutil.rmtree(view, ignore_errors=True)
    (view / "n").mkdir(parents=True)
    (view / "a").symlink_to(ws.origin)
    (view / "b").symlink_to(ws.copy)
    try:
        _patch(ws, limits, deadline, _Differ(view, limits, deadline), out)
    finally:
        shutil.rmtree(view, ignore_errors=True)
    return out


def _patch(ws: PreparedWorkspace, limits: PatchLimits, deadline: float, differ: _Differ,
           out: Patch) -> None:
    assert ws.origin is not None and ws.copy is not None
    unreadable: list[str] = []
    before = _index(ws.origin, [])
    after = _index(ws.copy, unreadable)
    for rel in sorted(set(unreadable)):
        out.leave_out(rel, "unreadable", 0)
    todo: list[_Change] = []
    for rel in sorted(before.keys() | after.keys()):
        a, b = before.get(rel), after.get(rel)
        size = max(a.st_size if a else 0, b.st_size if b else 0)
        sparse = any(s is not None and stat.S_ISREG(s.st_mode) and s.st_blocks * 512 < s.st_size
                     for s in (a, b))
        if any(s is not None and s.st_size > limits.file_size and stat.S_ISREG(s.st_mode)
               for s in (a, b)):
            # Not even compared: a sparse 2 GiB file would cost seconds and gigabytes.
            unchanged = (a is not None and b is not None and a.st_size == b.st_size
                         and b.st_ctime_ns <= ws.copied_ctime_ns
                         and a.st_mtime_ns == b.st_mtime_ns)
            if not unchanged:
                out.leave_out(rel, "file_size", size, sparse)
            continue
        # Past the deadline only the cheap checks still run: an unchanged file is never
        # listed, one that needs reading is (as "deadline").
        changed = _changed(ws, rel, a, b, deadline)
        if changed is None:
            out.leave_out(rel, "deadline", size, sparse)
        elif changed:
            todo.append(_Change(rel, a is None, b is None, size, sparse))

    # Directories the agent created go to git whole (one process for a node_modules,
    # not one per file), unless something in them was left out above.
    held_back = {str(f["path"]) for f in out.left_out}
    roots: dict[str, list[_Change]] = {}
    for c in todo:
        root = _new_root(ws.origin, c.rel) if c.added else None
        if root is not None:
            roots.setdefault(root, []).append(c)
    batched = {r: cs for r, cs in roots.items()
               if len(cs) > 1 and not any(h == r or h.startswith(r + "/") for h in held_back)}

    chunks: list[bytes] = []
    total = 0
    done: set[str] = set()
    for c in todo:
        if c.rel in done:
            continue
        root = _new_root(ws.origin, c.rel) if c.added else None
        if root in batched:
            assert root is not None
            group = batched.pop(root)
            # git's whole answer is held here before it is measured: batch only what
            # cannot come out larger than what is left of the patch (a new file's diff
            # is at most about twice its size: "+" lines, or base85 of deflate).
            bound = sum(2 * g.size + 512 for g in group)
            text: bytes | str = "too_big"
            if total + bound <= limits.size:
                (differ.view / "n" / root).mkdir(parents=True, exist_ok=True)
                text = differ.diff(f"n/{root}", f"b/{root}", DIFF_FILE_TIMEOUT * 4)
            if isinstance(text, bytes) and total + len(text) <= limits.size:
                chunks.append(_fix_headers(text))
                total += len(text)
                out.files += len(group)
                done.update(g.rel for g in group)
                continue
            # Too big or too slow together: each file on its own below.
        for item in ([c] if root is None else roots.get(root, [c])):
            if item.rel in done:
                continue
            done.add(item.rel)
            left = "/dev/null" if item.added else f"a/{item.rel}"
            right = "/dev/null" if item.deleted else f"b/{item.rel}"
            text = differ.diff(left, right, DIFF_FILE_TIMEOUT)
            if isinstance(text, str):
                out.leave_out(item.rel, text, item.size, item.sparse)
            elif total + len(text) > limits.size:
                out.leave_out(item.rel, "patch_size", item.size, item.sparse)
            else:
                chunks.append(_fix_headers(text))
                total += len(text)
                out.files += 1
    out.text = b"".join(chunks).decode("utf-8", errors="surrogateescape")


def _new_root(origin: Path, rel: str) -> str | None:
    """The outermost directory of `rel` that the origin has no directory for, if any."""
    parts = rel.split("/")[:-1]
    for i in range(1, len(parts) + 1):
        prefix = "/".join(parts[:i])
        try:
            if not stat.S_ISDIR(os.lstat(origin / prefix).st_mode):
                return prefix
        except FileNotFoundError:
            return prefix
    return None


def _fix_headers(diff: bytes) -> bytes:
    """git names both sides after the file that exists when the other is /dev/null
    (`diff --git b/x b/x` for an added file, `a/x a/x` for a deleted one); make each such
    header `a/x b/x`, as git's own diffs say. Only section headers start with
    "diff --git ": hunk lines start with " +-@\\" and binary lines carry no space."""
    lines = diff.split(b"\n")
    for i, line in enumerate(lines):
        if not line.startswith(b"diff --git "):
            continue
        names = line[len(b"diff --git "):]
        half = (len(names) - 1) // 2
        one = names[:half]  # both names are the same token: "b/x" or "\"b/x\""
        if names != one + b" " + one:
            continue
        quote = b'"' if one.startswith(b'"') else b""
        bare = one[len(quote) + 2:]
        lines[i] = b"diff --git " + quote + b"a/" + bare + b" " + quote + b"b/" + bare
    return b"\n".join(lines)
