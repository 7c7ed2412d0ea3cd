"""The worker's bulk hook: outcomes counted once, a Redis outage hands the message back, segments reach S3."""

from __future__ import annotations

from typing import Any

import boto3
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from producer import keys
from producer.bulk.completions import Completions
from producer.bulk.state import Chunk, RunState
from producer.bulk.store import BulkStore
from producer.errors import BackendUnavailable, TransientError
from producer.schema import GenerationSettings, Job, utcnow
from producer.settings import Settings
from worker.bulkruns import BulkRuns
from worker.dev.outcomes import record_for
from worker.dev.services import free_port
from worker.hooks import Hooks, StoredJob


def _job(index: int, bulk_id: str | None = "run-1") -> Job:
    return Job(job_id=f"job-{index}", image_url=f"https://images.example/{index}.jpg", question="What?", model="m",
               generation=GenerationSettings(max_new_tokens=4), submitted_at=utcnow(), bulk_id=bulk_id, custom_id=f"c{index}")


@pytest.fixture()
def settings(redis_url: str, s3_server: Any, bucket: str) -> Settings:
    return Settings(broker_url=redis_url, s3_endpoint_url=s3_server.url, s3_bucket=bucket, bulk_segment_jobs=3)


def _open_run(settings: Settings, client: redis.Redis, jobs: list[Job], bulk_id: str = "run-1") -> RunState:
    state = RunState(client, bulk_id, settings=settings, queue_key="vqa")
    state.create({"state": "in_progress", "created_at": "1", "total": "0"})
    state.lease("t", ttl_s=30)
    ids = [job.job_id for job in jobs]
    assert state.publish("t", Chunk(1, len(ids), "", ids, ids, []), window=0)[0] == "ok"
    return state


def test_outcomes_are_counted_once_and_the_run_ends_with_its_last(settings: Settings, redis_url: str, bucket: str) -> None:
    client = redis.Redis.from_url(redis_url)
    s3 = boto3.client("s3", endpoint_url=settings.s3_endpoint_url)
    jobs = [_job(i) for i in range(7)]
    state = _open_run(settings, client, jobs)
    state.close("t", lines=7)
    hook = BulkRuns(client=client, s3_client=s3, settings=settings)
    hook.on_started(jobs[:2] + [_job(99, bulk_id=None)])
    assert state.snapshot().counts.running == 2  # type: ignore[union-attr]
    statuses = ["succeeded", "failed", "cancelled", "expired", "succeeded", "succeeded", "succeeded"]
    for job, status in zip(jobs, statuses, strict=True):
        record = record_for(job, status=status)
        hook.on_stored(record, job=job, created=True)
        hook.on_stored(record, job=job, created=False)  # the redelivery of the same job
    hook.on_stored(record_for(_job(99, bulk_id=None)), job=_job(99, bulk_id=None), created=True)  # no run: nothing
    final = state.snapshot()
    assert final is not None and final.state == "completed"
    counts = final.counts
    assert (counts.succeeded, counts.failed, counts.cancelled, counts.expired, counts.total) == (4, 1, 1, 1, 7)
    listed = s3.list_objects_v2(Bucket=bucket, Prefix="bulk/run-1/")["Contents"]
    assert sorted(item["Key"] for item in listed) == [
        "bulk/run-1/log/0000000001.jsonl", "bulk/run-1/log/0000000002.jsonl", "bulk/run-1/log/0000000003.jsonl", "bulk/run-1/status.json",
    ]
    assert client.zcard(keys.bulk_sealed_key("run-1")) == 0
    client.close()


def test_a_batchs_jobs_are_counted_in_one_round_trip_once_each(settings: Settings, redis_url: str, bucket: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings.model_copy(update={"bulk_segment_jobs": 100})  # no segment sealed: the round trips are the scripts' own
    client = redis.Redis.from_url(redis_url)
    s3 = boto3.client("s3", endpoint_url=settings.s3_endpoint_url)
    first, second = [_job(i) for i in range(4)], [_job(10 + i, bulk_id="run-2") for i in range(2)]
    runs = [_open_run(settings, client, first), _open_run(settings, client, second, bulk_id="run-2")]
    for state in runs:
        state.close("t", lines=len(first) if state is runs[0] else len(second))
    client.script_flush()  # a Redis that does not know the script yet (restarted, failed over): the pipeline loads it
    sent: list[int] = []
    real_send = redis.connection.Connection.send_packed_command
    monkeypatch.setattr(redis.connection.Connection, "send_packed_command",
                        lambda conn, *args, **kwargs: sent.append(1) or real_send(conn, *args, **kwargs))
    hook = BulkRuns(client=client, s3_client=s3, settings=settings)
    other = _job(99, bulk_id=None)
    batch = [StoredJob(record_for(job), job, True) for job in (*first[:3], other, second[0])]
    assert hook.on_stored_batch(batch) == [None] * 5
    # Four jobs of two runs: SCRIPT EXISTS, SCRIPT LOAD (this Redis lacked it), then all four scripts in one pipeline.
    assert len(sent) == 3
    sent.clear()
    again = [StoredJob(record_for(first[0]), first[0], False), StoredJob(record_for(first[3]), first[3], True),
             StoredJob(record_for(second[1]), second[1], True)]
    assert hook.on_stored_batch(again) == [None] * 3  # a redelivery among them changes nothing
    monkeypatch.undo()
    done = [state.snapshot() for state in runs]
    assert [(status.state, status.counts.succeeded) for status in done if status] == [("completed", 4), ("completed", 2)]
    logged = [entry["job_id"] for entry in Completions(runs[0], BulkStore(s3, bucket=bucket, prefix=settings.s3_prefix, bulk_id="run-1")).entries()]
    assert sorted(logged) == sorted(job.job_id for job in first)  # each job once in the log
    client.close()


def test_with_redis_away_a_batchs_bulk_jobs_go_back(settings: Settings) -> None:
    dead = redis.Redis(port=free_port(), socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))
    failures = BulkRuns(client=dead, s3_client=None, settings=settings).on_stored_batch(
        [StoredJob(record_for(_job(1)), _job(1), True), StoredJob(record_for(_job(2, bulk_id=None)), _job(2, bulk_id=None), True)])
    assert isinstance(failures[0], BackendUnavailable) and failures[1] is None  # a job of no run needs no Redis


def test_with_redis_away_the_job_goes_back(settings: Settings) -> None:
    dead = redis.Redis(port=free_port(), socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))
    hook = BulkRuns(client=dead, s3_client=None, settings=settings)
    with pytest.raises(BackendUnavailable):
        hook.on_stored(record_for(_job(1)), job=_job(1), created=True)
    # Through the worker's hooks too: a TransientError there hands the message back.
    with pytest.raises(TransientError):
        Hooks([hook]).on_stored(record_for(_job(1)), job=_job(1), created=True)


def test_an_s3_outage_while_draining_costs_no_outcome(settings: Settings, redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    jobs = [_job(i) for i in range(3)]
    state = _open_run(settings, client, jobs)
    unreachable = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{free_port()}", config=_fast())
    hook = BulkRuns(client=client, s3_client=unreachable, settings=settings)
    for job in jobs:
        hook.on_stored(record_for(job), job=job, created=True)  # the third seals a segment it cannot write
    assert state.snapshot().counts.succeeded == 3  # type: ignore[union-attr]
    assert state.segment(1) is not None and client.zcard(keys.bulk_sealed_key("run-1")) == 1  # kept for a later writer
    client.close()


def _fast() -> Any:
    from botocore.config import Config

    return Config(connect_timeout=0.5, read_timeout=0.5, retries={"max_attempts": 1})
