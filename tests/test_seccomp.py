"""The seccomp compiler: pure unit tests, then the compiled profiles on the real engine (slow)."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import textwrap
from typing import Any

import pytest
from pydantic import ValidationError

from runner.errors import PolicyError
from runner.policy.loader import policy_from_dict
from runner.policy.models import DEFAULT_SYSCALL_GROUPS, SeccompPolicy
from runner.policy.seccomp import (
    CLONE_NAMESPACE_FLAGS,
    PERSONALITIES,
    compile_seccomp,
    native_arch,
    unknown_syscalls,
)
from runner.policy.syscalls import (
    AARCH64,
    ALL_SYSCALLS,
    ENOSYS_WHEN_DENIED,
    GROUPS,
    NEVER,
    TABLES,
    X86_64,
)

RUNTIMES = ("runc", "runsc")
ARCHES = ("x86_64", "aarch64")

# Docker's default profile for a container without capabilities on amd64 (moby
# profiles/seccomp/default.json: the unconditional names, the amd64 block, and the calls it
# allows only under argument conditions). "At least as strict" means a subset of this.


def words(text: str) -> frozenset[str]:
    return frozenset(text.split())


DOCKER_DEFAULT_ALLOW = words("""
    accept accept4 access adjtimex alarm bind brk capget capset chdir chmod chown
    clock_adjtime clock_getres clock_gettime clock_nanosleep close close_range connect
    copy_file_range creat dup dup2 dup3 epoll_create epoll_create1 epoll_ctl epoll_ctl_old
    epoll_pwait epoll_pwait2 epoll_wait epoll_wait_old eventfd eventfd2 execve execveat exit
    exit_group faccessat faccessat2 fadvise64 fallocate fanotify_mark fchdir fchmod fchmodat
    fchown fchownat fcntl fdatasync fgetxattr flistxattr flock fork fremovexattr fsetxattr
    fstat fstatfs fsync ftruncate futex futex_waitv futimesat getcpu getcwd getdents
    getdents64 getegid geteuid getgid getgroups getitimer getpeername getpgid getpgrp getpid
    getppid getpriority getrandom getresgid getresuid getrlimit get_robust_list getrusage
    getsid getsockname getsockopt get_thread_area gettid gettimeofday getuid getxattr
    inotify_add_watch inotify_init inotify_init1 inotify_rm_watch io_cancel ioctl io_destroy
    io_getevents io_pgetevents ioprio_get ioprio_set io_setup io_submit io_uring_enter
    io_uring_register io_uring_setup kill landlock_add_rule landlock_create_ruleset
    landlock_restrict_self lchown lgetxattr link linkat listen listxattr llistxattr
    lremovexattr lseek lsetxattr lstat madvise membarrier memfd_create memfd_secret mincore
    mkdir mkdirat mknod mknodat mlock mlock2 mlockall mmap mprotect mq_getsetattr mq_notify
    mq_open mq_timedreceive mq_timedsend mq_unlink mremap msgctl msgget msgrcv msgsnd msync
    munlock munlockall munmap name_to_handle_at nanosleep newfstatat open openat openat2 pause
    pidfd_open pidfd_send_signal pipe pipe2 pkey_alloc pkey_free pkey_mprotect poll ppoll
    prctl pread64 preadv preadv2 prlimit64 process_mrelease pselect6 pwrite64 pwritev pwritev2
    read readahead readlink readlinkat readv recvfrom recvmmsg recvmsg remap_file_pages
    removexattr rename renameat renameat2 restart_syscall rmdir rseq rt_sigaction
    rt_sigpending rt_sigprocmask rt_sigqueueinfo rt_sigreturn rt_sigsuspend rt_sigtimedwait
    rt_tgsigqueueinfo sched_getaffinity sched_getattr sched_getparam sched_get_priority_max
    sched_get_priority_min sched_getscheduler sched_rr_get_interval sched_setaffinity
    sched_setattr sched_setparam sched_setscheduler sched_yield seccomp select semctl semget
    semop semtimedop sendfile sendmmsg sendmsg sendto setfsgid setfsuid setgid setgroups
    setitimer setpgid setpriority setregid setresgid setresuid setreuid setrlimit
    set_robust_list setsid setsockopt set_thread_area set_tid_address setuid setxattr shmat
    shmctl shmdt shmget shutdown sigaltstack signalfd signalfd4 socketpair splice stat statfs
    statx symlink symlinkat sync sync_file_range syncfs sysinfo tee tgkill time timer_create
    timer_delete timer_getoverrun timer_gettime timer_settime timerfd_create timerfd_gettime
    timerfd_settime times tkill truncate umask uname unlink unlinkat utime utimensat utimes
    vfork vmsplice wait4 waitid write writev
    arch_prctl modify_ldt clone personality socket
