"""A TCP listener on every address of this host (IPv4 and IPv6), recording who connects.

The demo, the tests and benchmarks start one to prove that a sandbox reaches nothing of
the host: it must end with no hits.
"""

from __future__ import annotations

import contextlib
import socket
import threading


class HostListener:
    def __init__(self) -> None:
        self.hits: list[str] = []
        self.socks: list[socket.socket] = []
        v4 = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        v4.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        v4.bind(("0.0.0.0", 0))
        self.port = int(v4.getsockname()[1])
        self.socks.append(v4)
        with contextlib.suppress(OSError):  # a host without IPv6
            v6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            v6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            v6.bind(("::", self.port))
            self.socks.append(v6)
        for s in self.socks:
            s.listen(16)
            threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def _accept(self, s: socket.socket) -> None:
        while True:
            try:
                conn, addr = s.accept()
            except OSError:
                return
            self.hits.append(str(addr[0]))
            conn.close()

    def close(self) -> None:
        for s in self.socks:
            s.close()
