"""`airlock view` in a real headless Chromium (Debian's, driven by Playwright) over runs
made here with the real engine: the counts the page shows are the log's, refusals are
highlighted, a running run updates, a tampered log shows its broken line, what the agent
wrote renders as text, a 100 MB log opens without hanging the page, and the server keeps
its token, its headers and its memory bound."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from runner.testing.scripted_provider import ScriptedProvider
from tests.conftest import AIRLOCK, PROBES, ROOT, wait_for

pytestmark = [pytest.mark.usefixtures("engine")]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
KEY = "sk-ant-view-test-" + "k" * 24
IMG = '"><img src=x onerror=alert(1)>'
SCRIPT = "<script>alert(2)</script>"
FILE_XSS = "<img src=y onerror=alert(3)>.txt"
SHOTS = os.environ.get("AIRLOCK_VIEW_SCREENSHOTS")  # a directory: save the README's pictures


def _run(runs: Path, *args: str, env: dict[str, str] | None = None,
         timeout: float = 300) -> tuple[int, Path]:
    before = set(os.listdir(runs))
    proc = subprocess.run([*AIRLOCK, "run", "--quiet", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout,
                          env={**os.environ, "AIRLOCK_RUNS_DIR": str(runs), **(env or {})})
    new = sorted(set(os.listdir(runs)) - before)
    assert new, proc.stderr
    return proc.returncode, runs / new[-1]


def _policy(tmp: Path, name: str, url: str, extra: str = "") -> str:
    path = tmp / f"{name}.yaml"
    path.write_text(f"""\
extends: default
provider:
  backend: anthropic
  base_url: {url}
  api_key_env: AIRLOCK_TEST_PROVIDER_KEY
  models: {{default: claude-sonnet-4-5}}
{extra}""")
    return str(path)


def _session(workspace: Path, cfg: dict[str, Any]) -> list[str]:
    shutil.copy(PROBES / "view_session.py", workspace / "view_session.py")
    workspace.chmod(0o755)  # the sandbox's user reads a read-only workspace in place
    (workspace / "view_session.py").chmod(0o644)
    return ["--workspace", str(workspace), "--", "python3", "-I", "/workspace/view_session.py",
            json.dumps(cfg)]


def _events(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real runs: a session with refusals and a patch, one over budget, a plain command
    whose log is then edited."""
    root = tmp_path_factory.mktemp("view-runs")
    tmp = tmp_path_factory.mktemp("view-policies")
    out: dict[str, Path] = {}
    env = {"AIRLOCK_TEST_PROVIDER_KEY": KEY}
    with ScriptedProvider(["first answer", "second answer", "third answer"] * 3,
                          api_key=KEY) as up:
        ws = tmp_path_factory.mktemp("view-ws")
        (ws / "notes.txt").write_text("one\ntwo\nthree\n")
        policy = _policy(tmp, "rich", up.url, "filesystem: {workspace: copy}\n"
                                              "budgets: {requests: 10, tokens: 100000}\n")
        code, out["rich"] = _run(root, "--policy", policy, *_session(ws, {
            "ok": 3, "refuse": [IMG, SCRIPT],
            "print": [SCRIPT, IMG, "plain line"],
            "write": {"notes.txt": "one\n2\nthree\nfour\n", FILE_XSS: "x\n"}}), env=env)
        assert code == 0, (out["rich"] / "report.json").read_text()

        ws2 = tmp_path_factory.mktemp("view-ws2")
        policy = _policy(tmp, "budget", up.url, "budgets: {requests: 1}\n")
        code, out["budget"] = _run(root, "--policy", policy, *_session(ws2, {"ok": 3}), env=env)
        assert code == 4

    # Proxy mode: one connection through the host to a listener here, one refused.
    echo = socket.socket()
    echo.bind(("127.0.0.1", 0))
    echo.listen(4)
    port = echo.getsockname()[1]

    def answer() -> None:
        with contextlib.suppress(OSError):
            conn, _ = echo.accept()
            conn.sendall(b"pong " + conn.recv(100))
            conn.close()

    threading.Thread(target=answer, daemon=True).start()
    policy_path = tmp / "proxy.yaml"
    policy_path.write_text(f"""\
extends: default
network:
  mode: proxy
  allow: ["localhost:{port}"]
  allow_private: ["127.0.0.0/8"]
""")
    try:
        code, out["proxy"] = _run(root, "--policy", str(policy_path), "--workspace", str(PROBES),
                                  "--", "python3", "/workspace/proxy_client.py",
                                  f"localhost:{port}", "blocked.test:443")
    finally:
        echo.close()
    assert code == 0

    # The builtin agent, replaying a recorded session (`make demo`): steps and tool calls.
    before = set(os.listdir(root))
    demo = subprocess.run([sys.executable, "-m", "runner.demo"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "AIRLOCK_RUNS_DIR": str(root)})
    assert demo.returncode == 0, demo.stdout[-2000:] + demo.stderr[-2000:]
    out["demo"] = root / sorted(set(os.listdir(root)) - before)[-1]

    code, out["tampered"] = _run(root, "--", "sh", "-c", "echo one; echo two")
    assert code == 0
    log = out["tampered"] / "events.jsonl"
    lines = log.read_bytes().split(b"\n")
    assert b'"type":"sandbox.created"' in lines[1]
    lines[1] = lines[1].replace(b'"runtime":"runc"', b'"runtime":"runX"')
    log.write_bytes(b"\n".join(lines))
    return out


