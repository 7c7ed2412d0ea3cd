"""S3 requests per job against moto's server and a real Redis: one on the common first delivery, the guarantees kept."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
import redis

from producer import keys
from producer.errors import BackendUnavailable
from producer.schema import GenerationSettings, Job, utcnow
from producer.settings import Settings
from tests.worker.test_storage import record
from worker.cancels import CancelCheck
from worker.counters import JobCounters
from worker.fetch.images import FetchPolicy
from worker.preparing import JobPreparer
from worker.storage import RecordStore, make_s3_client


class _Requests(Counter[str]):
    """S3 operations a boto3 client sent, counted by botocore's own event as each request goes out."""

    def __call__(self, model: Any, **_: Any) -> None:
        self[model.name] += 1


@pytest.fixture()
def jobs_redis(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture()
def settings(s3_server: Any, bucket: str, image_base_url: str) -> Settings:
    return Settings(s3_endpoint_url=s3_server.url, s3_bucket=bucket, allowed_hosts=[image_base_url.removeprefix("http://")])


def _store(settings: Settings, marks: redis.Redis | None) -> tuple[RecordStore, _Requests]:
    client = make_s3_client(settings)
    requests = _Requests()
    client.meta.events.register("before-call.s3", requests)
    return RecordStore(settings, s3_client=client, app=None, marks=marks), requests  # type: ignore[arg-type]


def _current(settings: Settings) -> set[str]:
    s3 = boto3.client("s3", endpoint_url=settings.s3_endpoint_url)
    return {item["Key"] for item in s3.list_objects_v2(Bucket=settings.s3_bucket).get("Contents", [])}


def test_a_first_success_is_one_s3_request(settings: Settings, jobs_redis: redis.Redis) -> None:
    store, requests = _store(settings, jobs_redis)
    assert store.write(record("one")).created
    assert requests == {"PutObject": 1}
    # Without marks every success also deletes a failed record that may not exist: two requests.
    unmarked, unmarked_requests = _store(settings, None)
    assert unmarked.write(record("two")).created
    assert unmarked_requests == {"PutObject": 1, "DeleteObject": 1}


def test_a_marked_failure_is_replaced_by_a_later_success(settings: Settings, jobs_redis: redis.Redis) -> None:
    store, _ = _store(settings, jobs_redis)
    assert store.write(record("j1", failed=True)).record.status == "failed"
    assert jobs_redis.exists(keys.failed_mark_key("j1"))
    # Another worker's store (same Redis) succeeds with the job: the failure goes, and its mark.
    other, requests = _store(settings, jobs_redis)
    assert other.write(record("j1")).record.status == "succeeded"
    assert requests == {"PutObject": 1, "DeleteObject": 1}
    assert _current(settings) == {keys.result_key("", "j1")}
    assert not jobs_redis.exists(keys.failed_mark_key("j1"))


def test_a_batchs_new_successes_delete_only_the_marked_failures_in_one_look(settings: Settings, jobs_redis: redis.Redis) -> None:
    store, _ = _store(settings, jobs_redis)
    store.write(record("b2", failed=True))
    batch, requests = _store(settings, jobs_redis)
    assert all(batch.write(record(job_id), drop_failed=False).created for job_id in ("b1", "b2", "b3"))
    assert _current(settings) == {keys.result_key("", j) for j in ("b1", "b2", "b3")} | {keys.failed_key("", "b2")}
    batch.drop_failed(["b1", "b2", "b3"])
    assert requests == {"PutObject": 3, "DeleteObject": 1}  # the one marked failure, nothing for the others
    assert _current(settings) == {keys.result_key("", j) for j in ("b1", "b2", "b3")}
    assert not jobs_redis.exists(keys.failed_mark_key("b2"))


def test_a_failure_after_a_success_is_dropped_with_marks(settings: Settings, jobs_redis: redis.Redis) -> None:
    store, _ = _store(settings, jobs_redis)
    store.write(record("j2"))
    winner = store.write(record("j2", failed=True))
    assert winner.record.status == "succeeded" and not winner.created
    assert _current(settings) == {keys.result_key("", "j2")}


def test_a_failure_that_cannot_be_marked_is_not_written(settings: Settings, redis_server: Any) -> None:
    dead = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)  # nothing listens on port 1
    store, requests = _store(settings, dead)
    with pytest.raises(BackendUnavailable, match="cannot mark job j3"):
        store.write(record("j3", failed=True))
    assert not requests and _current(settings) == set()