""")


def rules(profile: dict[str, Any], name: str) -> list[dict[str, Any]]:
    return [r for r in profile["syscalls"] if name in r["names"]]


def allowed(profile: dict[str, Any]) -> set[str]:
    return {n for r in profile["syscalls"] if r["action"] == "SCMP_ACT_ALLOW" for n in r["names"]}


def unconditional(profile: dict[str, Any]) -> set[str]:
    return {
        n
        for r in profile["syscalls"]
        if r["action"] == "SCMP_ACT_ALLOW" and not r.get("args")
        for n in r["names"]
    }


def action_of(profile: dict[str, Any], name: str) -> tuple[str, int | None]:
    """The (action, errnoRet) a call with no argument rule gets."""
    plain = [r for r in rules(profile, name) if not r.get("args")]
    assert len(plain) <= 1, f"{name} has {len(plain)} plain rules"
    if not plain:
        return profile["defaultAction"], None
    return plain[0]["action"], plain[0].get("errnoRet")


# --- tables and groups ----------------------------------------------------------------


def test_tables_match_known_numbers() -> None:
    assert (X86_64["read"], X86_64["socket"], X86_64["clone"], X86_64["personality"]) == (
        0, 41, 56, 135)
    assert (AARCH64["openat"], AARCH64["socket"], AARCH64["clone"], AARCH64["personality"]) == (
        56, 198, 220, 92)
    for table in (X86_64, AARCH64):
        assert table["clone3"] == 435
        assert table["futex_waitv"] == 449
        assert max(table.values()) == 450
        assert len(set(table.values())) == len(table)
    assert "open" not in AARCH64 and "arch_prctl" not in AARCH64
    assert "arch_specific_syscall" not in AARCH64


def test_groups_name_only_real_syscalls_and_never_overlap_never() -> None:
    for group, names in GROUPS.items():
        assert names <= ALL_SYSCALLS, f"{group}: {sorted(names - ALL_SYSCALLS)}"
        if group != "never":
            assert not names & NEVER, f"{group} allows {sorted(names & NEVER)}"
    assert ENOSYS_WHEN_DENIED <= ALL_SYSCALLS
    assert not ENOSYS_WHEN_DENIED & NEVER
    assert set(DEFAULT_SYSCALL_GROUPS) <= set(GROUPS)


def test_never_covers_the_required_set() -> None:
    required = words("""
        mount umount2 pivot_root unshare setns ptrace process_vm_readv process_vm_writev bpf
        keyctl add_key request_key userfaultfd perf_event_open io_uring_setup io_uring_enter
        io_uring_register kexec_load kexec_file_load init_module finit_module delete_module
        open_by_handle_at name_to_handle_at chroot reboot swapon swapoff fsopen fsmount
        open_tree move_mount mount_setattr fsconfig fspick kcmp pidfd_getfd acct quotactl
        lookup_dcookie settimeofday clock_settime adjtimex sethostname setdomainname iopl
        ioperm syslog fanotify_init
    """)
    assert required <= NEVER


# --- profile shape --------------------------------------------------------------------


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("arch", ARCHES)
def test_profile_shape(runtime: str, arch: str) -> None:
    profile = compile_seccomp(SeccompPolicy(), runtime, arch)  # type: ignore[arg-type]
    assert profile["defaultAction"] == "SCMP_ACT_ERRNO"
    assert profile["architectures"] == [
        {"x86_64": "SCMP_ARCH_X86_64", "aarch64": "SCMP_ARCH_AARCH64"}[arch]
    ]
    assert set(profile) == {"defaultAction", "architectures", "syscalls"}
    for rule in profile["syscalls"]:
        assert rule["names"], rule
        assert set(rule) <= {"names", "action", "args", "errnoRet"}, rule
        assert set(rule["names"]) <= TABLES[arch].keys()
    assert json.loads(json.dumps(profile)) == profile
    assert compile_seccomp(SeccompPolicy(), runtime, arch) == profile  # type: ignore[arg-type]


def test_arch_aliases_and_default() -> None:
    assert native_arch("amd64") == "x86_64" and native_arch("arm64") == "aarch64"
    policy = SeccompPolicy()
    assert compile_seccomp(policy, "runc") == compile_seccomp(policy, "runc", platform.machine())
    arm = compile_seccomp(policy, "runc", "arm64")
    assert "open" not in allowed(arm) and "openat" in allowed(arm)
    assert "arch_prctl" in allowed(compile_seccomp(policy, "runc", "x86_64"))
    with pytest.raises(ValueError, match="riscv64"):
        compile_seccomp(policy, "runc", "riscv64")
    with pytest.raises(ValueError, match="runtime"):
        compile_seccomp(policy, "kata")  # type: ignore[arg-type]


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_default_groups_are_at_least_as_strict_as_docker(runtime: str) -> None:
    extra = allowed(compile_seccomp(SeccompPolicy(), runtime, "x86_64")) - DOCKER_DEFAULT_ALLOW
    # gVisor answers every ERRNO with EPERM, which breaks glibc's clone3 -> clone fallback;
    # the Sentry implements clone3 itself.
    assert extra == ({"clone3"} if runtime == "runsc" else set())
    for group, names in GROUPS.items():
        if group != "never":
            assert names - DOCKER_DEFAULT_ALLOW <= {"clone3"}, group


def test_default_action_never_empty_even_without_groups() -> None:
    for runtime in RUNTIMES:
        profile = compile_seccomp(SeccompPolicy(groups=[]), runtime, "x86_64")  # type: ignore[arg-type]
        assert profile["defaultAction"] == "SCMP_ACT_ERRNO"
        assert not allowed(profile)
        assert profile["syscalls"], "a rule-less profile would be a seccomp-disabled one"


# --- allow, deny, never ---------------------------------------------------------------


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("arch", ARCHES)
def test_never_set_is_never_allowed(runtime: str, arch: str) -> None:
    everything = [g for g in GROUPS if g != "never"]
    profile = compile_seccomp(SeccompPolicy(groups=everything), runtime, arch)  # type: ignore[arg-type]
    assert not allowed(profile) & NEVER
    denied = {n for r in profile["syscalls"]
              if r["action"] == profile["defaultAction"] and "errnoRet" not in r
              for n in r["names"]}
    assert denied == NEVER & TABLES[arch].keys()


def test_never_names_cannot_be_allowed() -> None:
    for name in sorted(NEVER):
        with pytest.raises(ValidationError, match="always denied"):
            SeccompPolicy(allow=[name])
    # A policy that skipped validation still cannot get one through the compiler.
    sneaky = SeccompPolicy.model_construct(
        groups=["file-io"], allow=["ptrace", "mount"], deny=[], socket_families=["unix"],
        default_action="errno",
    )
    assert unknown_syscalls(sneaky) and len(unknown_syscalls(sneaky)) == 2
    for runtime in RUNTIMES:
        with pytest.raises(ValueError, match="ptrace is always denied"):
            compile_seccomp(sneaky, runtime)  # type: ignore[arg-type]


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_deny_wins_over_groups_and_allow(runtime: str) -> None:
    policy = SeccompPolicy(allow=["getppid", "seccomp"], deny=["getppid", "seccomp", "chmod"])
    profile = compile_seccomp(policy, runtime, "x86_64")  # type: ignore[arg-type]
    for name in ("getppid", "chmod"):
        assert name not in allowed(profile)
        assert action_of(profile, name) == ("SCMP_ACT_ERRNO", None)
    assert "seccomp" not in allowed(profile)
    assert "fchmod" in allowed(profile)


@pytest.mark.parametrize("name", ["socket", "clone", "personality", "socketpair"])
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_deny_removes_conditional_rules(name: str, runtime: str) -> None:
    profile = compile_seccomp(SeccompPolicy(deny=[name]), runtime, "x86_64")  # type: ignore[arg-type]
    assert not [r for r in rules(profile, name) if r["action"] == "SCMP_ACT_ALLOW"]


def test_extra_allow_adds_a_call() -> None:
    assert "shmget" not in allowed(compile_seccomp(SeccompPolicy(), "runc", "x86_64"))
    profile = compile_seccomp(SeccompPolicy(allow=["shmget"]), "runc", "x86_64")
    assert "shmget" in unconditional(profile)
    assert "shmget" in unconditional(compile_seccomp(SeccompPolicy(groups=["ipc"]), "runc"))


# --- unknown names --------------------------------------------------------------------


def test_unknown_names_are_rejected_with_a_suggestion() -> None:
    with pytest.raises(ValidationError, match=r"'getppidd' is not a syscall.*'getppid'"):
        SeccompPolicy(deny=["getppidd"])
    with pytest.raises(ValidationError, match="not a syscall"):
        SeccompPolicy(allow=["definitely_not_a_syscall"])
    with pytest.raises(ValidationError, match=r"unknown syscall group 'polling2'.*'polling'"):
        SeccompPolicy(groups=["polling2"])
    with pytest.raises(ValidationError, match="always-denied set"):
        SeccompPolicy(groups=["file-io", "never"])
    # i386-only names are unknown here: the profile lists no compat arch at all.
    with pytest.raises(ValidationError):
        SeccompPolicy(allow=["socketcall"])


def test_unknown_names_in_unvalidated_policy() -> None:
    bad = SeccompPolicy.model_construct(
        groups=["file-io", "netinet"], allow=["getppidd"], deny=["mountt"],
        socket_families=["unix"], default_action="errno",
    )
    problems = unknown_syscalls(bad)
    assert len(problems) == 3
    assert any("netinet" in p and "net-inet" in p for p in problems)
    with pytest.raises(ValueError, match="mountt"):
        compile_seccomp(bad, "runc")
    assert unknown_syscalls(SeccompPolicy()) == []


def test_policy_errors_point_at_the_item() -> None:
    with pytest.raises(PolicyError) as info:
        policy_from_dict({"process": {"seccomp": {"deny": ["chmod", "getppidd"]}}})
    assert any("process.seccomp.deny.1" in p and "getppid" in p for p in info.value.problems)


# --- argument rules -------------------------------------------------------------------


def all_args(profile: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(n, a) for r in profile["syscalls"] for a in r.get("args", ()) for n in r["names"]]


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("arch", ARCHES)
def test_only_eq_conditions_one_per_rule(runtime: str, arch: str) -> None:
    everything = [g for g in GROUPS if g != "never"]
    for policy in (SeccompPolicy(), SeccompPolicy(groups=everything, allow=["socket"])):
        profile = compile_seccomp(policy, runtime, arch)  # type: ignore[arg-type]
        for rule in profile["syscalls"]:
            assert len(rule.get("args", ())) <= 1, rule
            if rule.get("args"):
                assert len(rule["names"]) == 1 and rule["action"] == "SCMP_ACT_ALLOW"
        ops = {(n, a["op"]) for n, a in all_args(profile)}
        mknod = {("mknodat", "SCMP_CMP_MASKED_EQ")}
        if arch == "x86_64":
            mknod.add(("mknod", "SCMP_CMP_MASKED_EQ"))
        assert ops == {("socket", "SCMP_CMP_EQ"), ("socketpair", "SCMP_CMP_EQ"),
                       ("personality", "SCMP_CMP_EQ"), ("clone", "SCMP_CMP_MASKED_EQ"), *mknod}


@pytest.mark.parametrize("runtime", ["runc", "runsc"])
def test_mknod_makes_fifos_and_files_never_devices(runtime: str) -> None:
    profile = compile_seccomp(SeccompPolicy(), runtime, "x86_64")  # type: ignore[arg-type]
    for name, index in (("mknod", 1), ("mknodat", 2)):
        got = sorted((a["index"], a["value"], a.get("valueTwo")) for n, a in all_args(profile)
                     if n == name)
        assert got == [(index, 0o170000, t) for t in (0, 0o010000, 0o100000)]
        assert not any(name in r["names"] and not r.get("args") and r["action"].endswith("ALLOW")
                       for r in profile["syscalls"])


def eq_values(profile: dict[str, Any], name: str = "socket") -> list[int]:
    values = []
    for rule in rules(profile, name):
        assert rule["action"] == "SCMP_ACT_ALLOW"
        (arg,) = rule["args"]
        assert arg["index"] == 0 and arg["op"] == "SCMP_CMP_EQ"
        values.append(arg["value"])
    return sorted(values)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_socket_families(runtime: str) -> None:
    def compiled(**kw: Any) -> dict[str, Any]:
        return compile_seccomp(SeccompPolicy(**kw), runtime, "x86_64")  # type: ignore[arg-type]

    assert eq_values(compiled()) == [1, 2, 10]
    assert eq_values(compiled(socket_families=["unix"])) == [1]
    assert eq_values(compiled(socket_families=["inet"])) == [2]
    assert eq_values(compiled(socket_families=[])) == []
    # The groups grant families, socket_families narrows them.
    groups = [g for g in DEFAULT_SYSCALL_GROUPS if g != "net-inet"]
    assert eq_values(compiled(groups=groups)) == [1]
    assert eq_values(compiled(groups=[g for g in groups if g != "net-unix"])) == []
    assert eq_values(compiled(groups=["file-io"], allow=["socket"])) == [1, 2, 10]
    # socketpair carries a family too: AF_UNIX only, whatever socket() may create.
    assert eq_values(compiled(), "socketpair") == [1]
    assert eq_values(compiled(socket_families=["inet"]), "socketpair") == [1]
    for name in ("socket", "socketpair"):
        assert name not in unconditional(compiled(allow=[name]))


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_clone_refuses_namespace_flags(runtime: str) -> None:
    profile = compile_seccomp(SeccompPolicy(allow=["clone"]), runtime, "x86_64")  # type: ignore[arg-type]
    (rule,) = rules(profile, "clone")
    assert rule["action"] == "SCMP_ACT_ALLOW"
    assert rule["args"] == [
        {"index": 0, "value": 0x7E020000, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}
    ]
    assert CLONE_NAMESPACE_FLAGS == 0x7E020000


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_personality_only_harmless_values(runtime: str) -> None:
    profile = compile_seccomp(SeccompPolicy(allow=["personality"]), runtime, "x86_64")  # type: ignore[arg-type]
    assert "personality" not in unconditional(profile)
    assert eq_values(profile, "personality") == [0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF]
    assert sorted(PERSONALITIES) == [0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF]


# --- runtime differences --------------------------------------------------------------


def test_clone3_per_runtime() -> None:
    runc = compile_seccomp(SeccompPolicy(), "runc", "x86_64")
    assert action_of(runc, "clone3") == ("SCMP_ACT_ERRNO", 38)
    assert "clone3" not in allowed(runc)
    # Allowing clone3 on runc would let it create namespaces: its flags sit behind a pointer.
    assert action_of(compile_seccomp(SeccompPolicy(allow=["clone3"]), "runc"), "clone3") == (
        "SCMP_ACT_ERRNO", 38)
    runsc = compile_seccomp(SeccompPolicy(), "runsc", "x86_64")
    assert action_of(runsc, "clone3") == ("SCMP_ACT_ALLOW", None)
    # A denial still wins on runsc, though gVisor can only answer it with EPERM.
    denied = compile_seccomp(SeccompPolicy(deny=["clone3"]), "runsc", "x86_64")
    assert action_of(denied, "clone3") == ("SCMP_ACT_ERRNO", None)


def test_kill_action_per_runtime() -> None:
    kill = SeccompPolicy(default_action="kill")
    runc = compile_seccomp(kill, "runc", "x86_64")
    runsc = compile_seccomp(kill, "runsc", "x86_64")
    assert runc["defaultAction"] == "SCMP_ACT_KILL_PROCESS"
    # gVisor rejects KILL_PROCESS and its KILL only ends the calling thread; an unhandled
    # SIGSYS from TRAP ends the whole process.
    assert runsc["defaultAction"] == "SCMP_ACT_TRAP"
    # Killing on clone3 would kill every pthread_create; ENOSYS keeps the clone fallback.
    assert action_of(runc, "clone3") == ("SCMP_ACT_ERRNO", 38)
    assert action_of(runc, "bpf") == ("SCMP_ACT_KILL_PROCESS", None)
    assert action_of(runsc, "bpf") == ("SCMP_ACT_TRAP", None)
    assert "SCMP_ACT_KILL" not in json.dumps(runsc)


def test_errno_ret_only_on_runc() -> None:
    runsc = compile_seccomp(SeccompPolicy(deny=["statx"]), "runsc", "x86_64")
    assert "errnoRet" not in json.dumps(runsc)
    runc = compile_seccomp(SeccompPolicy(deny=["statx"]), "runc", "x86_64")
    assert action_of(runc, "statx") == ("SCMP_ACT_ERRNO", 38)
    # Every fallback-capable call not allowed answers ENOSYS, the rest EPERM.
    enosys = {n for r in runc["syscalls"] if r.get("errnoRet") == 38 for n in r["names"]}
    assert enosys == (ENOSYS_WHEN_DENIED & X86_64.keys()) - allowed(runc)
    assert {"clone3", "statx", "landlock_create_ruleset", "futex_waitv"} <= enosys


@pytest.mark.parametrize("groups", [[], ["file-io"], list(DEFAULT_SYSCALL_GROUPS)])
def test_runc_enosys_stub_covers_only_unknown_calls(groups: list[str]) -> None:
    # runc answers ENOSYS for numbers above the highest the profile names; naming up to
    # futex_waitv keeps that to calls newer than the tables, whatever the groups.
    profile = compile_seccomp(SeccompPolicy(groups=groups), "runc", "x86_64")
    named = {n for r in profile["syscalls"] for n in r["names"]}
    assert max(X86_64[n] for n in named) >= X86_64["futex_waitv"]


# --- on the real engine ---------------------------------------------------------------

PROBE = r"""
import asyncio, ctypes, errno, json, os, socket, subprocess, threading
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
libc.syscall.argtypes = [ctypes.c_long] + [ctypes.c_ulong] * 5