@pytest.fixture(scope="module")
def server(runs: dict[str, Path]) -> Iterator[dict[str, Any]]:
    root = runs["rich"].parent
    proc = subprocess.Popen([*AIRLOCK, "view", "--no-browser"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "AIRLOCK_RUNS_DIR": str(root), "DISPLAY": ""})
    assert proc.stdout is not None
    url = proc.stdout.readline().strip()
    assert url.startswith("http://127.0.0.1:") and url.endswith("/"), url
    yield {"url": url, "proc": proc, "root": root}
    # Ctrl-C stops it, promptly and cleanly.
    proc.send_signal(signal.SIGINT)
    try:
        assert proc.wait(timeout=15) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: scripts/ensure-test-tools.sh installs it")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    ctx = browser.new_context(viewport={"width": 1360, "height": 900})
    pg = ctx.new_page()
    pg.dialogs = []  # type: ignore[attr-defined]
    pg.errors = []  # type: ignore[attr-defined]
    pg.outside = []  # type: ignore[attr-defined]

    def on_dialog(d: Any) -> None:
        pg.dialogs.append(d.message)
        d.dismiss()

    pg.on("dialog", on_dialog)
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    pg.on("request", lambda r: None if r.url.startswith("http://127.0.0.1:")
          else pg.outside.append(r.url))
    yield pg
    assert pg.dialogs == [], f"a dialog fired: {pg.dialogs}"
    assert pg.errors == [], pg.errors
    assert pg.outside == [], f"the page asked for something elsewhere: {pg.outside}"
    ctx.close()


def _open_run(page: Any, server: dict[str, Any], run_id: str) -> None:
    page.goto(server["url"] + "#/run/" + run_id)
    page.wait_for_selector("#events .ev")
    until(page, "document.querySelector('#chain-state') && "
                           "document.querySelector('#chain-state').dataset.state !== 'checking'")


