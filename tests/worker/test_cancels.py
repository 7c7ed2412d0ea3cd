"""Cancels and deadlines, on a real redis-server: what stops a job before the model, in the fetch stage and in the batcher."""

from __future__ import annotations

import json
import threading
import time
from datetime import timedelta

import redis

from producer import keys
from producer.errors import JobCancelled, JobExpired
from producer.schema import GenerationSettings, Job, utcnow
from producer.settings import Settings
from producer.revokes import write_revokes
from worker.cancels import CancelCheck, RevokedSet
from worker.consumer import BatchingConsumer
from worker.dev.services import free_port
from worker.intake import read_message
from worker.jobs import Outcome, Prepared
from worker.runner import Finishing
from tests.support.consumer import FakeChannel, FakeRunner, delivery


def _job(name: str, **fields: object) -> Job:
    return Job(job_id=f"id-{name}", image_url=f"https://images.example/{name}", question="What?", model="m",
               generation=GenerationSettings(max_new_tokens=4), submitted_at=utcnow(), **fields)


def test_a_revoke_marker_or_a_past_deadline_stops_a_job(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    client.set(keys.revoked_key("id-b"), json.dumps({"at": "2026-12-01T10:00:00+00:00", "by": "vqa cancel"}))
    jobs = [_job("a"), _job("b"), _job("c", deadline=utcnow() - timedelta(seconds=1)), _job("d", deadline=utcnow() + timedelta(hours=1))]
    reasons = CancelCheck(client).reasons(jobs)
    assert set(reasons) == {"id-b", "id-c"}
    assert isinstance(reasons["id-b"], JobCancelled) and "2026-12-01T10:00:00+00:00 (vqa cancel)" in reasons["id-b"].message
    assert isinstance(reasons["id-c"], JobExpired) and reasons["id-c"].code == "expired"
    client.close()


def test_with_redis_away_only_deadlines_are_checked() -> None:
    dead = redis.Redis(port=free_port(), socket_connect_timeout=1)
    reasons = CancelCheck(dead).reasons([_job("a"), _job("c", deadline=utcnow() - timedelta(seconds=1))])
    assert list(reasons) == ["id-c"]


def test_a_celery_expires_header_becomes_the_deadline_when_earlier() -> None:
    later, earlier = utcnow() + timedelta(hours=2), utcnow() + timedelta(minutes=5)
    raw = delivery(_job("x", deadline=later)).raw
    envelope = json.loads(raw)
    envelope["headers"]["expires"] = earlier.replace(tzinfo=None).isoformat()  # naive, as a naive send_task writes it: UTC
    _, job = read_message("t", json.dumps(envelope).encode())
    assert job.deadline == earlier


def test_a_job_cancelled_while_buffered_never_reaches_the_model(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    runner = FakeRunner()
    runner.release.set()
    fetched = threading.Event()

    def prepare(job: Job) -> Prepared:
        fetched.set()
        return Prepared(inputs=object(), cost=1, fetch_ms=3.0)

    jobs = [_job(f"{i}.png") for i in range(2)]
    channel = FakeChannel([delivery(job) for job in jobs])
    # A long batch delay: both jobs wait in the batcher, fetched, when the cancel comes.
    consumer = BatchingConsumer(settings=Settings(max_batch_size=8, max_batch_delay_ms=1500), runner=runner,  # type: ignore[arg-type]
                                prepare=prepare, stopping=threading.Event(), broker=channel, cancels=CancelCheck(client))
    seen: list[tuple[str, type | None]] = []
    real_infer = runner.infer

    def infer(batch: list) -> object:
        seen.extend((p.job.job_id, type(p.prepared.error) if p.prepared.error else None) for p in batch)
        return real_infer(batch)

    runner.infer = infer  # type: ignore[method-assign]
    thread = threading.Thread(target=consumer.run)
    thread.start()
    try:
        assert fetched.wait(5)
        time.sleep(0.2)
        client.set(keys.revoked_key("id-1.png"), json.dumps({"at": utcnow().isoformat(), "by": "test"}))
        deadline = time.monotonic() + 10
        while len(seen) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        consumer.stop()
        thread.join(10)
        client.close()
    assert sorted(seen) == [("id-0.png", None), ("id-1.png", JobCancelled)]


class _RetryOnceRunner(FakeRunner):
    """The first run of each job fails transiently with a long retry delay; later runs answer."""

    def __init__(self) -> None:
        super().__init__()
        self.release.set()
        self.seen: list[tuple[str, type | None]] = []

    def infer(self, batch: list) -> Finishing:
        outcomes = []
        for pending in batch:
            error = pending.prepared.error if pending.prepared is not None else None
            self.seen.append((pending.job.job_id, type(error) if error else None))
            retry = pending.attempt == 1 and error is None
            outcomes.append(Outcome(pending, "retry", delay_s=30.0) if retry else Outcome(pending, "ack"))
        return Finishing(outcomes)


def test_a_job_cancelled_while_waiting_for_its_retry_ends_at_once_not_at_its_retry_time(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    cancels = CancelCheck(client, revoked=RevokedSet(ttl_s=60))
    runner = _RetryOnceRunner()

    def prepare(job: Job) -> Prepared:  # the fetch stage's own first step (worker/preparing.py)
        stopped = cancels.reasons([job]).get(job.job_id)
        return Prepared(error=stopped) if stopped else Prepared(inputs=object(), cost=1)

    job = _job("retry.png")
    consumer = BatchingConsumer(settings=Settings(max_batch_size=1, max_batch_delay_ms=0), runner=runner,  # type: ignore[arg-type]
                                prepare=prepare, stopping=threading.Event(), broker=FakeChannel([delivery(job)]), cancels=cancels)
    thread = threading.Thread(target=consumer.run)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while [held.state for held in consumer.board.snapshot()] != ["scheduled"] and time.monotonic() < deadline:
            time.sleep(0.02)
        [waiting] = consumer.board.snapshot()
        assert waiting.state == "scheduled" and waiting.eta is not None and waiting.eta > time.time() + 20
        # What a Celery revoke does (worker/control.py): the marker in Redis, the id in memory.
        write_revokes(client, [job.job_id], ttl_s=60, by="test")
        cancels.revoked.add([job.job_id])
        cancelled_at = time.monotonic()
        while len(runner.seen) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert time.monotonic() - cancelled_at < 2, "released long before its retry time"
        while consumer.board.snapshot() and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        consumer.stop()
        thread.join(10)
        client.close()
    assert runner.seen == [(job.job_id, None), (job.job_id, JobCancelled)]
    assert consumer.board.snapshot() == [] and consumer.board.processed == 1


def test_redis_is_the_authority_over_the_in_memory_revokes(redis_url: str) -> None:
    """A job submitted again after its cancel (its marker deleted) is no longer cancelled from memory."""
    client = redis.Redis.from_url(redis_url)
    cancels = CancelCheck(client, revoked=RevokedSet(ttl_s=60))
    job = _job("again.png")
    write_revokes(client, [job.job_id], ttl_s=60, by="test")
    cancels.revoked.add([job.job_id])
    assert set(cancels.reasons([job])) == set(cancels.local_reasons([job])) == {job.job_id}
    client.delete(keys.revoked_key(job.job_id))  # what a resubmission does (producer/client.py)
    assert cancels.reasons([job]) == {} and cancels.local_reasons([job]) == {}
    client.close()


def test_the_in_memory_revokes_expire_and_are_capped() -> None:
    now = [0.0]
    revoked = RevokedSet(ttl_s=10, maxlen=3, clock=lambda: now[0])
    revoked.add(["a", "b", "c", "d"])
    assert revoked.ids() == ["b", "c", "d"] and "a" not in revoked
    now[0] = 11.0
    assert "b" not in revoked and revoked.ids() == []
