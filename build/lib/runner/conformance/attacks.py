"""The catalog: every attack the conformance suite attempts.

Each attack has an id (`category.name`), what it tries, what the boundary should answer,
and the sandbox run ("batch") it belongs to. Most attacks share one run; those that
need a different workspace, network mode, or that end their sandbox get their own. The
in-sandbox half of every attack is the function of the same id in `probe.py`; the
host-side half, where there is one, lives in `runner.py` (`HOST_CHECKS`).
"""

from __future__ import annotations

from dataclasses import dataclass

# main: the policy as given, no workspace. workspace: a copy-mode workspace (the mode
# that hands the agent a writable copy of host files). proxy: network mode proxy with
# the canary's localhost ports allowed by name. The others end their sandbox (disk: a
# copy-mode workspace filled to its cap).
BATCHES = ("main", "workspace", "proxy", "forkbomb", "memory", "tmpfs", "output", "disk")


@dataclass(frozen=True)
class Attack:
    id: str
    category: str  # network | filesystem | privilege | resources | secrets | log
    tries: str
    expected: str
    batch: str = "main"
    canary: bool = False  # gets its own canary port on every host interface


def _a(id: str, tries: str, expected: str, batch: str = "main", canary: bool = False) -> Attack:
    category = {"net": "network", "proxy": "network", "fs": "filesystem", "priv": "privilege",
                "res": "resources", "sec": "secrets", "log": "log"}[id.split(".")[0]]
    return Attack(id, category, tries, expected, batch, canary)


