"""A run's Redis state through its scripts, on a real redis-server: the window, the cursor, the lease, counting once, ending."""

from __future__ import annotations

import threading

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from producer import keys
from producer.bulk.state import Chunk, RunState
from producer.errors import BackendUnavailable
from producer.settings import Settings
from worker.dev.services import free_port

TOKEN = "host:1:abc"


@pytest.fixture()
def state(redis_url: str) -> RunState:
    settings = Settings(broker_url=redis_url, bulk_segment_jobs=4, bulk_ttl_s=3600, bulk_finished_ttl_s=600)
    run = RunState(redis.Redis.from_url(redis_url), "run-1", settings=settings, queue_key="vqa")
    run.create({"state": "in_progress", "created_at": "1", "manifest_complete": "0", "lines_done": "0", "total": "0"})
    assert run.lease(TOKEN, ttl_s=30) == (True, TOKEN)
    return run


def chunk(first: int, last: int, ids: list[str], invalid: list[str] = ()) -> Chunk:  # type: ignore[assignment]
    return Chunk(first, last, str(last), ids, [f"message-{job_id}" for job_id in ids], list(invalid))


def store(state: RunState, job_id: str, outcome: str = "succeeded") -> tuple[bool, int, bool]:
    done = state.stored(job_id, outcome=outcome, entry=f'{{"job_id":"{job_id}"}}', usage=(10, 4, 2, 1.25))
    return done.counted, done.segment, done.ended


def test_publishing_stops_at_the_window_and_moves_the_cursor(state: RunState) -> None:
    assert state.publish(TOKEN, chunk(1, 3, ["a", "b", "c"], ['{"line":2}']), window=5) == ("ok", 3)
    assert state.publish(TOKEN, chunk(4, 6, ["d", "e", "f"]), window=5) == ("full", 3)
    assert state.client.llen("vqa") == 3 and state.client.lrange("vqa", -1, -1) == [b"message-a"]  # FIFO: a is popped first
    assert state.publish(TOKEN, chunk(2, 3, ["x"]), window=5) == ("stale", 3)  # behind the cursor (at 3): nothing
    store(state, "a")
    assert state.publish(TOKEN, chunk(4, 6, ["d", "e", "f"]), window=5) == ("ok", 5)
    meta = state.meta()
    assert meta is not None and (meta["lines_done"], meta["total"], meta["invalid"]) == ("6", "6", "1")
    assert state.invalid_reports() == [b'{"line":2}']
    counts = state.snapshot().counts  # type: ignore[union-attr]
    assert (counts.total, counts.queued, counts.succeeded) == (6, 5, 1) and counts.adds_up()


def test_only_the_lease_holder_publishes(state: RunState) -> None:
    assert state.lease("other:2:def", ttl_s=30) == (False, TOKEN)
    assert state.publish("other:2:def", chunk(1, 1, ["a"]), window=0) == ("lease", 0)
    assert state.lease("other:2:def", ttl_s=30, take_over=TOKEN) == (True, "other:2:def")  # the holder is known dead
    assert state.publish(TOKEN, chunk(1, 1, ["a"]), window=0) == ("lease", 0)
    state.release(TOKEN)  # not ours any more: nothing happens
    assert state.lease_holder() == "other:2:def"


def test_each_job_is_counted_once_whatever_the_redeliveries(state: RunState) -> None:
    ids = [f"j{i}" for i in range(40)]
    assert state.publish(TOKEN, chunk(1, 40, ids), window=0)[0] == "ok"
    assert state.started(ids[:10] + ["not-in-the-run"]) == 10
    assert state.started(ids[:10]) == 0  # a second start (a retry) changes nothing
    snapshot = state.snapshot()
    assert snapshot is not None and (snapshot.counts.running, snapshot.counts.queued) == (10, 30)

    def worker() -> None:
        for job_id in ids:
            store(state, job_id)

    threads = [threading.Thread(target=worker) for _ in range(4)]  # four workers store every job
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    meta = state.meta()
    assert meta is not None and meta["succeeded"] == "40" and meta["prompt_tokens"] == "400" and float(meta["model_ms"]) == 50.0
    sealed, tail = state.log_snapshot()
    entries = [line for body in sealed.values() for line in body.splitlines()] + tail
    assert sorted(entries) == sorted(f'{{"job_id":"{job_id}"}}'.encode() for job_id in ids)  # one entry per job
    assert len(sealed) == 10 and tail == []  # sealed every 4 entries


def test_the_run_ends_with_its_last_job_once_the_manifest_is_closed(state: RunState) -> None:
    state.publish(TOKEN, chunk(1, 2, ["a", "b", "c"]), window=0)
    assert store(state, "a") == (True, 0, False)
    assert state.close(TOKEN, lines=2) == (True, False, 0)
    assert store(state, "b", "cancelled") == (True, 0, False)
    assert store(state, "c", "expired") == (True, 1, True)  # the tail of 3 entries sealed as segment 1
    assert store(state, "c", "expired") == (False, 0, False)
    status = state.snapshot()
    assert status is not None and status.state == "completed" and status.ended_at is not None and status.counts.adds_up()
    assert (status.counts.succeeded, status.counts.cancelled, status.counts.expired) == (1, 1, 1)
    assert 0 < state.client.ttl(keys.bulk_meta_key("run-1")) <= 600  # finished: the short TTL
    assert state.client.ttl(keys.bulk_segment_key("run-1", 1)) > 600  # a segment keeps its TTL until it is in S3


def test_a_cancel_stops_publishing_and_ends_when_nothing_is_in_flight(state: RunState) -> None:
    state.publish(TOKEN, chunk(1, 2, ["a", "b"]), window=0)
    assert state.cancel() == ("in_progress", False, 0)
    assert state.publish(TOKEN, chunk(3, 3, ["c"]), window=0) == ("stopped", 0)
    assert sorted(state.in_flight()) == ["a", "b"]
    store(state, "a", "cancelled")
    assert store(state, "b")[2] is True
    status = state.snapshot()
    assert status is not None and status.state == "cancelled" and status.counts.total == 2 and status.manifest_complete


def test_a_cancel_of_an_idle_run_ends_it_at_once(state: RunState) -> None:
    assert state.cancel() == ("in_progress", True, 0)
    assert state.snapshot().state == "cancelled"  # type: ignore[union-attr]
    assert state.cancel()[0] == "cancelled"


def test_stale_segments_are_claimed_once(state: RunState) -> None:
    state.publish(TOKEN, chunk(1, 4, ["a", "b", "c", "d"]), window=0)
    for job_id in "abcd":
        store(state, job_id)
    assert state.claim_stale(age_s=3600) == []
    assert state.claim_stale(age_s=0) == [1]
    state.segment_written(1)
    assert state.segment(1) is None and state.claim_stale(age_s=0) == []


def test_redis_errors_become_backend_unavailable() -> None:
    dead = RunState(redis.Redis(port=free_port(), socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0)), "run-1", settings=Settings())
    with pytest.raises(BackendUnavailable):
        dead.stored("a", outcome="succeeded", entry="{}", usage=(0, 0, 0, 0.0))
    with pytest.raises(BackendUnavailable):
        dead.snapshot()
