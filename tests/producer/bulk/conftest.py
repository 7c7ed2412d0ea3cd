"""Fixtures for bulk runs: a client on this test's Redis and bucket, manifests, and the worker's bulk hook without a model."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import redis

from producer.client import VQAClient
from worker.bulkruns import BulkRuns
from worker.dev.services import S3Server


@pytest.fixture()
def bulk_env(redis_url: str, s3_server: S3Server, bucket: str) -> dict[str, str]:
    return {
        "VQA_BROKER_URL": redis_url,
        "VQA_RESULT_BACKEND": redis_url,
        "VQA_S3_ENDPOINT_URL": s3_server.url,
        "VQA_S3_BUCKET": bucket,
        "VQA_BULK_SEGMENT_JOBS": "10",
        "VQA_BULK_STATUS_INTERVAL_S": "0.2",
    }


@pytest.fixture()
def bulk_client(bulk_env: dict[str, str], client_for: Callable[[dict[str, str]], VQAClient]) -> VQAClient:
    return client_for(bulk_env)


@pytest.fixture()
def broker(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture()
def s3(bulk_env: dict[str, str]) -> Any:
    return boto3.client("s3", endpoint_url=bulk_env["VQA_S3_ENDPOINT_URL"])


@pytest.fixture()
def hook(bulk_client: VQAClient, broker: redis.Redis) -> BulkRuns:
    """The worker's bulk hook, as worker/main.py wires it (same Redis, same bucket)."""
    return BulkRuns(client=broker, s3_client=bulk_client.s3_client(), settings=bulk_client.settings)


@pytest.fixture()
def write_manifest(tmp_path: Path) -> Callable[..., Path]:
    """``write_manifest(lines, name=...)``: dicts become JSON lines, strings are written as they are."""

    def write(lines: list[dict[str, Any] | str], name: str = "manifest.jsonl") -> Path:
        path = tmp_path / name
        path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
        return path

    return write


def image_lines(count: int, *, start: int = 0) -> list[dict[str, Any]]:
    return [{"custom_id": f"img-{i}", "image_url": f"https://images.example/{i}.jpg"} for i in range(start, start + count)]


