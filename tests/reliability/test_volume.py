"""No faults, many jobs: every accepted job is stored once, and duplicate submissions never compute twice."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from producer.client import VQAClient
from tests.reliability.helpers import submit
from tests.reliability.history import History
from worker.dev.services import WorkerProcess

pytestmark = pytest.mark.slow


def test_many_jobs_without_faults_are_stored_exactly_once(
    rel_env: dict[str, str],
    image_base_url: str,
    client_for: Callable[[dict[str, str]], VQAClient],
    start_workers: Callable[..., list[WorkerProcess]],
    history_for: Callable[[dict[str, str]], History],
    figures: Callable[..., dict[str, Any]],
) -> None:
    client = client_for(rel_env)
    history = history_for(rel_env)
    start_workers(rel_env, ["a", "b"])

    started = time.monotonic()
    ids = submit(client, image_base_url, 500, tag="volume")
    history.wait(ids, timeout=180)
    wall_s = time.monotonic() - started

    audit = history.audit(ids)
    figures("1. no faults", **audit.summary(), recovery_s=None, wall_s=round(wall_s, 1), jobs_per_s=round(len(ids) / wall_s, 1))
    assert audit.lost == [] and audit.disagreements == []
    assert audit.duplicate_records == 0
    assert audit.duplicate_executions == 0
    assert audit.failed == {}
    assert set(audit.executions.values()) == {1}


def test_double_submission_computes_each_job_once(
    rel_env: dict[str, str],
    image_base_url: str,
    client_for: Callable[[dict[str, str]], VQAClient],
    start_workers: Callable[..., list[WorkerProcess]],
    history_for: Callable[[dict[str, str]], History],
    figures: Callable[..., dict[str, Any]],
) -> None:
    """1000 jobs (500 by content, 500 by idempotency key), each submitted by two producers at once and again later."""
    history = history_for(rel_env)
    by_content = [{"image_url": f"{image_base_url}/tiny.png", "question": f"double {i}: what is shown?"} for i in range(500)]
    by_key = [
        {"image_url": f"{image_base_url}/tiny.png", "question": f"keyed {i}: what is shown?", "idempotency_key": f"order-{i}"}
        for i in range(500)
    ]
    # The same key with another question is the same job: the first submission's content wins.
    rekeyed = [{**request, "question": "another question entirely"} for request in by_key]
    requests = by_content + by_key

    producers = [client_for(rel_env), client_for(rel_env)]
    results: list[list[str]] = [[], []]

    def produce(index: int) -> None:
        results[index] = producers[index].submit_many(requests)

    started = time.monotonic()
    threads = [threading.Thread(target=produce, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results[0] == results[1] and len(set(results[0])) == 1000
    ids = results[0]

    start_workers(rel_env, ["a", "b"])
    assert producers[0].submit_many(requests[:250]) == ids[:250]  # while the first copies are being answered
    assert producers[1].submit_many(rekeyed) == ids[500:]
    # Different generation settings make a different job.
    other = producers[0].submit_many([{**by_content[0], "max_new_tokens": MAX_OTHER_TOKENS}])
    assert other[0] not in ids
    history.wait([*ids, *other], timeout=240)
    assert producers[0].submit_many(requests) == ids  # after they finished: answered from the records
    wall_s = time.monotonic() - started

    audit = history.audit([*ids, *other])
    executions = sum(audit.executions.values())
    figures(
        "1b. double submission",
        **audit.summary(),
        recovery_s=None,
        wall_s=round(wall_s, 1),
        submissions=2 * 1000 + 250 + 500 + 1000,
        executions=executions,
    )
    assert audit.jobs == 1001
    assert audit.lost == [] and audit.disagreements == [] and audit.failed == {}
    assert audit.duplicate_records == 0
    assert executions == 1001 and audit.duplicate_executions == 0
    assert all(not r["question"].startswith("another") for r in audit.records.values())


MAX_OTHER_TOKENS = 3
