"""Names ending in ``.test`` answered from a table, for fetch tests that need a host name to point somewhere (or elsewhere later)."""

from __future__ import annotations

import socket
from typing import Any


class FakeDNS:
    """Names ending in ``.test`` resolve to the answers queued here; the last answer repeats."""

    def __init__(self) -> None:
        self.answers: dict[str, list[list[str]]] = {}
        self.calls: list[str] = []

    def getaddrinfo(self, host: Any, port: Any, *args: Any, **kwargs: Any) -> list[tuple[Any, ...]]:
        name = host.decode() if isinstance(host, bytes) else str(host)
        if not name.endswith(".test"):
            return _REAL_GETADDRINFO(host, port, *args, **kwargs)
        self.calls.append(name)
        queue = self.answers.get(name)
        if not queue:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        addresses = queue.pop(0) if len(queue) > 1 else queue[0]
        return [
            (socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, int(port)))
            for ip in addresses
        ]


_REAL_GETADDRINFO = socket.getaddrinfo
