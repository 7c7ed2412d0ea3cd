"""``VQAClient.wait`` finds a record that only S3 holds: a Redis failover can lose a finished job's backend state for good."""

from __future__ import annotations

import time

import boto3
import pytest

from producer import keys
from producer.client import VQAClient
from producer.schema import GenerationSettings, Job, utcnow
from producer.settings import Settings
from worker.dev.outcomes import record_for
from worker.dev.services import S3Server

pytestmark = pytest.mark.timeout(60)


def test_wait_without_a_timeout_returns_a_record_the_backend_never_got(redis_url: str, s3_server: S3Server, bucket: str) -> None:
    settings = Settings(broker_url=redis_url, result_backend=redis_url, s3_endpoint_url=s3_server.url, s3_bucket=bucket)
    job = Job(job_id="only-in-s3", image_url="https://images.example/1.jpg", question="What?", model="m",
              generation=GenerationSettings(max_new_tokens=4), submitted_at=utcnow())
    record = record_for(job)
    s3 = boto3.client("s3", endpoint_url=s3_server.url)
    s3.put_object(Bucket=bucket, Key=keys.result_key(settings.s3_prefix, job.job_id), Body=record.model_dump_json().encode())
    with VQAClient(settings) as client:
        started = time.monotonic()
        found = client.wait(job.job_id)  # no timeout: before, only a deadline made it look in S3
        assert found == record
        assert time.monotonic() - started < 10  # one look in S3 every 5 s
