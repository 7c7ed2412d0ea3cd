"""Over HTTP to a real worker: ``vqa api`` and ``vqa worker`` processes, real Redis, the S3 API server, the tiny model."""

from __future__ import annotations

import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path

import boto3
import pytest
import redis
import requests

from producer import keys
from tests.api.conftest import IMAGE_BUCKET
from worker.dev.services import ApiProcess, WorkerProcess

pytestmark = pytest.mark.slow


def _poll(http: requests.Session, url: str, timeout: float = 90.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = http.get(url, timeout=5).json()
        if status["record"] is not None:
            return status
        time.sleep(0.2)
    raise AssertionError(f"{url} did not finish in {timeout} s")


def test_submit_over_http_and_a_bucket_notification_run_to_completion(
    stack_env: dict[str, str],
    start_worker: Callable[..., WorkerProcess],
    start_api: Callable[..., ApiProcess],
    http: requests.Session,
    sample_images: dict[str, Path],
    image_base_url: str,
) -> None:
    s3 = boto3.client("s3", endpoint_url=stack_env["VQA_S3_ENDPOINT_URL"])
    if IMAGE_BUCKET not in {found["Name"] for found in s3.list_buckets()["Buckets"]}:  # the S3 server lives for the session
        s3.create_bucket(Bucket=IMAGE_BUCKET)
    image_name = next(iter(sample_images))
    key = "incoming/a photo of it.png"  # a space: MinIO sends it as '+'
    s3.put_object(Bucket=IMAGE_BUCKET, Key=key, Body=sample_images[image_name].read_bytes())
    env = {**stack_env, "VQA_IMAGE_S3_BUCKETS": IMAGE_BUCKET}
    rules = [{"bucket": IMAGE_BUCKET, "prefix": "incoming/", "questions": ["What is shown?"], "max_new_tokens": 4}]
    start_worker(env)
    api = start_api(env, rules=rules)

    submitted = http.post(f"{api.url}/v1/jobs", json={"image_url": f"{image_base_url}/{image_name}", "question": "What is it?"}, timeout=5)
    assert submitted.status_code == 202
    done = _poll(http, api.url + submitted.headers["location"])
    assert done["state"] == "SUCCESS"
    record = done["record"]
    assert isinstance(record, dict) and record["status"] == "succeeded" and record["job_id"] == submitted.json()["job_ids"][0]

    encoded = urllib.parse.quote_plus(key, safe="/")
    notification = {"EventName": "s3:ObjectCreated:Put", "Key": f"{IMAGE_BUCKET}/{encoded}", "Records": [{
        "eventVersion": "2.0", "eventSource": "minio:s3", "eventName": "s3:ObjectCreated:Put",
        "s3": {"bucket": {"name": IMAGE_BUCKET}, "object": {"key": encoded, "eTag": "e1", "size": 10}}}]}
    [job_id] = http.post(f"{api.url}/v1/events/s3", json=notification, timeout=5).json()["job_ids"]
    ingested = _poll(http, f"{api.url}/v1/jobs/{job_id}")
    assert ingested["state"] == "SUCCESS", ingested
    # A replay after the job finished: the same job, answered from its record, not run again.
    assert http.post(f"{api.url}/v1/events/s3", json=notification, timeout=5).json()["job_ids"] == [job_id]
    time.sleep(1.0)
    client = redis.Redis.from_url(stack_env["VQA_BROKER_URL"])
    try:
        assert int(client.get(keys.executions_key(job_id)) or 0) == 1
    finally:
        client.close()
