"""Records in S3 against moto's server: the first success record wins, a failure never stands next to a success."""

from __future__ import annotations

from typing import Any

import boto3
import pytest
from botocore.stub import Stubber

from producer import keys
from producer.errors import CorruptRecord, StorageUnavailable
from producer.schema import ErrorInfo, GenerationSettings, Record, utcnow
from producer.settings import Settings
from worker.storage import RecordStore, make_s3_client


def record(job_id: str, *, answer: str | None = "a cat", failed: bool = False) -> Record:
    return Record(
        job_id=job_id,
        status="failed" if failed else "succeeded",
        image_url="https://images.example/cat.png",
        question="What is it?",
        answer=None if failed else answer,
        model="m",
        quantization="none",
        generation=GenerationSettings(max_new_tokens=4),
        attempts=1,
        executions=1,
        worker="w",
        batch_size=1,
        submitted_at=utcnow(),
        started_at=utcnow(),
        finished_at=utcnow(),
        error=ErrorInfo(code="timeout", message="slow host", retryable=True) if failed else None,
    )


@pytest.fixture()
def store(s3_server: Any, bucket: str) -> tuple[RecordStore, Any]:
    s3 = boto3.client("s3", endpoint_url=s3_server.url)
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    settings = Settings(s3_endpoint_url=s3_server.url, s3_bucket=bucket)
    return RecordStore(settings, s3_client=make_s3_client(settings), app=None), s3  # type: ignore[arg-type]


def _versions(s3: Any, bucket: str, key: str) -> int:
    return len([v for v in s3.list_object_versions(Bucket=bucket, Prefix=key).get("Versions", []) if v["Key"] == key])


def test_second_success_write_does_not_overwrite_the_first(store: tuple[RecordStore, Any], bucket: str) -> None:
    records, s3 = store
    first = records.write(record("j1", answer="first"))
    again = records.write(record("j1", answer="second"))
    assert first.created and not again.created
    assert first.record.answer == again.record.answer == "first"
    assert records.existing("j1").answer == "first"
    assert _versions(s3, bucket, keys.result_key("", "j1")) == 1  # refused by If-None-Match, not overwritten


def test_failure_after_a_success_is_dropped(store: tuple[RecordStore, Any], bucket: str) -> None:
    records, s3 = store
    records.write(record("j2"))
    winner = records.write(record("j2", failed=True))
    assert winner.record.status == "succeeded" and not winner.created
    assert _versions(s3, bucket, keys.failed_key("", "j2")) == 0


def test_success_after_a_failure_replaces_it(store: tuple[RecordStore, Any], bucket: str) -> None:
    records, s3 = store
    assert records.write(record("j3", failed=True)).record.status == "failed"
    assert records.write(record("j3")).record.status == "succeeded"
    current = {item["Key"] for item in s3.list_objects_v2(Bucket=bucket).get("Contents", [])}
    assert current == {keys.result_key("", "j3")}


# --------------------------------------------------------------------------- what S3 can answer


def _stubbed(settings: Settings) -> tuple[RecordStore, Stubber]:
    """A real boto3 client whose answers are scripted: S3 behaviours moto does not have."""
    client = make_s3_client(settings)
    return RecordStore(settings, s3_client=client, app=None), Stubber(client)  # type: ignore[arg-type]


def test_a_409_conflict_is_transient_never_stored_as_if_written() -> None:
    """AWS answers 409 while a concurrent conditional write is still running: it may yet fail."""
    records, stub = _stubbed(Settings(s3_bucket="b"))
    stub.add_client_error("put_object", service_error_code="ConditionalRequestConflict", http_status_code=409)
    with stub, pytest.raises(StorageUnavailable, match="concurrent conditional write"):
        records.write(record("j409"))
    stub.assert_no_pending_responses()


def test_a_412_with_no_readable_winner_is_transient() -> None:
    records, stub = _stubbed(Settings(s3_bucket="b"))
    stub.add_client_error("put_object", service_error_code="PreconditionFailed", http_status_code=412)
    stub.add_client_error("get_object", service_error_code="NoSuchKey", http_status_code=404)
    with stub, pytest.raises(StorageUnavailable, match="no readable record"):
        records.write(record("j412"))
    stub.assert_no_pending_responses()


def test_an_unreadable_success_object_is_a_permanent_error_and_is_kept(store: tuple[RecordStore, Any], bucket: str) -> None:
    records, s3 = store
    key = keys.result_key("", "j5")
    s3.put_object(Bucket=bucket, Key=key, Body=b'{"job_id": "j5", "status": "succ')
    with pytest.raises(CorruptRecord, match="results/j5.json exists but is not a readable record"):
        records.existing("j5")
    with pytest.raises(CorruptRecord):
        records.write(record("j5"))  # a success cannot be written where the object stands
    failed = records.write(record("j5", failed=True))  # ... but the failure saying why can
    assert failed.created and failed.record.status == "failed"
    assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == b'{"job_id": "j5", "status": "succ'


def test_a_batch_is_marked_started_as_celery_marks_it_and_a_success_stays(redis_url: str) -> None:
    """mark_started writes a batch in two round trips; AsyncResult reads what store_result would have written."""
    from celery.result import AsyncResult

    from producer.celery_app import make_celery

    app = make_celery(Settings(broker_url=redis_url, result_backend=redis_url))
    try:
        backend = app.backend
        backend.store_result("done", {"answer": "a cat"}, "SUCCESS")
        store = RecordStore(Settings(), s3_client=None, app=app)
        store.mark_started(["j1", "j2", "done"])
        assert [AsyncResult(job_id, app=app).state for job_id in ("j1", "j2", "done")] == ["STARTED", "STARTED", "SUCCESS"]
        assert backend.get_task_meta("done")["result"] == {"answer": "a cat"}
        meta = backend.get_task_meta("j1")
        assert meta["task_id"] == "j1" and meta["result"] is None and meta["date_done"] is None
        assert 0 < backend.client.ttl(backend.get_key_for_task("j1")) <= backend.expires
    finally:
        app.close()


def test_a_batchs_records_are_published_as_celery_stores_them_and_a_success_stays(redis_url: str) -> None:
    """publish_batch writes the successes in two round trips: what store_result writes, byte for byte but the date."""
    from celery.result import AsyncResult

    from producer.celery_app import make_celery

    app = make_celery(Settings(broker_url=redis_url, result_backend=redis_url))
    try:
        backend = app.backend
        backend.store_result("done", {"answer": "the first"}, "SUCCESS")
        backend.store_result("by-celery", record("by-celery").model_dump(mode="json"), "SUCCESS")
        store = RecordStore(Settings(), s3_client=None, app=app)
        j1 = record("j1")
        store.publish_batch([j1, record("done", answer="a late duplicate"), record("j2", failed=True)])
        assert [AsyncResult(job_id, app=app).state for job_id in ("j1", "done", "j2")] == ["SUCCESS", "SUCCESS", "FAILURE"]
        assert backend.get_task_meta("done")["result"] == {"answer": "the first"}
        ours, celerys = backend.get_task_meta("j1"), backend.get_task_meta("by-celery")
        assert {**ours, "task_id": None, "date_done": None} == {**celerys, "task_id": None, "date_done": None, "result": ours["result"]}
        assert ours["result"] == j1.model_dump(mode="json") and ours["date_done"] is not None
        assert AsyncResult("j1", app=app).get(timeout=1)["answer"] == "a cat"
        assert 0 < backend.client.ttl(backend.get_key_for_task("j1")) <= backend.expires
    finally:
        app.close()