ATTACKS: list[Attack] = [
    # -- network ------------------------------------------------------------------------
    _a("net.interfaces", "find an interface or route besides loopback",
       "only lo; no route off lo"),
    _a("net.host-tcp", "TCP to each of the host's IPv4 addresses, where a canary listens",
       "ENETUNREACH (runc) / EHOSTUNREACH (runsc); the canary sees nothing", canary=True),
    _a("net.host-ipv6", "TCP over IPv6 to the host's IPv6 and IPv4-mapped addresses",
       "ENETUNREACH / EADDRNOTAVAIL; the canary sees nothing", canary=True),
    _a("net.loopback-canary", "TCP to 127.0.0.1 and ::1 on the host canary's port",
       "ECONNREFUSED (the sandbox's own loopback); the canary sees nothing", canary=True),
    _a("net.udp", "UDP datagrams to every host address's canary port",
       "ENETUNREACH; the canary receives nothing", canary=True),
    _a("net.dns-resolve", "resolve a unique name with the system resolver",
       "no nameserver configured; lookup fails"),
    _a("net.dns-exfil", "DNS queries carrying a secret-shaped label to the host's addresses "
       "and to loopback resolvers", "nothing sent; the DNS canary receives nothing",
       canary=True),
    _a("net.bridge-gateway", "TCP and UDP to the engine's bridge gateway addresses (docker0)",
       "ENETUNREACH; the canary sees nothing", canary=True),
    _a("net.metadata-route", "find a route to cloud metadata (169.254.169.254, fd00:ec2::254) "
       "by routing table and a packet-less UDP connect()", "no route (ENETUNREACH)"),
    _a("net.raw-socket", "open raw IPv4/IPv6 and packet sockets",
       "EPERM (no CAP_NET_RAW; AF_PACKET outside the seccomp families)"),
    _a("proxy.disallowed-port", "CONNECT to an allowed name on a port the policy does not list",
       "403 not in network.allow; canary untouched", batch="proxy", canary=True),
    _a("proxy.ip-literal", "CONNECT to IP literals (127.0.0.1, [::1], 2130706433, 0x7f.1, "
       "the host's addresses)", "403 ip-literal; canary untouched", batch="proxy", canary=True),
    _a("proxy.private-name", "CONNECT to an allowed name that resolves to loopback (localhost)",
       "403 address-forbidden; canary untouched", batch="proxy", canary=True),
    _a("proxy.host-mismatch", "CONNECT / absolute GET whose Host header names another host",
       "403 host-mismatch; canary untouched", batch="proxy", canary=True),
    _a("proxy.dns-exfil", "CONNECT to an unlisted name carrying data in its labels",
       "403 before any lookup: the name never reaches a resolver", batch="proxy"),
    # -- filesystem ---------------------------------------------------------------------
    _a("fs.root-write", "create files in /, /etc, /usr, /var, the image's /workspace; "
       "append to /etc/hosts, resolv.conf, passwd", "EROFS (runc) / EROFS or EACCES (runsc)"),
    _a("fs.proc-sys", "open /proc/sys/kernel/core_pattern, modprobe, /proc/sysrq-trigger for "
       "writing (nothing is written)", "EROFS / EACCES"),
    _a("fs.sys", "open /sys/kernel/uevent_helper and the sandbox's cgroup limits for "
       "writing (nothing is written)", "EROFS / EACCES / ENOENT"),
    _a("fs.proc-masked", "read /proc/kcore, keys, timer_list, sched_debug; list /sys/firmware",
       "empty (masked) or ENOENT"),
    _a("fs.mknod", "create a character device node (1:3) and open it",
       "EPERM (no CAP_MKNOD); nodev tmpfs; runsc: ENXIO/EPERM"),
    _a("fs.exec-tmpfs", "copy a binary to every tmpfs and execute it", "EACCES (noexec)"),
    _a("fs.shim-write", "modify or add files under /opt/airlock (the shim)", "EROFS / EACCES"),
    _a("fs.sockets-dir", "create files, links or symlinks in /run/airlock (the sockets "
       "directory); open shim.cfg for writing", "EROFS (read-only bind)"),
    _a("fs.workspace-symlink", "plant symlinks to host paths in a copy-mode workspace "
       "(a new link, a file replaced by a link) and write through them",
       "the host's workspace and files untouched; the patch carries links, not content",
       batch="workspace"),
    _a("fs.workspace-hardlink", "hardlink files from outside the workspace into it; append "
       "to workspace files that share an inode with a host file",
       "EXDEV; the copy shares no inode with the host", batch="workspace"),
    _a("fs.host-sockets", "find and connect to the engine's socket and a host unix socket "
       "that was not bound in", "ENOENT everywhere"),
    # -- privilege ----------------------------------------------------------------------
    _a("priv.capabilities", "hold any capability (effective, permitted, bounding, ambient)",
       "all capability sets 0"),
    _a("priv.setuid", "become uid 0: setuid/setresuid/setgid(0), setuid-root binaries",
       "EPERM; no setuid files; no_new_privs=1"),
    _a("priv.no-new-privs", "run without no_new_privs", "PR_GET_NO_NEW_PRIVS=1"),
    _a("priv.seccomp-off", "run without a syscall filter", "Seccomp=2 (filter)"),
    _a("priv.unshare", "new user/mount/net/pid/ipc/uts namespaces via unshare and clone",
       "EPERM"),
    _a("priv.mount", "mount tmpfs, bind-mount /, mount inside a new user namespace", "EPERM"),
    _a("priv.ptrace", "PTRACE_TRACEME, PTRACE_ATTACH a sibling, process_vm_readv, other "
       "processes' /proc/<pid>/mem", "EPERM; /proc/<pid>/mem EACCES"),
    _a("priv.keyctl", "reach the kernel keyrings (keyctl, request_key)", "EPERM"),
    _a("priv.bpf", "create a BPF map", "EPERM"),
    _a("priv.io-uring", "io_uring_setup", "EPERM"),
    _a("priv.personality", "personality(ADDR_NO_RANDOMIZE / READ_IMPLIES_EXEC)", "EPERM"),
    _a("priv.socket-families", "netlink, vsock, AF_ALG, packet, AF_KEY, bluetooth sockets; "
       "family with bits above 32; socketpair(AF_INET)", "EPERM for every one"),
    _a("priv.userfaultfd", "userfaultfd (race widening for kernel exploits)", "EPERM"),
    _a("priv.perf-event", "perf_event_open on itself", "EPERM"),
    # -- resources ----------------------------------------------------------------------
    _a("res.fork-bomb", "fork until something stops it", "EAGAIN below the pids limit "
       "(runsc may end the whole sandbox instead)", batch="forkbomb"),
    _a("res.memory", "allocate past the memory limit",
       "OOM kill (exit 137) or MemoryError below the limit", batch="memory"),
    _a("res.tmpfs-fill", "write past each tmpfs's size", "ENOSPC at the size", batch="tmpfs"),
    _a("res.workspace-disk", "in a copy-mode workspace: an edit, a 3 GiB sparse file, a file "
       "over patch_file_size, then write past copy_size",
       "ENOSPC at copy_size; the run ends (exit 4, reason disk); the big files listed, not "
       "diffed; the edit in the patch", batch="disk"),
    _a("res.output-flood", "write twice the output budget to stdout",
       "the run is ended (budget_exceeded) near the budget", batch="output"),
    _a("res.fd-exhaust", "open files past the nofile limit; raise the hard limit",
       "EMFILE below the limit; raising EPERM/ValueError"),
    # -- secrets and neighbours -----------------------------------------------------------
    _a("sec.provider-key", "find the provider key in env, files, any process's environ",
       "only the placeholder key"),
    _a("sec.key-reflection", "get the real key back through the gateway from an upstream "
       "that echoes request headers", "the gateway scrubs it from the answer"),
    _a("sec.host-env", "find a variable of the host's environment", "absent"),
    _a("sec.neighbour-files", "see or connect to a concurrent run's sockets and shim.cfg",
       "ENOENT; nothing of the other run anywhere"),
    _a("sec.neighbour-procs", "see a concurrent run's processes", "only its own processes"),
    # -- the log ------------------------------------------------------------------------
    _a("log.forged-events", "print host-, proxy- and gateway-shaped event JSON on stdout and "
       "stderr", "logged as source=agent output; the hash chain holds"),
    _a("log.control-forge", "connect to the shim's control socket and send a forged "
       "self-test and agent.started", "refused and logged (control.refused); nothing believed"),
    _a("log.runs-dir", "find the runs directory, events.jsonl or report.json",
       "nowhere in the sandbox"),
]

BY_ID: dict[str, Attack] = {a.id: a for a in ATTACKS}


def select(only: list[str] | None) -> list[Attack]:
    """Attacks whose id starts with one of `only` (all of them when empty)."""
    if not only:
        return list(ATTACKS)
    return [a for a in ATTACKS if any(a.id.startswith(p) for p in only)]
