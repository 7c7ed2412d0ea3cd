"""End to end on real parts: client → redis-server → `vqa worker` process → moto S3 server + result backend."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import boto3
import pytest
import redis
from PIL import Image

from producer import keys
from producer.client import VQAClient
from producer.errors import JobFailed
from producer.schema import GenerationSettings
from producer.settings import Settings
from worker.broker import held_messages
from worker.dev.services import WorkerProcess, free_port
from tests.support.images import SIZES

pytestmark = pytest.mark.slow


def _s3_json(env: dict[str, str], key: str) -> dict:
    s3 = boto3.client("s3", endpoint_url=env["VQA_S3_ENDPOINT_URL"])
    return json.loads(s3.get_object(Bucket=env["VQA_S3_BUCKET"], Key=key)["Body"].read())


def test_mixed_batch_every_job_gets_its_own_outcome(
    stack_env: dict[str, str],
    image_base_url: str,
    client_for: Callable[[dict[str, str]], VQAClient],
    start_worker: Callable[..., WorkerProcess],
) -> None:
    dead_port = free_port()  # nothing listens here: the fetch is refused
    env = {**stack_env, "VQA_ALLOWED_HOSTS": "127.0.0.1", "VQA_MAX_ATTEMPTS": "2"}
    client = client_for(env)
    names = sorted(SIZES)
    good = [client.submit(f"{image_base_url}/{names[i % len(names)]}", f"Question {i}: what is shown?") for i in range(12)]
    bad = client.submit(f"http://127.0.0.1:{dead_port}/missing.png", "What is shown?")
    assert len(set(good)) == 12

    start_worker(env)
    records = {job_id: client.wait(job_id, timeout=180) for job_id in [*good, bad]}

    for job_id in good:
        record = records[job_id]
        assert record.status == "succeeded", record.error
        assert isinstance(record.answer, str) and record.answer
        stored = _s3_json(env, keys.result_key("", job_id))
        assert stored["answer"] == record.answer and stored["job_id"] == job_id
        assert client.status(job_id) == "SUCCESS"
        assert record.executions == 1
    failed = records[bad]
    assert failed.status == "failed" and failed.answer is None
    assert failed.error is not None and failed.error.code == "connection_failed" and failed.error.retryable
    assert failed.attempts == 2
    assert _s3_json(env, keys.failed_key("", bad))["error"]["code"] == "connection_failed"
    assert client.status(bad) == "FAILURE"
    # Micro-batches actually formed.
    assert max(records[job_id].batch_size for job_id in good) > 1


def test_resubmitting_a_finished_job_returns_same_id_without_recomputing(
    stack_env: dict[str, str],
    image_base_url: str,
    client_for: Callable[[dict[str, str]], VQAClient],
    start_worker: Callable[..., WorkerProcess],
) -> None:
    client = client_for(stack_env)
    url = f"{image_base_url}/wide.jpg"
    job_id = client.submit(url, "What colour is the box?")
    start_worker(stack_env)
    first = client.wait(job_id, timeout=120)
    assert first.status == "succeeded"

    again = client.submit(url, "What colour is the box?")
    keyed = client.submit(url, "What colour is the box?", idempotency_key="order-17")
    keyed_again = client.submit(f"{image_base_url}/tall.png", "Another question", idempotency_key="order-17")
    assert again == job_id
    assert keyed == keyed_again != job_id

    broker = redis.Redis.from_url(stack_env["VQA_BROKER_URL"])
    # Nothing new was queued for the finished job, and the model ran once for it.
    assert client.wait(keyed, timeout=120).status == "succeeded"
    assert int(broker.get(keys.executions_key(job_id))) == 1
    assert client.result(job_id) == first


def test_cli_submit_wait_status_result(
    stack_env: dict[str, str],
    image_base_url: str,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, **stack_env}
    vqa = [sys.executable, "-m", "producer.cli"]
    start_worker(stack_env)
    done = subprocess.run(
        [*vqa, "submit", "--image", f"{image_base_url}/small.png", "--question", "What is it?", "--wait", "--timeout", "120"],
        env=env, capture_output=True, text=True, timeout=180,
    )
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    assert record["status"] == "succeeded" and record["answer"]
    status = subprocess.run([*vqa, "status", record["job_id"]], env=env, capture_output=True, text=True, timeout=60)
    assert status.stdout.strip() == "SUCCESS"
    result = subprocess.run([*vqa, "result", record["job_id"]], env=env, capture_output=True, text=True, timeout=60)
    assert json.loads(result.stdout)["answer"] == record["answer"]
    invalid = subprocess.run([*vqa, "submit", "--image", "file:///etc/passwd", "--question", "x"], env=env, capture_output=True, text=True, timeout=60)
    assert invalid.returncode == 2 and "scheme" in invalid.stderr


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_answers_in_s3_equal_direct_generate_whatever_the_batch(
    quantization: str,
    stack_env: dict[str, str],
    image_base_url: str,
    sample_images: dict[str, Path],
    client_for: Callable[[dict[str, str]], VQAClient],
    settings_for: Callable[[dict[str, str]], Settings],
    start_worker: Callable[..., WorkerProcess],
) -> None:
    """Fidelity: greedy answers do not depend on batch size or batch companions."""
    from worker.model import VQAModel

    env = {**stack_env, "VQA_QUANTIZATION": quantization, "VQA_MAX_BATCH_SIZE": "6", "VQA_MAX_BATCH_DELAY_MS": "1500"}
    client = client_for(env)
    names = sorted(sample_images)
    jobs = [(name, f"Describe picture {i}.") for i, name in enumerate(names)]
    ids = [client.submit(f"{image_base_url}/{name}", question) for name, question in jobs]
    start_worker(env)
    records = [client.wait(job_id, timeout=180) for job_id in ids]
    assert max(record.batch_size for record in records) > 1

    model = VQAModel.load(settings_for(env))
    if quantization == "nf4":
        assert model.count_4bit_linears() > 0
    generation = GenerationSettings(max_new_tokens=int(env["VQA_MAX_NEW_TOKENS"]))
    for (name, question), record in zip(jobs, records, strict=True):
        image = Image.open(sample_images[name]).convert("RGB")
        [direct] = model.generate([image], [question], generation)
        assert record.status == "succeeded"
        assert record.answer == direct, f"{name}: batch answer {record.answer!r} != direct {direct!r}"


def test_an_unreadable_stored_record_fails_its_job_alone_and_is_kept(
    stack_env: dict[str, str],
    image_base_url: str,
    client_for: Callable[[dict[str, str]], VQAClient],
    start_worker: Callable[..., WorkerProcess],
) -> None:
    """Half a JSON object at results/<id>.json: a failed record says why, the object stays, the companions are answered."""
    client = client_for(stack_env)
    names = sorted(SIZES)
    ids = [client.submit(f"{image_base_url}/{names[i % len(names)]}", f"Question {i}: what is shown?") for i in range(8)]
    s3 = boto3.client("s3", endpoint_url=stack_env["VQA_S3_ENDPOINT_URL"])
    half = b'{"job_id": "' + ids[0].encode() + b'", "status": "succee'
    s3.put_object(Bucket=stack_env["VQA_S3_BUCKET"], Key=keys.result_key("", ids[0]), Body=half)

    worker = start_worker(stack_env)
    records = {job_id: client.wait(job_id, timeout=90) for job_id in ids}

    broken = records[ids[0]]
    assert broken.status == "failed" and broken.error is not None and broken.error.code == "corrupt_record"
    assert f"results/{ids[0]}.json" in broken.error.message and not broken.error.retryable
    assert all(records[job_id].status == "succeeded" for job_id in ids[1:])
    assert s3.get_object(Bucket=stack_env["VQA_S3_BUCKET"], Key=keys.result_key("", ids[0]))["Body"].read() == half
    assert _s3_json(stack_env, keys.failed_key("", ids[0]))["error"]["code"] == "corrupt_record"
    # The client reads past the unreadable object to the record that explains it.
    assert client.result(ids[0]) == broken
    # Acked: nothing of the job is left unacknowledged or queued.
    broker = redis.Redis.from_url(stack_env["VQA_BROKER_URL"])
    assert not held_messages(broker, "vqa") and sum(broker.llen(key) for key in keys.priority_queue_keys("vqa")) == 0
    broker.close()
    assert "Traceback" not in worker.log


def test_cancelled_and_expired_jobs_end_without_running_and_a_resubmission_runs(
    stack_env: dict[str, str],
    image_base_url: str,
    client_for: Callable[[dict[str, str]], VQAClient],
    start_worker: Callable[..., WorkerProcess],
) -> None:
    """Cancelled while queued (no worker running yet), expired by its own deadline and by Celery's expires header."""
    client = client_for(stack_env)
    url = f"{image_base_url}/wide.jpg"
    normal = client.submit(url, "What is shown?")
    cancelled = client.submit(url, "Cancel me?")
    expired = client.submit(url, "Too late?", expires_in=0.01)
    job = client.build_job(url, "Expired by Celery?")
    celery_expired = client.app.send_task(
        keys.TASK_NAME, kwargs={"job": job.model_dump(mode="json")}, task_id=job.job_id, queue="vqa",
        expires=datetime.now(UTC) - timedelta(minutes=1),
    ).id
    client.cancel(cancelled)  # nothing runs: the cancel is kept in Redis for the workers to come

    start_worker(stack_env)
    records = {job_id: client.wait(job_id, timeout=90) for job_id in (normal, cancelled, expired, celery_expired)}
    assert records[normal].status == "succeeded" and records[normal].usage is not None
    assert records[normal].usage.image_tokens > 0 and records[normal].usage.prompt_tokens > records[normal].usage.image_tokens
    for job_id, code in ((cancelled, "cancelled"), (expired, "expired"), (celery_expired, "expired")):
        record = records[job_id]
        assert record.status == "failed" and record.error is not None and record.error.code == code, (code, record.error)
        assert record.executions == 0 and record.usage is None and record.answer is None
        assert client.status(job_id) == "REVOKED"
        assert _s3_json(stack_env, keys.failed_key("", job_id))["error"]["code"] == code
    with pytest.raises(JobFailed):  # Celery's own client: a revoked task raises its failure
        client.app.AsyncResult(cancelled).get(timeout=5)

    again = client.submit(url, "Cancel me?")  # asked again after the cancel: it runs
    assert again == cancelled
    assert client.wait(again, timeout=60).status == "succeeded"
