"""Bulk runs end to end on real parts: `vqa bulk` → redis-server → one `vqa worker` (tiny model) → moto S3.

One worker serves every scenario of this module (its Redis and bucket are the module's own), so
the scenarios share its start-up: mixed manifests with invalid lines and duplicate ids, several
questions per image, a kill -9 of the submitter and a resume, a cancel half-way, an expiry, and
an S3-prefix source. The worker is paused (SIGSTOP) where a scenario needs jobs to wait.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import redis

from producer import keys
from producer.bulk.results import read_results
from producer.bulk.status import BulkStatus
from producer.client import VQAClient
from producer.settings import Settings
from worker.dev.services import RedisServer, S3Server, WorkerProcess
from tests.support.images import SIZES

pytestmark = pytest.mark.slow

NAMES = sorted(SIZES)
QUESTION = "What is shown?"


@pytest.fixture(scope="module")
def env(redis_server: RedisServer, s3_server: S3Server, tiny_model_dir: Path, image_base_url: str) -> dict[str, str]:
    bucket = f"bulk-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server.url).create_bucket(Bucket=bucket)
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return {
        "VQA_BROKER_URL": redis_server.url,
        "VQA_RESULT_BACKEND": redis_server.url,
        "VQA_S3_ENDPOINT_URL": s3_server.url,
        "VQA_S3_BUCKET": bucket,
        "VQA_MODEL": str(tiny_model_dir),
        "VQA_QUANTIZATION": "none",
        "VQA_DEVICE": "cpu",
        "VQA_MAX_BATCH_SIZE": "8",
        "VQA_MAX_BATCH_DELAY_MS": "50",
        "VQA_MAX_NEW_TOKENS": "4",
        "VQA_ALLOWED_HOSTS": image_base_url.removeprefix("http://"),
        "VQA_IMAGE_S3_BUCKETS": bucket,
        "VQA_VISIBILITY_TIMEOUT": "60",
        "VQA_SHUTDOWN_GRACE_S": "10",
        "VQA_BULK_SEGMENT_JOBS": "25",
        "VQA_BULK_STATUS_INTERVAL_S": "1",
        "OMP_NUM_THREADS": "1",
    }


@pytest.fixture(scope="module")
def worker(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    proc = WorkerProcess(env={**env, "VQA_WORKER_NAME": "bulk-w0"}, log_path=tmp_path_factory.mktemp("bulk") / "worker.log").start()
    yield proc
    proc.signal(signal.SIGCONT)
    proc.stop(timeout=30)


@pytest.fixture()
def client(env: dict[str, str], worker: WorkerProcess) -> Iterator[VQAClient]:
    made = VQAClient(Settings(**{name.removeprefix("VQA_").lower(): value for name, value in env.items() if name.startswith("VQA_")}))
    yield made
    made.close()


def vqa(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "producer.cli", "bulk", *args], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=timeout)


def start_vqa(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "producer.cli", "bulk", *args], env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def poll(client: VQAClient, bulk_id: str, until: Callable[[BulkStatus], bool], *, timeout: float = 90) -> list[BulkStatus]:
    """Every status seen until ``until`` holds; each one must add up."""
    seen: list[BulkStatus] = []
    deadline = time.monotonic() + timeout
    handle = client.bulk(name=bulk_id)
    try:
        while True:
            try:
                status = handle.status()
            except Exception:  # noqa: BLE001 - the run may not exist yet
                status = None
            if status is not None:
                assert status.counts.adds_up(), status.counts
                seen.append(status)
                if until(status):
                    return seen
            assert time.monotonic() < deadline, f"timed out; last status {status}"
            time.sleep(0.1)
    finally:
        handle.close()


def image(base: str, index: int) -> str:
    return f"{base}/{NAMES[index % len(NAMES)]}"


def write_images(folder: Path, prefix: str, count: int, base: str) -> Path:
    """A manifest of ``count`` lines with custom ids ``<prefix><i>``, over the sample images."""
    manifest = folder / "manifest.jsonl"
    manifest.write_text("".join(json.dumps({"custom_id": f"{prefix}{i}", "image_url": image(base, i)}) + "\n" for i in range(count)))
    return manifest


def test_a_mixed_manifest_runs_with_counts_that_add_up_and_one_complete_results_file(
    env: dict[str, str], client: VQAClient, image_base_url: str, tmp_path: Path
) -> None:
    lines: list[str] = []
    expected: set[tuple[str, str]] = set()
    for i in range(40):
        if i % 4 == 0:  # several questions per image
            lines.append(json.dumps({"custom_id": f"photo-{i}", "image_url": image(image_base_url, i), "questions": ["Colour?", "Shape?"]}))
            expected |= {(f"photo-{i}", "Colour?"), (f"photo-{i}", "Shape?")}
        else:
            lines.append(json.dumps({"custom_id": f"photo-{i}", "image_url": image(image_base_url, i)}))
            expected.add((f"photo-{i}", QUESTION))
    lines.insert(10, "{not json")
    lines.insert(20, json.dumps({"custom_id": "photo-3", "image_url": image(image_base_url, 0)}))  # a duplicate id
    lines.insert(30, json.dumps({"custom_id": "bad-url", "image_url": "ftp://images.example/x.jpg"}))
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    out = tmp_path / "results.jsonl"

    proc = start_vqa(env, "submit", str(manifest), "--question", QUESTION, "--window", "16", "--out", str(out), "--interval", "0.5")
    assert proc.stdout is not None
    bulk_id = proc.stdout.readline().strip()
    seen = poll(client, bulk_id, lambda status: status.ended)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr

    # The counts moved while the run ran, and never added up wrong (poll checks each).
    assert len({status.counts.finished for status in seen}) >= 3
    assert max(status.counts.queued + status.counts.running for status in seen) <= 16
    final = seen[-1]
    assert final.state == "completed" and final.counts.total == len(expected) == final.counts.succeeded
    assert final.counts.invalid == 3 and final.usage.generated_tokens > 0 and final.usage.image_tokens > 0
    # Invalid lines on the terminal, with their line numbers; periodic summaries (not a terminal).
    assert "line 11: invalid, skipped: not JSON" in stderr and "line 21: invalid, skipped: duplicate custom_id 'photo-3'" in stderr
    assert "line 31: invalid, skipped:" in stderr and f"{bulk_id} completed: {len(expected)} published" in stderr
    results = read_results(out)
    assert {(line["custom_id"], line["question"]) for line in results} == expected and len(results) == len(expected)
    assert all(line["status"] == "succeeded" and line["answer"] is not None for line in results)

    status = json.loads(vqa(env, "status", bulk_id, "--json").stdout)
    assert status["state"] == "completed" and status["counts"]["invalid"] == 3
    s3 = boto3.client("s3", endpoint_url=env["VQA_S3_ENDPOINT_URL"])
    reports = s3.get_object(Bucket=env["VQA_S3_BUCKET"], Key=f"bulk/{bulk_id}/invalid.jsonl")["Body"].read().decode().splitlines()
    assert [json.loads(report)["line"] for report in reports] == [11, 21, 31]


def test_a_killed_submitter_resumes_without_computing_anything_twice(
    env: dict[str, str], client: VQAClient, image_base_url: str, tmp_path: Path
) -> None:
    manifest = write_images(tmp_path, "k", 120, image_base_url)
    command = ["submit", str(manifest), "--question", QUESTION, "--window", "16"]
    proc = start_vqa(env, *command)
    assert proc.stdout is not None
    bulk_id = proc.stdout.readline().strip()
    poll(client, bulk_id, lambda status: status.counts.total >= 32)
    proc.kill()  # SIGKILL: no cleanup of any kind
    proc.wait(timeout=10)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    proc.stderr.close()
    assert client.bulk(name=bulk_id).status().counts.total < 120

    out = tmp_path / "results.jsonl"
    again = vqa(env, *command, "--wait", "--out", str(out))
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines()[0] == bulk_id  # the same command is the same run
    results = read_results(out)
    assert sorted(line["custom_id"] for line in results) == sorted(f"k{i}" for i in range(120))
    broker = redis.Redis.from_url(env["VQA_BROKER_URL"])
    executions = broker.mget([keys.executions_key(line["job_id"]) for line in results])
    assert executions == [b"1"] * 120  # every job ran in the model exactly once
    assert client.bulk(name=bulk_id).status().counts.succeeded == 120
    broker.close()


def test_a_cancel_half_way_cancels_what_has_not_started(
    env: dict[str, str], client: VQAClient, worker: WorkerProcess, image_base_url: str, tmp_path: Path
) -> None:
    manifest = write_images(tmp_path, "c", 100, image_base_url)
    run = client.bulk(str(manifest), questions=[QUESTION], window=0)
    poll(client, run.bulk_id, lambda status: status.counts.succeeded >= 10)
    worker.signal(signal.SIGSTOP)  # so that jobs are certain to be queued and buffered at the cancel
    try:
        result = vqa(env, "cancel", run.bulk_id)
        assert result.returncode == 0, result.stderr
    finally:
        worker.signal(signal.SIGCONT)
    seen = poll(client, run.bulk_id, lambda status: status.ended)
    final = seen[-1]
    counts = final.counts
    assert final.state == "cancelled" and counts.total == 100
    assert counts.succeeded >= 10 and counts.cancelled >= 30 and counts.succeeded + counts.cancelled == 100
    by_status: dict[str, int] = {}
    for line in run.results():
        by_status[line["status"]] = by_status.get(line["status"], 0) + 1
        if line["status"] == "cancelled":
            assert line["error"]["code"] == "cancelled" and line["answer"] is None
    assert by_status == {"succeeded": counts.succeeded, "cancelled": counts.cancelled}
    run.close()


def test_jobs_not_started_by_the_expiry_end_as_expired(
    env: dict[str, str], client: VQAClient, worker: WorkerProcess, image_base_url: str, tmp_path: Path
) -> None:
    manifest = write_images(tmp_path, "e", 12, image_base_url)
    worker.signal(signal.SIGSTOP)
    try:
        run = client.bulk(str(manifest), questions=[QUESTION], expires_in="2s")
        run.join()
        time.sleep(2.5)
    finally:
        worker.signal(signal.SIGCONT)
    final = poll(client, run.bulk_id, lambda status: status.ended)[-1]
    assert final.state == "completed" and final.counts.expired == 12 and final.counts.total == 12
    assert {line["error"]["code"] for line in run.results()} == {"expired"}
    run.close()


def test_an_s3_prefix_is_a_manifest(env: dict[str, str], client: VQAClient, sample_images: dict[str, Path], tmp_path: Path) -> None:
    s3 = boto3.client("s3", endpoint_url=env["VQA_S3_ENDPOINT_URL"])
    bucket = env["VQA_S3_BUCKET"]
    for name, path in sample_images.items():
        s3.put_object(Bucket=bucket, Key=f"incoming/2026-11/{name}", Body=path.read_bytes())
    s3.put_object(Bucket=bucket, Key="incoming/2026-11/README.txt", Body=b"not an image")
    s3.put_object(Bucket=bucket, Key="incoming/2026-12/later.png", Body=sample_images["tiny.png"].read_bytes())
    out = tmp_path / "results.parquet"
    result = vqa(env, "submit", f"s3://{bucket}/incoming/2026-11/", "--question", QUESTION, "--wait", "--out", str(out), "--interval", "1")
    assert result.returncode == 0, result.stderr
    rows: list[dict[str, Any]] = read_results(out)
    assert sorted(row["custom_id"] for row in rows) == sorted(f"incoming/2026-11/{name}" for name in sample_images)
    assert all(row["status"] == "succeeded" and row["question"] == QUESTION for row in rows)