def sc(nr, *args):
    ctypes.set_errno(0)
    r = libc.syscall(nr, *(list(args) + [0] * (5 - len(args))))
    return "OK" if r != -1 else errno.errorcode.get(ctypes.get_errno(), ctypes.get_errno())

out = {}
out["unshare"] = sc(272, 0x10000000)                     # CLONE_NEWUSER
out["mount"] = sc(165, 0, 0, 0)
out["ptrace"] = sc(101, 0)                               # PTRACE_TRACEME
out["bpf"] = sc(321, 0, 0, 0)
out["keyctl"] = sc(250, 0)
params = ctypes.create_string_buffer(120)
out["io_uring_setup"] = sc(425, 8, ctypes.addressof(params))
out["personality_addr_no_randomize"] = sc(135, 0x0040000)
out["socket_netlink"] = sc(41, 16, 3, 0)
out["socket_vsock"] = sc(41, 40, 1, 0)
out["socket_inet_upper_bits"] = sc(41, 2 | 1 << 32, 1, 0)
out["clone3"] = sc(435, 0, 0)
r = libc.syscall(56, 0x10000000 | 17, 0, 0, 0, 0)        # clone(CLONE_NEWUSER|SIGCHLD)
if r == 0:
    os._exit(0)
out["clone_newuser"] = "OK" if r > 0 else errno.errorcode[ctypes.get_errno()]

