"""A GET that returns (status, body) for error statuses too: what probe and metrics checks read."""

from __future__ import annotations

import urllib.error
import urllib.request


def get(url: str, *, timeout: float = 10.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
