"""Proxy mode from inside the sandbox: only what the policy names connects, through the
host; everything else is refused with an event. Targets are on this machine only."""

from __future__ import annotations

import socket
import threading

import pytest

from tests.conftest import PROBES, write_policy

pytestmark = pytest.mark.usefixtures("engine")


@pytest.fixture
def echo_server():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            data = conn.recv(100)
            conn.sendall(b"pong " + data)
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    yield srv.getsockname()[1]
    srv.close()


def test_proxy_mode_allows_only_what_the_policy_names(airlock, tmp_path, echo_server):
    port = echo_server
    policy = write_policy(tmp_path, f"""\
extends: default
network:
  mode: proxy
  allow: ["localhost:{port}", "*.example.test:443"]
  allow_private: ["127.0.0.0/8"]
""")
    targets = [f"localhost:{port}", "localhost:22", f"127.0.0.1:{port}", "blocked.test:443",
               "example.test:443"]
    r = airlock("run", "--quiet", "--policy", policy, "--workspace", str(PROBES), "--",
                "python3", "/workspace/proxy_client.py", *targets)
    assert r.code == 0, r.stderr
    out = r.probe()
    assert out[f"localhost:{port}"].endswith("pong ping"), out
    for t in targets[1:]:
        assert " 403 " in out[t] + " ", (t, out[t])
    events = r.events()
    assert any(e["type"] == "proxy.allowed" for e in events)
    refused = {e["data"]["target"]: e["data"]["reason"] for e in events
               if e["type"] == "proxy.refused"}
    assert refused[f"127.0.0.1:{port}"] == "ip-literal"
    assert refused["localhost:22"] == "port-not-allowed"
    assert refused["blocked.test:443"] == "host-not-allowed"
    assert refused["example.test:443"] == "host-not-allowed"  # the apex is not *.example.test
    assert any(e["type"] == "policy.widened" and "localhost" in e["data"]["detail"] for e in events)


def test_a_name_resolving_to_a_private_address_is_refused(airlock, tmp_path, echo_server):
    policy = write_policy(tmp_path, f"""\
extends: default
network:
  mode: proxy
  allow: ["localhost:{echo_server}"]
""")
    r = airlock("run", "--quiet", "--policy", policy, "--workspace", str(PROBES), "--",
                "python3", "/workspace/proxy_client.py", f"localhost:{echo_server}")
    assert " 403 " in r.probe()[f"localhost:{echo_server}"] + " "
    refused = [e for e in r.events() if e["type"] == "proxy.refused"]
    assert refused and refused[0]["data"]["reason"] == "address-forbidden"


def test_proxy_variables_only_in_proxy_mode(airlock):
    r = airlock("run", "--quiet", "--", "sh", "-c", "env | grep -i _proxy || echo none")
    assert r.stdout.strip() == "none"