# What must keep working.
seen = []
t = threading.Thread(target=seen.append, args=(1,))
t.start(); t.join()
out["thread"] = seen == [1]
out["subprocess"] = subprocess.run(["sh", "-c", "echo hi"], capture_output=True, text=True).stdout
pid = os.fork()
if pid == 0:
    os._exit(7)
out["fork"] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
srv = socket.create_server(("127.0.0.1", 0))
cli = socket.create_connection(srv.getsockname())
conn, _ = srv.accept()
cli.sendall(b"ping")
out["tcp"] = conn.recv(4).decode()
socket.socket(socket.AF_INET6).close()
usrv = socket.socket(socket.AF_UNIX)
usrv.bind("/tmp/s"); usrv.listen()
ucli = socket.socket(socket.AF_UNIX); ucli.connect("/tmp/s")
out["unix"] = True
out["asyncio"] = asyncio.run(asyncio.sleep(0, "ok"))
out["seccomp"] = [l.split()[1] for l in open("/proc/self/status") if l.startswith("Seccomp:")]
print(json.dumps(out))
"""

DENIED = {
    name: "EPERM"
    for name in ("unshare", "mount", "ptrace", "bpf", "keyctl", "io_uring_setup",
                 "personality_addr_no_randomize", "socket_netlink", "socket_vsock",
                 "socket_inet_upper_bits", "clone_newuser")
}
WORKS = {"thread": True, "subprocess": "hi\n", "fork": 7, "tcp": "ping", "unix": True,
         "asyncio": "ok", "seccomp": ["2"]}


def _docker(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)


def _engine_image() -> str:
    if shutil.which("docker") is None:
        pytest.skip("no docker CLI")
    try:
        info = _docker("info", "--format", "{{json .Runtimes}}", timeout=30)
    except subprocess.TimeoutExpired:
        pytest.skip("docker info timed out")
    if info.returncode != 0:
        pytest.skip(f"no Docker engine: {info.stderr.strip()}")
    image = os.environ.get("AIRLOCK_TEST_IMAGE")
    if image:
        return image
    listed = _docker("images", "airlock/base", "--format", "{{.Repository}}:{{.Tag}}")
    tags = [t for t in listed.stdout.split() if not t.endswith(":<none>")]
    if not tags:
        pytest.skip("no image: set AIRLOCK_TEST_IMAGE or build airlock/base (needs python3)")
    return tags[0]  # newest first


@pytest.fixture(scope="module")
def image() -> str:
    return _engine_image()


def _run(image: str, runtime: str, profile: dict[str, Any], code: str, tmp_path: Any) -> Any:
    info = _docker("info", "--format", "{{json .Runtimes}}")
    if runtime not in json.loads(info.stdout or "{}"):
        pytest.skip(f"runtime {runtime} is not registered with the engine")
    # The docker CLI reads seccomp=<value> as a file; the Engine API would take the text.
    path = tmp_path / f"seccomp-{runtime}.json"
    path.write_text(json.dumps(profile, separators=(",", ":")))
    return _docker(
        "run", "--rm", "--init", "--network", "none", "--read-only",
        "--tmpfs", "/tmp:size=16m", "--cap-drop", "ALL", "--user", "1000:1000",
        "--security-opt", "no-new-privileges", "--security-opt", f"seccomp={path}",
        "--runtime", runtime, image, "python3", "-c", code,
    )


@pytest.mark.slow
@pytest.mark.runtime
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_profile_on_engine(runtime: str, image: str, tmp_path: Any) -> None:
    profile = compile_seccomp(SeccompPolicy(), runtime)  # type: ignore[arg-type]
    proc = _run(image, runtime, profile, textwrap.dedent(PROBE), tmp_path)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.splitlines()[-1])
    # "Seccomp: 0" under runsc means the runtime was registered without --oci-seccomp and
    # no profile applies at all.
    assert got["seccomp"] == ["2"], f"no seccomp filter under {runtime}"
    for name, want in {**DENIED, **WORKS}.items():
        assert got[name] == want, f"{runtime}: {name} gave {got[name]!r}, expected {want!r}"
    # runc: the explicit errnoRet rule. runsc: allowed, so the Sentry answers; 20221219 has
    # no clone3 (ENOSYS), a Sentry with clone3 refuses the empty args (EINVAL). EPERM from
    # the filter would break pthread_create.
    assert got["clone3"] == "ENOSYS" if runtime == "runc" else got["clone3"] in ("ENOSYS", "EINVAL")


@pytest.mark.slow
@pytest.mark.runtime
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_deny_and_kill_on_engine(runtime: str, image: str, tmp_path: Any) -> None:
    denied = compile_seccomp(SeccompPolicy(deny=["getppid"]), runtime)  # type: ignore[arg-type]
    code = textwrap.dedent("""
        import ctypes, os
        libc = ctypes.CDLL(None, use_errno=True)
        print(libc.syscall(110), ctypes.get_errno(), os.getpid() > 0)
    """)
    proc = _run(image, runtime, denied, code, tmp_path)
    assert (proc.returncode, proc.stdout.split()) == (0, ["-1", "1", "True"]), proc.stderr

    killing = compile_seccomp(SeccompPolicy(default_action="kill"), runtime)  # type: ignore[arg-type]
    code = textwrap.dedent("""
        import ctypes, threading
        t = threading.Thread(target=print, args=("thread",)); t.start(); t.join()
        print("bpf", flush=True)
        ctypes.CDLL(None).syscall(321, 0, 0, 0)
        print("survived", flush=True)
    """)
    proc = _run(image, runtime, killing, code, tmp_path)
    # 159 = 128 + SIGSYS: the process died at its first denied call.
    assert proc.returncode == 159, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout.split() == ["thread", "bpf"]

    # A denied call in a worker thread must take the whole process with it (gVisor's
    # SCMP_ACT_KILL ended only the thread: the main thread went on and exited 3 here).
    code = textwrap.dedent("""
        import ctypes, os, threading, time
        threading.Thread(target=ctypes.CDLL(None).syscall, args=(321, 0, 0, 0)).start()
        time.sleep(2)
        print("survived", flush=True)
        os._exit(3)
    """)
    proc = _run(image, runtime, killing, code, tmp_path)
    assert (proc.returncode, proc.stdout) == (159, ""), (proc.returncode, proc.stderr)
