"""worker/imageshare.py: concurrent jobs for one URL share one load; failures reach every waiter; nothing is kept past its jobs."""

from __future__ import annotations

import gc
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from producer.errors import UpstreamUnavailable
from worker.imageshare import SharedImages


class Loader:
    """Counts calls; blocks until released, so that the other callers arrive while it loads."""

    def __init__(self, value: Any = "pixels", error: BaseException | None = None) -> None:
        self.calls = 0
        self.release = threading.Event()
        self.value, self.error = value, error

    def __call__(self) -> Any:
        self.calls += 1
        self.release.wait(5)
        if self.error is not None:
            raise self.error
        return [self.value]  # a fresh object per load


def _together(cache: SharedImages, key: str, loader: Loader, n: int) -> list[Any]:
    """n concurrent gets for one key; the loader is released once every caller is waiting."""
    with ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(cache.get, key, loader) for _ in range(n)]
        while cache.loads + cache.shared < n:
            threading.Event().wait(0.01)
        loader.release.set()
        results = []
        for future in futures:
            try:
                results.append(future.result(timeout=5))
            except Exception as exc:  # noqa: BLE001 - the test inspects each caller's outcome
                results.append(exc)
    return results


def test_concurrent_gets_share_one_load() -> None:
    cache, loader = SharedImages(max_entries=4), Loader()
    results = _together(cache, "http://img/1.jpg", loader, 6)
    assert loader.calls == 1
    entries = [entry for entry, _ in results]
    assert all(entry is entries[0] for entry in entries)
    assert sorted(loaded for _, loaded in results) == [False] * 5 + [True]
    assert (cache.loads, cache.shared) == (1, 5)


def test_a_job_arriving_while_another_holds_the_image_finds_it_and_none_after_they_are_done() -> None:
    cache = SharedImages(max_entries=4)
    held, loaded = cache.get("u", lambda: ["a"])
    assert loaded
    again, loaded_again = cache.get("u", lambda: pytest.fail("loaded twice"))
    assert again is held and not loaded_again
    del held, again
    gc.collect()
    assert len(cache) == 0  # released with the jobs that used it
    _, loaded = cache.get("u", lambda: ["b"])
    assert loaded


def test_a_failure_reaches_every_waiter_as_its_own_error_and_is_not_cached() -> None:
    cache = SharedImages(max_entries=4)
    loader = Loader(error=UpstreamUnavailable("refused", code="connection_failed"))
    results = _together(cache, "u", loader, 4)
    assert loader.calls == 1
    assert all(isinstance(r, UpstreamUnavailable) and r.code == "connection_failed" for r in results)
    assert len({id(r) for r in results}) == 4  # one exception object per job
    assert len(cache) == 0
    retry = Loader()
    retry.release.set()
    entry, loaded = cache.get("u", retry)
    assert loaded and retry.calls == 1 and entry.value == ["pixels"]


def test_entries_are_bounded_and_beyond_the_bound_a_job_loads_alone() -> None:
    cache = SharedImages(max_entries=2)
    held = [cache.get(f"u{i}", lambda i=i: [i])[0] for i in range(3)]
    assert len(cache) == 2
    third, loaded = cache.get("u2", lambda: ["again"])
    assert loaded and third is not held[2]  # u2 was never registered
    assert [entry.value for entry in held] == [[0], [1], [2]]


def test_an_entry_is_not_served_past_its_age() -> None:
    now = [0.0]
    cache = SharedImages(max_entries=2, max_age_s=10, clock=lambda: now[0])
    first, _ = cache.get("u", lambda: ["old"])
    now[0] = 11.0
    second, loaded = cache.get("u", lambda: ["new"])
    assert loaded and second.value == ["new"] and first.value == ["old"]


def test_many_distinct_images_leave_nothing_behind() -> None:
    cache = SharedImages(max_entries=8)
    for i in range(1000):
        cache.get(f"u{i}", lambda: bytearray(1000))  # each job done at once
    gc.collect()
    assert len(cache) == 0 and cache.loads == 1000
