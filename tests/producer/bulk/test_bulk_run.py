"""A bulk run end to end without a model: client.bulk publishes, the worker's bulk hook counts, results come back in bulk.

The worker is played by worker/dev/outcomes.py: the real intake, the real bulk hook, no model.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from producer import keys
from producer.bulk import InvalidManifest
from producer.bulk.results import read_results
from producer.client import VQAClient
from producer.errors import InvalidJob, RunBusy
from worker.bulkruns import BulkRuns
from worker.dev.outcomes import finish, take_jobs
from tests.producer.bulk.conftest import image_lines

# Bulk runs publish in the low lane by default (producer/bulk/submit.py BulkOptions.priority).
BULK_LANE = keys.priority_queue_key("vqa", keys.PRIORITIES["low"])


def _until(condition: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
    return value


def _work(run: Any, broker: redis.Redis, hook: BulkRuns, *, batch: int = 7, **options: Any) -> int:
    """Play the workers until the run ended; check the counts add up at every step."""
    done = 0
    while not run.status().ended:
        jobs = take_jobs(broker, BULK_LANE, batch)
        if not jobs:
            time.sleep(0.02)
            continue
        finish(hook, jobs, **options)
        done += len(jobs)
        assert run.status().counts.adds_up()
    return done


def test_a_run_streams_within_its_window_and_collects_every_outcome(
    bulk_client: VQAClient, broker: redis.Redis, hook: BulkRuns, write_manifest: Callable[..., Path], s3: Any, tmp_path: Path
) -> None:
    lines: list[Any] = [*image_lines(60), "{broken", {"custom_id": "img-5", "image_url": "https://images.example/again.jpg"}]
    lines.append({"custom_id": "pair", "image_url": "https://images.example/p.jpg", "questions": ["Colour?", "Shape?"]})
    run = bulk_client.bulk(str(write_manifest(lines)), questions=["What is shown?"], window=20)
    # Publishing stops at the window: nothing is finishing yet.
    _until(lambda: broker.llen(BULK_LANE) == 16)
    time.sleep(0.3)
    status = run.status()
    assert broker.llen(BULK_LANE) == 16 and status.counts.queued == 16 and not status.manifest_complete and run.publishing
    finish(hook, take_jobs(broker, BULK_LANE, 3), status=lambda job: "failed")
    partial = run.results()
    assert len(partial) == 3 and {line["status"] for line in partial} == {"failed"}

    done = _work(run, broker, hook, redeliver=True)
    run.join()
    status = run.status()
    assert status.state == "completed" and status.manifest_complete
    counts = status.counts
    assert (counts.total, counts.succeeded, counts.failed, counts.invalid, counts.queued) == (62, 59, 3, 2, 0)
    assert done == 59 and status.usage.prompt_tokens == 59 * 120 and status.usage.generated_tokens == 59 * 8

    out = tmp_path / "results.jsonl"
    assert run.results(out) == 62
    results = read_results(out)
    assert sorted((line["custom_id"], line["question"]) for line in results) == sorted(
        [(f"img-{i}", "What is shown?") for i in range(60)] + [("pair", "Colour?"), ("pair", "Shape?")]
    )
    assert len({line["job_id"] for line in results}) == 62
    assert set(results[0]) == {"custom_id", "question", "job_id", "status", "answer", "error", "usage"}

    prefix = f"bulk/{run.bulk_id}/"
    lasting = json.loads(s3.get_object(Bucket=bulk_client.settings.s3_bucket, Key=prefix + "status.json")["Body"].read())
    assert lasting["state"] == "completed" and lasting["counts"]["succeeded"] == 59
    invalid = s3.get_object(Bucket=bulk_client.settings.s3_bucket, Key=prefix + "invalid.jsonl")["Body"].read().decode().splitlines()
    assert [json.loads(line)["line"] for line in invalid] == [61, 62]
    assert "duplicate custom_id 'img-5' (first on line 6)" in invalid[1]
    # Redis holds no log any more: everything is in S3 segments of 10 entries.
    assert broker.llen(keys.bulk_log_key(run.bulk_id)) == 0 and broker.zcard(keys.bulk_sealed_key(run.bulk_id)) == 0
    listed = s3.list_objects_v2(Bucket=bulk_client.settings.s3_bucket, Prefix=prefix + "log/")["Contents"]
    assert len(listed) == 7


def test_stopping_and_submitting_again_publishes_each_job_once(
    bulk_client: VQAClient, broker: redis.Redis, hook: BulkRuns, write_manifest: Callable[..., Path], tmp_path: Path
) -> None:
    path = str(write_manifest(image_lines(50)))
    first = bulk_client.bulk(path, questions=["q?"], window=16)
    _until(lambda: broker.llen(BULK_LANE) == 16)
    first.stop()  # as a killed submitter: the cursor stays after its last chunk
    assert not first.publishing and first.status().counts.total == 16

    again = bulk_client.bulk(path, questions=["q?"], window=16)
    assert again.bulk_id == first.bulk_id
    _work(again, broker, hook)
    again.join()
    results = again.results()
    assert len(results) == 50 and len({line["custom_id"] for line in results}) == 50
    meta = broker.hgetall(keys.bulk_meta_key(again.bulk_id))
    assert meta[b"total"] == b"50" and meta[b"succeeded"] == b"50"
    # A run that ended is not published again.
    third = bulk_client.bulk(path, questions=["q?"], window=16)
    third.join()
    assert third.status().state == "completed" and broker.llen(BULK_LANE) == 0


def test_strict_publishes_nothing_when_a_line_is_invalid(
    bulk_client: VQAClient, broker: redis.Redis, write_manifest: Callable[..., Path]
) -> None:
    path = str(write_manifest([*image_lines(5), {"custom_id": "img-9"}]))
    with pytest.raises(InvalidManifest) as caught:
        bulk_client.bulk(path, questions=["q?"], strict=True)
    assert caught.value.reports == ["line 6: missing field: image_url"]
    assert broker.llen(BULK_LANE) == 0 and not broker.keys("vqa:bulk:*")


def test_a_cancel_stops_publishing_and_cancels_what_is_queued(
    bulk_client: VQAClient, broker: redis.Redis, hook: BulkRuns, write_manifest: Callable[..., Path]
) -> None:
    run = bulk_client.bulk(str(write_manifest(image_lines(100))), questions=["q?"], window=40)
    _until(lambda: broker.llen(BULK_LANE) == 32)  # chunks of 16: a third would pass the window
    finish(hook, take_jobs(broker, BULK_LANE, 5))
    status = bulk_client.bulk(name=run.bulk_id).cancel()
    assert status.state == "cancelling" and status.manifest_complete
    run.join()
    assert run.progress is not None and run.progress.stopped == "cancelled"
    queued = take_jobs(broker, BULK_LANE, 1000)
    assert len(queued) == status.counts.queued
    # Every queued job carries its revoke marker: a worker ends it as cancelled.
    assert all(broker.exists(keys.revoked_key(job.job_id)) for job in queued)
    finish(hook, queued, status=lambda job: "cancelled")
    final = run.status()
    assert final.state == "cancelled" and final.counts.adds_up()
    assert (final.counts.succeeded, final.counts.cancelled, final.counts.total) == (5, final.counts.total - 5, final.counts.total)


def test_an_expiring_run_puts_its_deadline_on_every_job(
    bulk_client: VQAClient, broker: redis.Redis, write_manifest: Callable[..., Path]
) -> None:
    run = bulk_client.bulk(str(write_manifest(image_lines(3))), questions=["q?"], expires_in="2h")
    run.join()
    status = run.status()
    assert status.expires_at is not None and abs((status.expires_at - status.created_at).total_seconds() - 7200) < 1
    jobs = take_jobs(broker, BULK_LANE, 10)
    assert {job.deadline for job in jobs} == {status.expires_at}


def test_the_same_name_with_other_options_is_refused(
    bulk_client: VQAClient, write_manifest: Callable[..., Path]
) -> None:
    path = str(write_manifest(image_lines(2)))
    bulk_client.bulk(path, name="nightly", questions=["q?"]).join()
    with pytest.raises(InvalidJob, match="exists with other options"):
        bulk_client.bulk(path, name="nightly", questions=["another?"])


def test_a_live_submitter_keeps_the_run(
    bulk_client: VQAClient, broker: redis.Redis, write_manifest: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from producer.bulk import submit

    monkeypatch.setattr(submit, "LEASE_TTL_S", 2.0)
    path = str(write_manifest(image_lines(40)))
    first = bulk_client.bulk(path, questions=["q?"], window=16)
    _until(lambda: broker.llen(BULK_LANE) == 16)
    with pytest.raises(RunBusy, match="is being published by"):
        bulk_client.bulk(path, questions=["q?"], window=16)
    first.stop()


def test_parquet_manifest_and_results(
    bulk_client: VQAClient, broker: redis.Redis, hook: BulkRuns, tmp_path: Path
) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.Table.from_pylist(image_lines(12)), manifest)
    run = bulk_client.bulk(str(manifest), questions=["q?"])
    _work(run, broker, hook)
    out = tmp_path / "results.parquet"
    assert run.results(out) == 12
    rows = read_results(out)
    assert sorted(row["custom_id"] for row in rows) == sorted(f"img-{i}" for i in range(12))
    assert rows[0]["usage"]["prompt_tokens"] == 120 and rows[0]["error"] is None
