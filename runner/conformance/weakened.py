"""The weakened counterparts: for every attack, a policy or setting under which it escapes.

They exist to prove the suite can fail (tests/test_conformance.py runs each one and
expects its targets to report "escaped"); `airlock conformance` never applies them.

Three kinds:
- policy: a policy a user could write (capabilities, read_only_root: false, workspace:
  rw, env.set, network.allow / allow_private, exec_tmpfs, larger limits, ...).
- setting: the boundary has no knob there (network mode none, the seccomp `never`
  set, masked /proc paths, the proxy's Host check, the gateway's scrubbing, ...), so a
  test-only change outside the policy opens it: an edit of the engine's create call
  (network mode, seccomp=unconfined, systempaths=unconfined, root, an extra bind mount,
  a shared pid namespace), or an in-process patch of one host-side check. Nothing here
  needs --privileged (which some hosts, this CI's included, cannot grant).
- policy+setting: both together.

Where an attack needs a setting that one runtime ignores (runsc keeps its own netstack
whatever Docker's network mode says; it has no /proc/sys of the host), the counterpart
runs on runc only; `runtimes` says which.
"""

from __future__ import annotations

import contextlib
import io
import os
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from runner.conformance.engine import HOST_CONFIG_EXTRA, CreateHook
from runner.conformance.runner import HOST_ENV_NAME, Context, Weakening

PolicyEdit = Callable[[Context, str, dict[str, Any]], None]


# -- building blocks ---------------------------------------------------------------------


def _edits(*fns: Callable[[dict[str, Any]], None]) -> PolicyEdit:
    def edit(ctx: Context, batch: str, d: dict[str, Any]) -> None:
        for fn in fns:
            fn(d)

    return edit


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def fn(d: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = d
        for p in parents:
            node = node[p]
        node[last] = value

    return fn


def _create(*fns: Callable[[Context, dict[str, Any]], None]) -> Callable[[Context], CreateHook]:
    def make(ctx: Context) -> CreateHook:
        def hook(kwargs: dict[str, Any]) -> None:
            for fn in fns:
                fn(ctx, kwargs)

        return hook

    return make


def _network(mode: str) -> Callable[[Context, dict[str, Any]], None]:
    def fn(ctx: Context, kw: dict[str, Any]) -> None:
        kw["network_mode"] = mode
        if mode == "host":
            kw.pop("hostname", None)  # Docker refuses a hostname with the host's network

    return fn


def _root(ctx: Context, kw: dict[str, Any]) -> None:
    kw["user"] = "0:0"


def _unconfined(ctx: Context, kw: dict[str, Any]) -> None:
    opts = [o for o in kw.get("security_opt") or [] if not o.startswith("seccomp=")]
    kw["security_opt"] = [*opts, "seccomp=unconfined"]


def _systempaths(ctx: Context, kw: dict[str, Any]) -> None:
    # What `docker run --security-opt systempaths=unconfined` sends.
    kw[HOST_CONFIG_EXTRA] = {"MaskedPaths": [], "ReadonlyPaths": []}


def _host_sys(ctx: Context, kw: dict[str, Any]) -> None:
    from docker.types import Mount

    kw["mounts"] = [*(kw.get("mounts") or []),
                    Mount(target="/sys", source="/sys", type="bind", read_only=False)]


def _cap_add(*caps: str) -> Callable[[Context, dict[str, Any]], None]:
    def fn(ctx: Context, kw: dict[str, Any]) -> None:
        kw["cap_add"] = [*(kw.get("cap_add") or []), *caps]

    return fn


def _bind(source: Callable[[Context], str], target: Callable[[Context], str]
          ) -> Callable[[Context, dict[str, Any]], None]:
    def fn(ctx: Context, kw: dict[str, Any]) -> None:
        from docker.types import Mount

        kw["mounts"] = [*(kw.get("mounts") or []),
                        Mount(target=target(ctx), source=source(ctx), type="bind",
                              read_only=True)]

    return fn


def _mount_writable(target: str) -> Callable[[Context, dict[str, Any]], None]:
    def fn(ctx: Context, kw: dict[str, Any]) -> None:
        for m in kw.get("mounts") or []:
            if m.get("Target") == target:
                m["ReadOnly"] = False

    return fn


def _resolv_with_nameserver(ctx: Context, kw: dict[str, Any]) -> None:
    weak = ctx.tmp / "resolv-weak.conf"
    # A loopback nameserver: inside a sandbox without a network it reaches nothing; the
    # attack must notice the configuration itself.
    weak.write_text("nameserver 127.0.0.1\n")
    weak.chmod(0o644)
    for m in kw.get("mounts") or []:
        if m.get("Target") == "/etc/resolv.conf":
            m["Source"] = str(weak)


def _exec_tmp(ctx: Context, kw: dict[str, Any]) -> None:
    tmpfs = kw.get("tmpfs") or {}
    if "/tmp" in tmpfs:
        opts = [o for o in tmpfs["/tmp"].split(",") if o != "noexec"]
        tmpfs["/tmp"] = ",".join([*opts, "exec"])


def _nnp_off(ctx: Context, batch: str, d: dict[str, Any]) -> None:
    d["process"]["no_new_privileges"] = False
    groups = d["process"]["seccomp"]["groups"]
    if "identity" not in groups:
        groups.append("identity")


def _shared_pid(ctx: Context, kw: dict[str, Any]) -> None:
    assert ctx.neighbour is not None
    kw["pid_mode"] = f"container:{ctx.neighbour['container']}"


@contextlib.contextmanager
def _patched(obj: Any, name: str, value: Any) -> Iterator[None]:
    saved = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, saved)


