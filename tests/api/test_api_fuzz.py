"""Schemathesis against ``vqa api``'s own OpenAPI schema: whatever it sends, the API answers without a server error.

The API runs as a real process on real Redis and the S3 API server; the schema is loaded over
HTTP with the bearer token. Examples per operation are few, so the run takes seconds.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from tests.api.conftest import IMAGE_BUCKET, TOKEN
from worker.dev.services import ApiProcess, RedisServer, S3Server

AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def fuzzed_api(redis_server: RedisServer, s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiProcess]:
    directory = tmp_path_factory.mktemp("fuzz")
    boto3.client("s3", endpoint_url=s3_server.url).create_bucket(Bucket="vqa-fuzz")
    rules = directory / "rules.json"
    rules.write_text(f'[{{"bucket": "{IMAGE_BUCKET}", "questions": ["What is shown?"]}}]')
    env = {
        "VQA_BROKER_URL": redis_server.url,
        "VQA_RESULT_BACKEND": redis_server.url,
        "VQA_S3_ENDPOINT_URL": s3_server.url,
        "VQA_S3_BUCKET": "vqa-fuzz",
        "VQA_API_TOKENS": TOKEN,
        "VQA_API_MAX_BODY_BYTES": "65536",
        "VQA_IMAGE_S3_BUCKETS": IMAGE_BUCKET,
        "VQA_INGEST_RULES": str(rules),
    }
    proc = ApiProcess(env=env, log_path=Path(directory) / "api.log").start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def api_schema(fuzzed_api: ApiProcess) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{fuzzed_api.url}/openapi.json", headers=AUTH, timeout=10)


def test_no_server_errors(api_schema: schemathesis.BaseSchema, fuzzed_api: ApiProcess) -> None:
    # Operation by operation with Hypothesis directly (schemathesis.pytest.from_fixture does not run on this pytest).
    tried = 0
    for result in api_schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def fuzz(case: schemathesis.Case) -> None:
            case.call_and_validate(base_url=fuzzed_api.url, headers=AUTH, checks=[not_a_server_error], timeout=10)

        fuzz()
        tried += 1
    assert tried == 10  # every operation of the schema (the HEAD probe included)
    assert "Traceback" not in fuzzed_api.log


def test_schema_lists_every_endpoint(api_schema: schemathesis.BaseSchema) -> None:
    paths = set(api_schema.raw_schema["paths"])
    assert paths == {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/cancel", "/v1/bulk", "/v1/bulk/{bulk_id}",
                     "/v1/bulk/{bulk_id}/results", "/v1/bulk/{bulk_id}/cancel", "/v1/events/s3", "/healthz"}