def until(page: Any, js: str, timeout: float = 30) -> None:
    """Poll a JavaScript expression from here: Playwright's own wait_for_function evaluates
    strings inside the page, which the page's Content-Security-Policy (rightly) forbids."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(js):
        assert time.monotonic() < deadline, f"not within {timeout} s: {js}"
        page.wait_for_timeout(100)


def _chip(page: Any, cat: str) -> int:
    return int(page.inner_text(f"#chips [data-cat={cat}] .n").replace(",", ""))


# -- the server ---------------------------------------------------------------------------------


def test_every_request_needs_the_token(server: dict[str, Any], runs: dict[str, Path]) -> None:
    url = server["url"]
    base, token = url.rstrip("/").rsplit("/", 1)
    rid = runs["rich"].name
    with httpx.Client(timeout=10) as c:
        good = c.get(f"{url}api/runs/{rid}")
        assert good.status_code == 200 and good.json()["id"] == rid
        for path in ("/", "/api/runs", f"/api/runs/{rid}", "/static/app.js",
                     f"/{token[:-1]}/api/runs", f"/{token}x/api/runs", f"/x{token}/"):
            r = c.get(base + path)
            assert r.status_code == 403, (path, r.status_code)
            assert rid not in r.text
        # A page elsewhere whose name resolves here (DNS rebinding) sends its own Host.
        assert c.get(f"{url}api/runs", headers={"Host": "attacker.example:80"}).status_code == 403
        page = c.get(url)
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "default-src 'none'" in csp
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
        assert page.headers["x-content-type-options"] == "nosniff"
        assert "<script src=\"static/app.js\"" in page.text and "<script>" not in page.text
        assert c.get(f"{url}api/runs/..%2F..%2Fetc").status_code == 404
        assert c.get(f"{url}api/runs/no-such-run").status_code == 404
        assert c.get(f"{url}static/../index.py").status_code == 404
    bad = subprocess.run([*AIRLOCK, "view", "--no-browser", "no-such-run"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "AIRLOCK_RUNS_DIR": str(server["root"])})
    assert bad.returncode == 2 and "no run 'no-such-run'" in bad.stderr, bad.stderr


def test_a_huge_request_head_without_the_token_is_cut(server: dict[str, Any]) -> None:
    """Anyone on the host can connect before the token is checked: the head is capped."""
    import contextlib
    import socket

    port = int(server["url"].split(":")[2].split("/")[0])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"GET /")
        sent = 0
        with contextlib.suppress(OSError):
            while sent < 64 << 20:
                s.sendall(b"a" * (1 << 16))
                sent += 1 << 16
    assert sent < 4 << 20, "the viewer kept reading a head past 4 MiB"
    assert httpx.get(server["url"], timeout=10).status_code == 200


# -- the page -------------------------------------------------------------------------------------


def test_the_list_shows_each_runs_counts(page: Any, server: dict[str, Any],
                                         runs: dict[str, Path]) -> None:
    page.goto(server["url"])
    until(page, f"document.querySelectorAll('.run-row').length === {len(runs)} && "
                           "!document.querySelector('#runs').innerText.includes('checking')")
    for name, run_dir in runs.items():
        report = json.loads((run_dir / "report.json").read_text())
        refusals = sum(1 for e in _events(run_dir) if e["type"].endswith(".refused"))
        cells = page.locator(f"tr[data-run='{run_dir.name}'] td").all_inner_texts()
        assert cells[0] == run_dir.name
        assert cells[1] == report["status"].replace("_", " ")
        assert cells[2] == f"{report['exit_code']} {report['exit_reason']}"
        assert cells[3] == report["agent"]
        assert cells[8] == f"{report['totals']['tokens']:,}"
        assert cells[9] == str(refusals)
        assert cells[10] == ("✗ broken" if name == "tampered" else "✓ verified")
    rich = page.locator(f"tr[data-run='{runs['rich'].name}'] td").all_inner_texts()
    assert rich[4] == "claude-sonnet-4-5" and rich[9] == "2"
    assert page.locator(f"tr[data-run='{runs['budget'].name}'] td").nth(1).inner_text() == \
        "budget exceeded"
    # Filter and search.
    page.check("#run-refused")
    assert {r.get_attribute("data-run") for r in page.locator(".run-row").all()} == \
        {runs["rich"].name, runs["budget"].name, runs["proxy"].name}  # over its budget,
    # the gateway refuses too
    page.uncheck("#run-refused")
    page.check("#run-unverified")
    assert [r.get_attribute("data-run") for r in page.locator(".run-row").all()] == \
        [runs["tampered"].name]
    page.uncheck("#run-unverified")
    page.fill("#run-search", runs["budget"].name[-6:])
    assert page.locator(".run-row").count() == 1
    page.fill("#run-search", "")
    page.select_option("#run-status", "budget_exceeded")
    assert page.locator(".run-row").count() == 1
    page.select_option("#run-status", "")
    if SHOTS:
        page.locator("#run-search").blur()
        box = page.locator("main .card").bounding_box()
        page.screenshot(path=str(Path(SHOTS) / "view-list.png"),
                        clip={"x": 0, "y": 0, "width": 1360, "height": box["y"] + box["height"] + 24})


def test_a_run_shows_its_timeline_refusals_meters_and_patch(
        page: Any, server: dict[str, Any], runs: dict[str, Path]) -> None:
    run_dir = runs["rich"]
    events = _events(run_dir)
    report = json.loads((run_dir / "report.json").read_text())
    _open_run(page, server, run_dir.name)
    assert page.get_attribute("#chain-state", "data-state") == "intact"
    # The counts are the log's.
    assert _chip(page, "all") == len(events)
    assert _chip(page, "provider") == sum(e["type"].startswith("provider.") and
                                          not e["type"].endswith(".refused") for e in events)
    assert _chip(page, "refusal") == 2
    assert _chip(page, "selftest") == 1
    assert page.locator("#events .ev").count() == len(events)
    requests = [e for e in events if e["type"] == "provider.request"]
    assert len(requests) == 3
    row = page.locator(f"#events .ev[data-line='{requests[0]['seq']}']")
    assert "claude-sonnet-4-5" in row.inner_text()
    assert f"in {requests[0]['data']['input_tokens']}" in row.inner_text().replace("\n", " ")
    # Every refusal is highlighted, with its reason.
    refused = [e for e in events if e["type"] == "provider.refused"]
    for e in refused:
        r = page.locator(f"#events .ev[data-line='{e['seq']}']")
        assert "refused" in (r.get_attribute("class") or "")
        assert e["data"]["reason"] in r.inner_text()
    assert page.locator("#events .ev.refused").count() == 2
    assert page.locator("#refusals .refusal").count() == 2
    assert page.locator("#events .ev.refused").first.evaluate(
        "e => getComputedStyle(e).backgroundColor") != "rgba(0, 0, 0, 0)"
    # The meters: the host's counts against the policy's limits.
    req = page.inner_text("#meters [data-counter=requests] .meter-val")
    assert req == f"{report['budgets']['requests']['used']} / 10"
    tokens = page.inner_text("#meters [data-counter=tokens] .meter-val")
    assert tokens == f"{report['totals']['tokens']:,} / 100,000"
    # The copy-mode patch as a diff.
    page.wait_for_selector("#diff .dl.add")
    assert "+2" in page.locator("#diff .dl.add").all_inner_texts()
    assert "-two" in page.locator("#diff .dl.del").all_inner_texts()
    # Filter the timeline to refusals only.
    page.click("#chips [data-cat=refusal]")
    until(page, "document.querySelectorAll('#events .ev').length === 2")
    assert page.locator("#events .ev.refused").count() == 2
    page.click("#chips [data-cat=all]")
    until(page, f"document.querySelectorAll('#events .ev').length === {len(events)}")
    # Search the log.
    page.fill("#ev-search", "STATUSES")  # only in the probe's last output line
    page.press("#ev-search", "Enter")
    until(page, "document.querySelectorAll('#events .ev').length === 1")
    assert '"statuses": [200, 200, 200, 403, 403]' in page.inner_text("#events .ev")
    page.fill("#ev-search", "")
    page.press("#ev-search", "Enter")
    until(page, f"document.querySelectorAll('#events .ev').length === {len(events)}")
    # Details open as text.
    page.click(f"#events .ev[data-line='{refused[0]['seq']}'] .ev-head")
    detail = page.inner_text(f"#events .ev[data-line='{refused[0]['seq']}'] .ev-detail")
    assert json.loads(detail)["data"]["reason"] == refused[0]["data"]["reason"]
    if SHOTS:
        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(path=str(Path(SHOTS) / "view-run.png"), full_page=True)


def test_proxy_connections_and_what_the_policy_widened(page: Any, server: dict[str, Any],
                                                        runs: dict[str, Path]) -> None:
    run_dir = runs["proxy"]
    events = _events(run_dir)
    widened = [e["data"]["detail"] for e in events if e["type"] == "policy.widened"]
    assert any("127.0.0.0/8" in w for w in widened), widened
    _open_run(page, server, run_dir.name)
    assert page.locator("#policy .widened li").all_inner_texts() == widened
    assert _chip(page, "proxy") == sum(e["type"].startswith("proxy.") and
                                       not e["type"].endswith(".refused") for e in events)
    allowed = next(e for e in events if e["type"] == "proxy.allowed")
    assert allowed["data"]["target"] in page.inner_text(
        f"#events .ev[data-line='{allowed['seq']}']")
    refused = next(e for e in events if e["type"] == "proxy.refused")
    row = page.locator(f"#events .ev[data-line='{refused['seq']}']")
    assert "refused" in (row.get_attribute("class") or "")
    assert refused["data"]["reason"] in row.inner_text()
    assert "blocked.test:443" in page.inner_text("#refusals")


def test_agent_steps_and_tool_calls(page: Any, server: dict[str, Any],
                                    runs: dict[str, Path]) -> None:
    run_dir = runs["demo"]
    events = _events(run_dir)
    report = json.loads((run_dir / "report.json").read_text())
    calls = [e for e in events if e["type"] == "agent.tool_call"]
    assert calls
    # The meter drawn from the log ends where the host's own count did.
    summary = httpx.get(f"{server['url']}api/runs/{run_dir.name}", timeout=30).json()
    assert summary["meters"]["series"][-1][1] == report["budgets"]["steps"]["used"]
    assert summary["meters"]["series"][-1][2] == report["budgets"]["requests"]["used"]
    assert summary["meters"]["series"][-1][3] == report["budgets"]["tokens"]["used"]
    _open_run(page, server, run_dir.name)
    steps = report["budgets"]["steps"]
    assert page.inner_text("#meters [data-counter=steps] .meter-val") == \
        f"{steps['used']} / {steps['limit']}"
    assert _chip(page, "agent") == sum(e["source"] == "agent" for e in events)
    row = page.inner_text(f"#events .ev[data-line='{calls[0]['seq']}']")
    assert calls[0]["data"]["name"] in row
    assert page.locator("#diff .dl.add").count() >= 1  # the fix came back as a patch


def test_what_the_agent_wrote_renders_as_text(page: Any, server: dict[str, Any],
                                             runs: dict[str, Path]) -> None:
    run_dir = runs["rich"]
    events = _events(run_dir)
    assert any(e["type"] == "provider.refused" and e["data"]["model"] == IMG for e in events)
    _open_run(page, server, run_dir.name)
    page.wait_for_selector("#diff .dl")
    text = page.inner_text("body")
    for payload in (IMG, SCRIPT, FILE_XSS):
        assert payload in text, payload
    # Nothing the log carried became markup: the page's only images are its own icon.
    assert page.locator("main img").count() == 0
    assert page.locator("main script").count() == 0
    assert page.evaluate("document.querySelectorAll('[onerror]').length") == 0
    page.click("#chips [data-cat=refusal]")
    until(page, "document.querySelectorAll('#events .ev').length === 2")
    page.click("#events .ev .ev-head >> nth=0")
    assert IMG in page.inner_text("#events .ev-detail") or SCRIPT in page.inner_text("#events .ev-detail")
    page.wait_for_timeout(500)  # give an injected handler every chance to fire


def test_a_tampered_log_shows_its_broken_line(page: Any, server: dict[str, Any],
                                              runs: dict[str, Path]) -> None:
    run_dir = runs["tampered"]
    expected = subprocess.run([*AIRLOCK, "events", "verify", run_dir.name], cwd=ROOT,
                              capture_output=True, text=True,
                              env={**os.environ, "AIRLOCK_RUNS_DIR": str(run_dir.parent)})
    assert expected.returncode == 1 and ":2: line edited" in expected.stdout
    _open_run(page, server, run_dir.name)
    assert page.get_attribute("#chain-state", "data-state") == "broken"
    banner = page.inner_text("#chain-state")
    assert "line 2: line edited" in banner
    page.click("#show-broken")
    row = page.locator("#events .ev[data-line='2']")
    assert "broken" in (row.get_attribute("class") or "")
    assert "runX" in row.inner_text()
    assert page.locator("#events .ev.broken").count() == 1


def test_a_running_run_updates_live(page: Any, server: dict[str, Any],
                                    tmp_path: Path) -> None:
    root: Path = server["root"]
    before = set(os.listdir(root))
    proc = subprocess.Popen(
        [*AIRLOCK, "run", "--quiet", "--", "sh", "-c",
         "for i in $(seq 1 30); do echo tick $i; sleep 0.3; done"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "AIRLOCK_RUNS_DIR": str(root)})
    try:
        assert wait_for(lambda: set(os.listdir(root)) - before, 120)
        rid = sorted(set(os.listdir(root)) - before)[-1]
        log = root / rid / "events.jsonl"
        assert wait_for(lambda: log.exists() and b"tick 3" in log.read_bytes(), 120)
        asked: list[str] = []
        page.on("request", lambda r: asked.append(r.url))
        page.goto(server["url"] + "#/run/" + rid)
        page.wait_for_selector("#events .ev")
        assert page.inner_text(".run-head .badge") == "running"
        assert not (root / rid / "report.json").exists()
        first = _chip(page, "all")
        seen_ticks = page.locator("#events .ev.cat-agent").count()
        # New lines arrive without a reload.
        until(page, f"document.querySelectorAll('#events .ev.cat-agent').length > {seen_ticks} + 3",
              timeout=60)
        assert _chip(page, "all") > first
        # It follows by byte offset: only what was appended since the last answer.
        assert any("/events?offset=" in u for u in asked), asked
        assert proc.wait(timeout=120) == 0
        until(page, "document.querySelector('.run-head .badge').innerText === 'succeeded'",
                               timeout=30)
        until(page, "document.querySelector('#chain-state').dataset.state === 'intact'",
                               timeout=30)
        until(page, "document.querySelector('#events').innerText.includes('tick 30')",
                               timeout=30)
        assert _chip(page, "all") == len(_events(root / rid))
    finally:
        if proc.poll() is None:
            proc.kill()


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.slow
def test_a_100_mb_log_opens_without_hanging_the_page(page: Any, server: dict[str, Any],
                                                     tmp_path: Path) -> None:
    root: Path = server["root"]
    policy = tmp_path / "big.yaml"
    policy.write_text("extends: default\nresources: {output_bytes: 1g, log_bytes: 512m}\n")
    code, run_dir = _run(root, "--policy", str(policy), "--", "sh", "-c",
                         "head -c 360000000 /dev/zero | tr '\\0' a | fold -w 120", timeout=600)
    assert code == 0
    size = (run_dir / "events.jsonl").stat().st_size
    assert size >= 100_000_000, size
    lines = sum(1 for _ in (run_dir / "events.jsonl").open("rb"))
    pid = server["proc"].pid
    rss_before = _rss_kib(pid)

    t0 = time.monotonic()
    page.goto(server["url"] + "#/run/" + run_dir.name)
    page.wait_for_selector("#events .ev")
    first_rows = time.monotonic() - t0
    # While the server reads the log, the page keeps answering.
    worst = 0.0
    while page.get_attribute("#chain-state", "data-state") in (None, "checking"):
        t = time.monotonic()
        page.evaluate("1 + 1")
        worst = max(worst, time.monotonic() - t)
        assert time.monotonic() - t0 < 120, "the log was not read within two minutes"
        page.wait_for_timeout(100)
    assert page.get_attribute("#chain-state", "data-state") == "intact"
    assert worst < 1.0, worst
    assert first_rows < 20, first_rows
    # One page of the timeline in the document, never the whole log.
    assert page.locator("#events .ev").count() == 200
    assert _chip(page, "all") == lines
    until(page, f"document.querySelector('#pg-info').innerText.endsWith('of {lines:,}')")
    page.click("#pg-last")
    until(page, "document.querySelector('#events').innerText.includes('run.end')")
    assert page.locator("#events .ev").count() <= 200
    assert page.evaluate("document.getElementsByTagName('*').length") < 20_000
    page.fill("#goto-line", str(lines // 2))
    page.press("#goto-line", "Enter")
    page.wait_for_selector(f"#events .ev.target[data-line='{lines // 2}']")
    # The server did not hold the log in memory.
    growth_mib = (_rss_kib(pid) - rss_before) / 1024
    assert growth_mib < 60, f"the server grew by {growth_mib:.0f} MiB on a {size >> 20} MiB log"
    print(f"\n100 MB log: {size >> 20} MiB, {lines} lines; first rows after {first_rows:.2f} s, "
          f"page answered within {worst * 1000:.0f} ms while indexing, server RSS "
          f"+{growth_mib:.1f} MiB")
    shutil.rmtree(run_dir)


# -- mounted in a service -------------------------------------------------------------------


def _service_app(root: Path) -> tuple[Any, dict[str, str]]:
    """The viewer as the multi-tenant service mounts it: runs under <root>/<tenant>/,
    a tenant's key shows its own runs, the operator's all of them."""
    import hashlib
    import hmac

    from starlette.applications import Starlette
    from starlette.routing import Mount

    from runner.view import tenant_runs_for, view_app

    keys = {"acme": "alk_acme_" + "a" * 20, "globex": "alk_globex_" + "g" * 20,
            "operator": "alk_operator_" + "o" * 20}
    digests = {n: hashlib.sha256(k.encode()).hexdigest() for n, k in keys.items()}

    def who(key: str | None) -> str | None:  # as the service checks keys: by digest, all of them
        presented = hashlib.sha256((key or "").encode()).hexdigest().encode()
        found = None
        for name, digest in digests.items():
            if hmac.compare_digest(presented, digest.encode()) and found is None:
                found = name
        return found

    runs_for = tenant_runs_for(root, lambda k: None if who(k) == "operator" else who(k),
                               lambda k: who(k) == "operator")
    return Starlette(routes=[Mount("/view", app=view_app(runs_for))]), keys


@pytest.fixture(scope="module")
def tenant_root(runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("service-runs")
    for tenant, name in (("acme", "rich"), ("globex", "budget")):
        shutil.copytree(runs[name], root / tenant / runs[name].name)
    return root


def test_in_a_service_a_tenant_sees_only_its_own_runs(tenant_root: Path,
                                                      runs: dict[str, Path]) -> None:
    from starlette.testclient import TestClient

    app, keys = _service_app(tenant_root)
    mine, theirs = runs["rich"].name, runs["budget"].name

    def auth(who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {keys[who]}"}

    with TestClient(app) as c:
        assert c.get("/view/api/runs").status_code == 401
        assert c.get("/view/api/runs", headers={"Authorization": "Bearer nope"}).status_code == 401
        assert c.get(f"/view/api/runs/{mine}").status_code == 401
        listed = c.get("/view/api/runs", headers=auth("acme")).json()["runs"]
        assert [r["id"] for r in listed] == [mine]
        assert c.get(f"/view/api/runs/{mine}", headers=auth("acme")).json()["row"]["refusals"] == 2
        # Another tenant's run is answered exactly as one that does not exist.
        for path in (f"/view/api/runs/{theirs}", f"/view/api/runs/{theirs}/events?page=0",
                     f"/view/api/runs/{theirs}/patch", f"/view/api/runs/{theirs[:-1]}x"):
            r = c.get(path, headers=auth("acme"))
            assert (r.status_code, r.json()) == (404, {"error": "no such run"}), path
        for path in ("/view/api/runs/..%2Fglobex%2F" + theirs, f"/view/api/runs/..%2F..%2F{theirs}",
                     "/view/api/runs/%2E%2E"):
            r = c.get(path, headers=auth("acme"))
            assert r.status_code == 404 and theirs not in r.text, path
        assert c.get(f"/view/api/runs/{mine}", headers=auth("globex")).status_code == 404
        everyone = c.get("/view/api/runs", headers=auth("operator")).json()["runs"]
        assert sorted(r["id"] for r in everyone) == sorted([mine, theirs])
        assert c.get(f"/view/api/runs/{theirs}", headers=auth("operator")).status_code == 200
        # A run whose host died: no report, a log long quiet.
        from runner.events.log import EventLog

        dead = tenant_root / "acme" / (mine[:-1] + "z")
        log = EventLog(dead / "events.jsonl", dead.name)  # the real writer, stopped early
        log.emit("run.start", "host", agent="command", policy="default")
        log.emit("sandbox.started", "host")
        log.close()
        old = time.time() - 3 * 3600
        os.utime(dead / "events.jsonl", (old, old))
        row = c.get(f"/view/api/runs/{dead.name}", headers=auth("acme")).json()["row"]
        assert (row["status"], row["live"], row["chain"]) == ("lost", False, "unfinished")
        shutil.rmtree(dead)
        # The page itself holds no run data: it is served without a key.
        page = c.get("/view/")
        assert page.status_code == 200 and mine not in page.text
        assert "script-src 'self'" in page.headers["content-security-policy"]


def test_in_a_service_the_page_asks_for_the_key(page: Any, tenant_root: Path,
                                                runs: dict[str, Path]) -> None:
    import threading

    import uvicorn

    from runner.view.local import listen

    app, keys = _service_app(tenant_root)
    sock = listen(0)
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        page.goto(f"http://127.0.0.1:{port}/view/")
        page.wait_for_selector("#key")
        page.fill("#key", keys["acme"])
        page.press("#key", "Enter")
        page.wait_for_selector(".run-row")
        assert [r.get_attribute("data-run") for r in page.locator(".run-row").all()] == \
            [runs["rich"].name]
        _open_run(page, {"url": f"http://127.0.0.1:{port}/view/"}, runs["rich"].name)
        assert _chip(page, "refusal") == 2
        page.goto(f"http://127.0.0.1:{port}/view/#/run/{runs['budget'].name}")
        page.wait_for_selector(".error-card")
        assert "No such run" in page.inner_text(".error-card")
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


def test_the_service_serves_the_viewer_with_its_own_keys(page: Any, tmp_path: Path) -> None:
    """`airlock serve --config` for real: a tenant sees its own runs' pages (the same 404
    rule as the API), the operator everyone's, and the browser asks for the key."""
    from runner.testing.service import ServiceProcess

    with ServiceProcess(tmp_path / "svc", capacity=2, tenants={
            "acme": {"floor": "default"}, "globex": {"floor": "default"}}) as svc:
        ids = {}
        for tenant in ("acme", "globex"):
            with svc.client(tenant) as c:
                r = c.post("/v1/runs", json={"agent": "command",
                                             "command": ["sh", "-c", f"echo from {tenant}"]})
                assert r.status_code == 201, r.text
                ids[tenant] = r.json()["id"]
                assert svc.wait(c, ids[tenant])["status"] == "succeeded"
        with svc.client() as anon:
            assert anon.get("/view/api/runs").status_code == 401
            assert anon.get("/view", follow_redirects=False).headers["location"] == "/view/"
            shell = anon.get("/view/")
            assert shell.status_code == 200 and ids["acme"] not in shell.text
        with svc.client("acme") as acme:
            assert [r["id"] for r in acme.get("/view/api/runs").json()["runs"]] == [ids["acme"]]
            mine = acme.get(f"/view/api/runs/{ids['acme']}").json()
            assert mine["verification"]["state"] == "intact"
            for path in (f"/view/api/runs/{ids['globex']}", f"/view/api/runs/{ids['globex']}/events?page=0"):
                theirs, missing = acme.get(path), acme.get(path.replace(ids["globex"], "20990101-000000-x"))
                assert theirs.status_code == missing.status_code == 404
                assert theirs.json() == missing.json()
        with svc.client(key=svc.operator_key) as op:
            assert sorted(r["id"] for r in op.get("/view/api/runs").json()["runs"]) == \
                sorted(ids.values())
        page.goto(f"{svc.url}/view/")
        page.wait_for_selector("#key")
        page.fill("#key", svc.keys["globex"])
        page.press("#key", "Enter")
        page.wait_for_selector(".run-row")
        assert [r.get_attribute("data-run") for r in page.locator(".run-row").all()] == \
            [ids["globex"]]
        _open_run(page, {"url": f"{svc.url}/view/"}, ids["globex"])
        assert "from globex" in page.inner_text("#events")