def _no_host_check(ctx: Context) -> contextlib.AbstractContextManager[Any]:
    from runner.gateway import proxy

    return _patched(proxy, "host_matches", lambda *a, **k: None)


def _no_scrubbing(ctx: Context) -> contextlib.AbstractContextManager[Any]:
    from runner.gateway.service import ProviderGateway

    return _patched(ProviderGateway, "_secrets", lambda self: [])


def _uncapped_copy(ctx: Context) -> contextlib.AbstractContextManager[Any]:
    from runner.run import workspace

    return _patched(workspace, "mount_tmpfs", lambda *a, **k: None)


def _believing_control(ctx: Context) -> contextlib.AbstractContextManager[Any]:
    from runner.run import orchestrator
    from runner.run.control import ControlServer

    class Believing(ControlServer):
        """Believes every connection, not only the shim's first one."""

        def _admit(self, conn: Any) -> bool:
            return True

    return _patched(orchestrator, "ControlServer", Believing)


def _trusting_log(ctx: Context, run: Any) -> None:
    """A log that takes the agent's JSON lines for what they claim to be."""
    import json

    def listen(event: Any) -> None:
        if event.type != "agent.output":
            return
        for line in str(event.data.get("text", "")).splitlines():
            line = line.strip()
            if not line.startswith("{"):
                continue
            try:
                claimed = json.loads(line)
            except ValueError:
                continue
            if isinstance(claimed, dict) and claimed.get("source") in ("host", "proxy", "gateway"):
                run.log.emit(str(claimed.get("type")), claimed["source"],
                             **(claimed.get("data") or {}))

    run.log.subscribe(listen)


def _setuid_python(ctx: Context) -> None:
    """A setuid-root copy of the image's python in a host directory (the image ships no
    setuid file at all, so the test has to bring one)."""
    from runner.images.build import image_tag

    target = ctx.tmp / "suid"
    target.mkdir(mode=0o755, exist_ok=True)
    container = ctx.client.containers.create(image_tag("base"), command=["true"])
    try:
        path = "/usr/bin/python3"
        for _ in range(4):
            stream, _stat = container.get_archive(path)
            with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
                member = tar.getmembers()[0]
                if member.issym():
                    link = member.linkname
                    path = link if link.startswith("/") else str(Path(path).parent / link)
                    continue
                data = tar.extractfile(member)
                assert data is not None
                (target / "python3").write_bytes(data.read())
                break
    finally:
        container.remove(force=True)
    os.chown(target / "python3", 0, 0)
    os.chmod(target / "python3", 0o4755)