def test_a_success_deletes_when_the_marks_cannot_be_read(settings: Settings, jobs_redis: redis.Redis) -> None:
    marked, _ = _store(settings, jobs_redis)
    marked.write(record("j4", failed=True))
    blind, requests = _store(settings, redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2))
    assert blind.write(record("j4")).created
    assert requests == {"PutObject": 1, "DeleteObject": 1}
    assert _current(settings) == {keys.result_key("", "j4")}


class _Engine:
    name, quantization = "stand-in", "none"

    def prepare(self, image: Any, question: str, *, image_grid: str | None = None) -> tuple[int, int]:
        return image.size

    def cost(self, inputs: Any) -> int:
        return 1


def _preparer(settings: Settings, jobs_redis: redis.Redis) -> tuple[JobPreparer, _Requests]:
    store, requests = _store(settings, jobs_redis)
    preparer = JobPreparer(
        engine=_Engine(), store=store, counters=JobCounters(jobs_redis), cancels=CancelCheck(jobs_redis),  # type: ignore[arg-type]
        policy=FetchPolicy.from_settings(settings), s3_client=store.s3,
    )
    return preparer, requests


def _job(job_id: str, image_base_url: str) -> Job:
    return Job(job_id=job_id, image_url=f"{image_base_url}/small.png", question="What?", model="m",
               generation=GenerationSettings(max_new_tokens=4), submitted_at=utcnow())


def test_a_job_that_never_ran_is_prepared_without_an_s3_request(settings: Settings, jobs_redis: redis.Redis, image_base_url: str) -> None:
    preparer, requests = _preparer(settings, jobs_redis)
    prepared = preparer(_job("fresh", image_base_url))
    assert prepared.error is None and prepared.inputs is not None
    assert not requests


def test_a_job_that_ran_before_is_answered_from_its_record(settings: Settings, jobs_redis: redis.Redis, image_base_url: str) -> None:
    preparer, requests = _preparer(settings, jobs_redis)
    preparer.store.write(record("ran"))
    jobs_redis.set(keys.executions_key("ran"), 1)  # as the model thread counts a run
    requests.clear()
    prepared = preparer(_job("ran", image_base_url))
    assert prepared.existing is not None and prepared.existing.answer == "a cat"
    assert requests == {"GetObject": 1} and prepared.inputs is None


def _recording(client: redis.Redis) -> list[str]:
    """The commands ``client`` sends from now on, by name."""
    sent: list[str] = []
    send = client.execute_command

    def execute_command(*args: Any, **options: Any) -> Any:
        sent.append(str(args[0]).upper())
        return send(*args, **options)

    client.execute_command = execute_command  # type: ignore[method-assign]
    return sent


def test_a_jobs_cancel_and_counts_are_read_in_one_round_trip(settings: Settings, jobs_redis: redis.Redis, image_base_url: str) -> None:
    preparer, _ = _preparer(settings, jobs_redis)
    jobs_redis.set(keys.deliveries_key("twice"), 2)  # as two deliveries that never came back left it
    sent = _recording(jobs_redis)
    prepared = preparer(_job("twice", image_base_url))
    assert sent == ["MGET"]
    assert prepared.error is None and prepared.earlier_deliveries == 2


def test_a_cancelled_job_is_not_fetched(settings: Settings, jobs_redis: redis.Redis, image_base_url: str) -> None:
    from producer.errors import JobCancelled
    from producer.revokes import write_revokes

    preparer, requests = _preparer(settings, jobs_redis)
    write_revokes(jobs_redis, ["gone"], ttl_s=60, by="a test")
    prepared = preparer(_job("gone", image_base_url))
    assert isinstance(prepared.error, JobCancelled) and "a test" in prepared.error.message
    assert prepared.inputs is None and prepared.fetch_ms is None and not requests


def test_with_redis_away_a_job_revoked_here_is_still_not_fetched(settings: Settings, image_base_url: str) -> None:
    from producer.errors import JobCancelled

    dead = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    preparer, _ = _preparer(settings, dead)
    preparer.cancels.revoked.add(["gone-here"])
    assert isinstance(preparer(_job("gone-here", image_base_url)).error, JobCancelled)
    fresh = preparer(_job("fresh-here", image_base_url))
    assert fresh.error is None and fresh.inputs is not None  # counted as a first delivery
