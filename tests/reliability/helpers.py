"""Helpers shared by the fault-injection tests."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from producer.client import VQAClient

# Small enough that a redelivery happens within seconds; the settings floor is 5 s.
VISIBILITY_TIMEOUT_S = 6
# Answers of a few tokens keep batches short; the kill/term tests ask for longer ones per job.
MAX_NEW_TOKENS = 4
SLOW_GENERATION = {"max_new_tokens": 256, "min_new_tokens": 256}  # ~0.5 s per batch of 8


def submit(client: VQAClient, image_base_url: str, count: int, *, tag: str, **options: Any) -> list[str]:
    """Submit ``count`` distinct jobs in one call; return their ids."""
    requests = [{"image_url": f"{image_base_url}/tiny.png", "question": f"{tag} question {i}: what is shown?", **options} for i in range(count)]
    ids = client.submit_many(requests)
    assert len(set(ids)) == count
    return ids


def wait_until(predicate: Callable[[], bool], *, timeout: float, poll_s: float = 0.02, what: str = "condition") -> float:
    """Poll until ``predicate()``; return the time.time() it became true."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        time.sleep(poll_s)
    return time.time()