LOOPBACK = ["127.0.0.0/8", "::1/128"]


def _proxy(allow: Callable[[Context], list[str]] | None = None,
           private: list[str] | None = None) -> PolicyEdit:
    """Widen the proxy batch's network section (the other batches have no proxy)."""

    def edit(ctx: Context, batch: str, d: dict[str, Any]) -> None:
        if batch != "proxy":
            return
        if allow is not None:
            d["network"]["allow"] = [*d["network"]["allow"], *allow(ctx)]
        if private is not None:
            d["network"]["allow_private"] = [*d["network"]["allow_private"], *private]

    return edit


def _grow(factor: int, extra: int) -> Callable[[int], int]:
    return lambda n: int(n) * factor + extra


def _resources(ctx: Context, batch: str, d: dict[str, Any], key: str, value: Any) -> None:
    d["resources"][key] = value


# -- the catalog -----------------------------------------------------------------------------

M = 1 << 20

WEAKENINGS: list[Weakening] = [
    Weakening(
        "network-host", ("net.host-tcp", "net.host-ipv6", "net.loopback-canary", "net.udp",
                         "net.dns-exfil"),
        "setting", "the sandbox in the host's network namespace (docker network_mode host)",
        runtimes=("runc",), create=_create(_network("host"))),
    Weakening(
        "network-bridge", ("net.interfaces", "net.bridge-gateway", "net.metadata-route"),
        "setting", "the sandbox on Docker's default bridge (network_mode bridge)",
        runtimes=("runc",), create=_create(_network("bridge"))),
    Weakening(
        "resolv-nameserver", ("net.dns-resolve",), "setting",
        "the sandbox's /etc/resolv.conf names a nameserver", create=_create(_resolv_with_nameserver)),
    Weakening(
        "raw-sockets", ("net.raw-socket",), "policy+setting",
        "process.capabilities: [NET_RAW], and the sandbox runs as root",
        runtimes=("runc",), policy=_edits(_set("process.capabilities", ["NET_RAW"])),
        create=_create(_root)),
    Weakening(
        "proxy-allow-port", ("proxy.disallowed-port",), "policy",
        "network.allow lists the canary's port; allow_private covers loopback",
        policy=_proxy(allow=lambda c: [f"localhost:{c.canary.ports['proxy.disallowed-port']}"],
                      private=LOOPBACK)),
    Weakening(
        "proxy-allow-literal", ("proxy.ip-literal",), "policy",
        "network.allow lists 127.0.0.1:<canary>; allow_private 127.0.0.1/32",
        policy=_proxy(allow=lambda c: [f"127.0.0.1:{c.canary.ports['proxy.ip-literal']}"],
                      private=["127.0.0.1/32"])),
    Weakening(
        "proxy-allow-private", ("proxy.private-name",), "policy",
        "network.allow_private: [127.0.0.0/8, ::1/128]", policy=_proxy(private=LOOPBACK)),
    Weakening(
        "proxy-no-host-check", ("proxy.host-mismatch",), "policy+setting",
        "allow_private covers loopback, and the proxy's Host check is patched out "
        "(in-process)", policy=_proxy(private=LOOPBACK), patch=_no_host_check),
    Weakening(
        "proxy-allow-exfil-name", ("proxy.dns-exfil",), "policy",
        "network.allow: *.airlock-conformance.invalid:443 (the suite's resolver answers "
        "locally; no query leaves the machine)",
        policy=_proxy(allow=lambda c: ["*.airlock-conformance.invalid:443"])),
    Weakening(
        "writable-root", ("fs.root-write",), "policy", "filesystem.read_only_root: false",
        policy=_edits(_set("filesystem.read_only_root", False))),
    Weakening(
        "unmasked-proc", ("fs.proc-sys", "fs.proc-masked"), "setting",
        "systempaths=unconfined (no masked or read-only /proc paths), and root",
        runtimes=("runc",), create=_create(_systempaths, _root)),
    Weakening(
        "host-sys", ("fs.sys",), "setting",
        "the host's /sys bound read-write over the sandbox's, and root",
        runtimes=("runc",), create=_create(_host_sys, _root)),
    Weakening(
        "mknod", ("fs.mknod",), "policy+setting",
        "process.capabilities: [MKNOD], read_only_root: false, root, and seccomp=unconfined "
        "(the profile refuses device nodes to mknod whatever the capabilities)",
        runtimes=("runc",),
        policy=_edits(_set("process.capabilities", ["MKNOD"]),
                      _set("filesystem.read_only_root", False)),
        create=_create(_root, _unconfined)),
    Weakening(
        "mknod-gvisor", ("fs.mknod",), "setting",
        "seccomp=unconfined: gVisor itself lets the unprivileged user make device nodes on "
        "its tmpfs and open them (nodev is not honoured)",
        runtimes=("runsc",), create=_create(_unconfined)),
    Weakening(
        "exec-tmpfs", ("fs.exec-tmpfs",), "policy+setting",
        "filesystem.exec_tmpfs: [/tmp], and `exec` in /tmp's mount options (the compiled "
        "options leave it out, and Docker's tmpfs default is noexec)",
        policy=_edits(_set("filesystem.exec_tmpfs", ["/tmp"])), create=_create(_exec_tmp)),
    Weakening(
        "writable-shim", ("fs.shim-write",), "policy+setting",
        "filesystem.read_only_root: false, and root (who owns /opt/airlock)",
        runtimes=("runc",),
        policy=_edits(_set("filesystem.read_only_root", False)), create=_create(_root)),
    Weakening(
        "writable-sockets-dir", ("fs.sockets-dir",), "setting",
        "/run/airlock bound read-write, and root (who owns it on the host)",
        runtimes=("runc",), create=_create(_mount_writable("/run/airlock"), _root)),
    Weakening(
        "workspace-rw", ("fs.workspace-symlink", "fs.workspace-hardlink"), "policy",
        "filesystem.workspace: rw (the host's directory itself)",
        policy=lambda ctx, b, d: d["filesystem"].update(workspace="rw")),
    Weakening(
        "exposed-host-socket", ("fs.host-sockets",), "setting",
        "the host's decoy socket directory bound into the sandbox at its host path",
        create=_create(_bind(lambda c: str(c.decoy.path.parent),
                             lambda c: str(c.decoy.path.parent)))),
    Weakening(
        "capabilities", ("priv.capabilities",), "policy", "process.capabilities: [CHOWN]",
        policy=_edits(_set("process.capabilities", ["CHOWN"]))),
    Weakening(
        "setuid", ("priv.setuid",), "policy+setting",
        "process.no_new_privileges: false (+ seccomp group identity), and a setuid-root "
        "python bound in (the image has no setuid file)",
        runtimes=("runc",), prepare=_setuid_python, policy=_nnp_off,
        create=_create(_bind(lambda c: str(c.tmp / "suid"), lambda c: "/opt/conformance-suid"))),
    Weakening(
        "no-new-privs-off", ("priv.no-new-privs",), "policy",
        "process.no_new_privileges: false (+ seccomp group identity, without which runc "
        "cannot set up the user once the filter is applied before it); runsc reports "
        "no_new_privs=1 whatever the setting", runtimes=("runc",), policy=_nnp_off),
    Weakening(
        "seccomp-unconfined", ("priv.seccomp-off", "priv.unshare", "priv.mount", "priv.ptrace",
                               "priv.keyctl", "priv.io-uring", "priv.personality",
                               "priv.socket-families", "priv.userfaultfd", "priv.perf-event"),
        "setting", "seccomp=unconfined (the policy cannot allow the `never` set)",
        runsc_targets=("priv.seccomp-off", "priv.unshare", "priv.ptrace",
                       "priv.socket-families"),
        create=_create(_unconfined)),
    Weakening(
        "bpf", ("priv.bpf",), "setting",
        "seccomp=unconfined, root and CAP_SYS_ADMIN (the host has unprivileged bpf off)",
        runtimes=("runc",), create=_create(_unconfined, _root, _cap_add("SYS_ADMIN"))),
    Weakening(
        "pids", ("res.fork-bomb",), "policy",
        "resources.pids: 4096 (and memory 4x + 512m, which that many processes need)",
        policy=lambda ctx, b, d: d["resources"].update(
            pids=4096, memory=_grow(4, 512 * M)(policy_value(d, "memory")))),
    Weakening(
        "memory", ("res.memory",), "policy", "resources.memory: 4x + 512m",
        policy=lambda ctx, b, d: _resources(
            ctx, b, d, "memory", _grow(4, 512 * M)(policy_value(d, "memory")))),
    Weakening(
        "tmpfs-size", ("res.tmpfs-fill",), "policy", "every tmpfs 4x + 64m",
        policy=lambda ctx, b, d: d["filesystem"].update(tmpfs={
            k: _grow(4, 64 * M)(v if isinstance(v, int) else _size(v))
            for k, v in d["filesystem"]["tmpfs"].items()})),
    Weakening(
        "uncapped-copy", ("res.workspace-disk",), "setting",
        "the workspace copy in a plain host directory, as before it had a tmpfs of its own "
        "(in-process)", patch=_uncapped_copy),
    Weakening(
        "output-budget", ("res.output-flood",), "policy", "resources.output_bytes: 8x",
        policy=lambda ctx, b, d: _resources(
            ctx, b, d, "output_bytes", _grow(8, 0)(policy_value(d, "output_bytes")))),
    Weakening(
        "nofile", ("res.fd-exhaust",), "policy", "resources.nofile: 8x",
        policy=lambda ctx, b, d: _resources(
            ctx, b, d, "nofile", min(int(d["resources"]["nofile"]) * 8, 1 << 20))),
    Weakening(
        "key-in-env", ("sec.provider-key",), "policy",
        "env.set: {CONFORMANCE_LEAK: <the provider key>}",
        policy=lambda ctx, b, d: d["env"]["set"].update(CONFORMANCE_LEAK=ctx.key)),
    Weakening(
        "no-scrubbing", ("sec.key-reflection",), "setting",
        "the gateway's secret scrubbing patched out (in-process)", patch=_no_scrubbing),
    Weakening(
        "host-env-allowed", ("sec.host-env",), "policy", f"env.allow: [{HOST_ENV_NAME}]",
        policy=lambda ctx, b, d: d["env"]["allow"].append(HOST_ENV_NAME)),
    Weakening(
        "neighbour-mounted", ("sec.neighbour-files",), "setting",
        "the neighbour run's sockets directory bound in at its host path",
        create=_create(_bind(lambda c: str((c.neighbour or {})["run_dir"]),
                             lambda c: str((c.neighbour or {})["run_dir"])))),
    Weakening(
        "shared-pid-namespace", ("sec.neighbour-procs",), "setting",
        "the sandbox joins the neighbour's pid namespace (pid_mode container:<id>)",
        runtimes=("runc",), create=_create(_shared_pid)),
    Weakening(
        "trusting-log", ("log.forged-events",), "setting",
        "a log writer that records the agent's JSON lines as the events they claim to be "
        "(in-process)", on_run=_trusting_log),
    Weakening(
        "believing-control", ("log.control-forge",), "setting",
        "a control socket that believes every connection (in-process)",
        patch=_believing_control),
    Weakening(
        "runs-dir-in-workspace", ("log.runs-dir",), "policy",
        "the runs directory given as the (read-only) workspace, with "
        "filesystem.allow_sensitive_workspace: true (without it the run is refused)",
        policy=lambda ctx, b, d: d["filesystem"].update(allow_sensitive_workspace=True),
        workspace=lambda ctx: ctx.runs_dir, prepare=lambda ctx: ctx.runs_dir.chmod(0o755)),
]


def _size(text: str) -> int:
    from runner.policy.units import parse_size

    return parse_size(text)


def policy_value(d: dict[str, Any], key: str) -> int:
    value = d["resources"][key]
    return value if isinstance(value, int) else _size(value)


BY_NAME: dict[str, Weakening] = {w.name: w for w in WEAKENINGS}


def for_attack(attack_id: str) -> list[Weakening]:
    return [w for w in WEAKENINGS if attack_id in w.targets]
