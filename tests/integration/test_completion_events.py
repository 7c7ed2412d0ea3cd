"""The completion-events hook against a real redis-server: one event per record, none on a redelivery, one after a lost emit."""

from __future__ import annotations

from datetime import UTC, datetime

import redis

from producer import keys
from producer.errors import BackendUnavailable
from producer.events import decode_entry, tail
from producer.schema import ErrorInfo, GenerationSettings, Job, Record
from producer.settings import Settings
from worker.completions import CompletionEvents


def _job(job_id: str, **extra: object) -> Job:
    return Job(job_id=job_id, image_url="https://example.com/a.png", question="what?", model="m",
               generation=GenerationSettings(max_new_tokens=8), submitted_at=datetime.now(UTC), **extra)


def _record(job: Job, *, failed: bool = False) -> Record:
    now = datetime.now(UTC)
    return Record(
        job_id=job.job_id, status="failed" if failed else "succeeded", image_url=job.image_url, question=job.question,
        answer=None if failed else "a cat", model="tiny", quantization="none", generation=job.generation, attempts=0,
        executions=1, worker="w0", batch_size=1, submitted_at=now, started_at=now, finished_at=now,
        error=ErrorInfo(code="too_large", message="big", retryable=False) if failed else None,
        bulk_id=job.bulk_id, custom_id=job.custom_id,
    )


def _entries(client: redis.Redis, stream: str) -> list[dict[str, str]]:
    return [decode_entry(entry_id, fields) for entry_id, fields in client.xrange(stream)]


def test_one_event_per_record_and_none_on_redelivery(redis_url: str) -> None:
    settings = Settings(broker_url=redis_url, s3_bucket="b", s3_prefix="p/")
    client = redis.Redis.from_url(redis_url)
    hook = CompletionEvents(client, settings=settings)
    ok = _job("job-ok", webhook_url="https://hooks.example.com/x", bulk_id="run1", custom_id="line-1")
    bad = _job("job-bad")
    hook.on_stored(_record(ok), job=ok, created=True)
    hook.on_stored(_record(ok), job=ok, created=False)  # the same job redelivered: no second event
    hook.on_stored(_record(bad, failed=True), job=bad, created=True)
    events = _entries(client, settings.events_stream)
    assert [event["job_id"] for event in events] == ["job-ok", "job-bad"]
    first, second = events
    assert first["status"] == "succeeded" and first["error_code"] == "" and first["bulk_id"] == "run1"
    assert first["custom_id"] == "line-1" and first["s3_key"] == "p/results/job-ok.json" and first["s3_bucket"] == "b"
    assert first["webhook_url"] == "https://hooks.example.com/x"
    assert datetime.fromisoformat(first["finished_at"]).tzinfo is not None
    assert second["status"] == "failed" and second["error_code"] == "too_large"
    assert second["s3_key"] == "p/failed/job-bad.json" and "webhook_url" not in second
    assert client.ttl(keys.event_sent_key("job-ok")) > 0


def test_a_lost_emit_happens_on_redelivery(redis_url: str) -> None:
    """A worker killed after storing never ran the script; the redelivery (created=False) appends the event."""
    settings = Settings(broker_url=redis_url)
    client = redis.Redis.from_url(redis_url)
    job = _job("job-late")
    CompletionEvents(client, settings=settings).on_stored(_record(job), job=job, created=False)
    assert [event["job_id"] for event in _entries(client, settings.events_stream)] == ["job-late"]


def test_tail_with_a_group_reads_history_and_acks(redis_url: str) -> None:
    settings = Settings(broker_url=redis_url)
    client = redis.Redis.from_url(redis_url)
    hook = CompletionEvents(client, settings=settings)
    for name in ("a", "b"):
        job = _job(name)
        hook.on_stored(_record(job), job=job, created=True)
    seen = list(tail(client, settings.events_stream, group="g", consumer="c", block_ms=100, limit=2))
    assert [event["job_id"] for event in seen] == ["a", "b"]
    assert client.xpending(settings.events_stream, "g")["pending"] == 0


def test_a_batchs_events_each_job_once_and_a_redis_without_the_script_loads_it(redis_url: str) -> None:
    from worker.hooks import StoredJob

    settings = Settings(broker_url=redis_url)
    client = redis.Redis.from_url(redis_url)
    hook = CompletionEvents(client, settings=settings)
    a, b, c = _job("a"), _job("b"), _job("c")
    client.script_flush()  # a Redis that does not know the script yet (restarted, or failed over): sent alone
    assert hook.on_stored_batch([StoredJob(_record(a), a, True), StoredJob(_record(b), b, True)]) == [None, None]

    def evalsha_calls() -> int:
        return int(client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))

    before = evalsha_calls()
    sent = hook.on_stored_batch([StoredJob(_record(a), a, False), StoredJob(_record(c), c, True)])  # a redelivered, c new
    assert sent == [None, None] and evalsha_calls() - before == 2  # known now: each script once, none sent again
    assert [event["job_id"] for event in _entries(client, settings.events_stream)] == ["a", "b", "c"]
    assert hook.appended == 3

    away = CompletionEvents(redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2), settings=settings)
    failures = away.on_stored_batch([StoredJob(_record(a), a, True), StoredJob(_record(c), c, True)])
    assert len(failures) == 2 and all(isinstance(failure, BackendUnavailable) for failure in failures)
