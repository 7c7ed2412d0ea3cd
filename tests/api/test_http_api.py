"""``vqa api`` as a real process over loopback, on real Redis and the S3 API server (no worker: what gets enqueued).

One API process serves the module; Redis is flushed before each test (the ``redis_url`` fixture).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
import requests

from tests.api.conftest import IMAGE_BUCKET, TOKEN, queued
from worker.dev.services import ApiProcess, RedisServer, S3Server

MAX_BODY = 4096
RULES = [
    {"bucket": IMAGE_BUCKET, "prefix": "incoming/", "suffix": ".png", "questions": ["What is shown?", "What colour is it?"], "max_new_tokens": 4},
]
JOB = {"image_url": "https://images.example.com/cat.png", "question": "What animal is this?"}


@pytest.fixture(scope="module")
def api(redis_server: RedisServer, s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiProcess]:
    bucket = "vqa-api-results"
    s3 = boto3.client("s3", endpoint_url=s3_server.url)
    s3.create_bucket(Bucket=bucket)
    directory = tmp_path_factory.mktemp("api")
    rules = directory / "rules.json"
    rules.write_text(json.dumps(RULES))
    env = {
        "VQA_BROKER_URL": redis_server.url,
        "VQA_RESULT_BACKEND": redis_server.url,
        "VQA_S3_ENDPOINT_URL": s3_server.url,
        "VQA_S3_BUCKET": bucket,
        "VQA_API_TOKENS": f"other-token,{TOKEN}",
        "VQA_API_MAX_BODY_BYTES": str(MAX_BODY),
        "VQA_IMAGE_S3_BUCKETS": IMAGE_BUCKET,
        "VQA_INGEST_RULES": str(rules),
    }
    proc = ApiProcess(env=env, log_path=directory / "api.log").start()
    yield proc
    proc.stop()


@pytest.fixture()
def base(api: ApiProcess, redis_url: str) -> str:
    return api.url


def _problem(response: requests.Response, status: int) -> dict[str, object]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["status"] == status and body["title"] and body["detail"]
    return body


def test_only_healthz_answers_without_a_token(base: str, redis_url: str, api: ApiProcess) -> None:
    assert requests.get(f"{base}/healthz", timeout=5).json() == {"status": "ok"}
    calls = [
        ("POST", "/v1/jobs", {"json": JOB}),
        ("GET", "/v1/jobs/abc", {}),
        ("POST", "/v1/jobs/abc/cancel", {}),
        ("POST", "/v1/bulk", {"data": b'{"image_url": "https://x.example/a.png"}\n', "headers": {"Content-Type": "application/jsonl"}}),
        ("GET", "/v1/bulk/run-1", {}),
        ("POST", "/v1/events/s3", {"json": _minio("incoming/a.png")}),
        ("GET", "/openapi.json", {}),
    ]
    for method, path, options in calls:
        headers = dict(options.pop("headers", {}))
        for auth in (None, "Bearer wrong-token-123", "Basic dGVzdDp0ZXN0", f"Bearer {TOKEN}x", "Bearer "):
            sent = {**headers, **({"Authorization": auth} if auth else {})}
            response = requests.request(method, base + path, headers=sent, timeout=5, **options)
            _problem(response, 401)
            assert response.headers["www-authenticate"].startswith("Bearer")
    assert requests.head(f"{base}/v1/events/s3", timeout=5).status_code == 401
    assert queued(redis_url) == 0
    assert "wrong-token-123" not in api.log and TOKEN not in api.log


def test_submit_one_job_then_a_list(base: str, redis_url: str, http: requests.Session) -> None:
    response = http.post(f"{base}/v1/jobs", json=JOB, timeout=5)
    assert response.status_code == 202, response.text
    [job_id] = response.json()["job_ids"]
    assert response.headers["location"] == f"/v1/jobs/{job_id}"
    status = http.get(f"{base}/v1/jobs/{job_id}", timeout=5).json()
    assert status == {"job_id": job_id, "state": "PENDING", "record": None}
    many = http.post(f"{base}/v1/jobs?priority=high", json=[JOB, {**JOB, "question": "How many?", "max_new_tokens": 5}], timeout=5)
    assert many.status_code == 202
    ids = many.json()["job_ids"]
    assert ids[0] == job_id and len(set(ids)) == 2  # the same job again is the same id, not queued twice
    assert queued(redis_url) == 2
    # Less image detail is another job (another answer), queued beside the first.
    detail = http.post(f"{base}/v1/jobs", json={**JOB, "image_grid": "1X1"}, timeout=5)
    assert detail.status_code == 202, detail.text
    assert detail.json()["job_ids"][0] not in ids and queued(redis_url) == 3
    assert http.post(f"{base}/v1/jobs/{ids[1]}/cancel", timeout=5).json() == {"job_id": ids[1], "cancelled": True}


def test_invalid_jobs_have_the_cli_messages_and_enqueue_nothing(base: str, redis_url: str, http: requests.Session, tmp_path: Path) -> None:
    bad = {"image_url": "ftp://images.example.com/a.png", "question": "What?"}
    one = _problem(http.post(f"{base}/v1/jobs", json=bad, timeout=5), 422)
    # The CLI's own words for the same job (`vqa submit` exits 2 with them).
    cli = subprocess.run([sys.executable, "-m", "producer.cli", "submit", "--image", bad["image_url"], "--question", "What?"],
                         capture_output=True, text=True, timeout=60, env={**os.environ, "VQA_BROKER_URL": redis_url,
                                                                          "VQA_RESULT_BACKEND": redis_url})
    assert cli.returncode == 2
    assert cli.stderr.strip() == f"error: {one['detail']}"
    listed = _problem(http.post(f"{base}/v1/jobs", json=[JOB, bad, {"question": "no image"}], timeout=5), 422)
    assert "line 2: image_url" in str(listed["detail"]) and "line 3: missing fields: image_url" in str(listed["detail"])
    for body in ([], "a string", 7, [1], {**JOB, "expires_in": 1e300}, {**JOB, "generation": [1, 2]}, {**JOB, "surprise": 1}):
        _problem(http.post(f"{base}/v1/jobs", json=body, timeout=5), 422)
    grid = _problem(http.post(f"{base}/v1/jobs", json={**JOB, "image_grid": "2by1"}, timeout=5), 422)
    assert "image_grid" in str(grid["detail"]) and "image grid must be 'full' or RxC" in str(grid["detail"])
    _problem(http.get(f"{base}/v1/jobs/..%2F..%2Fetc", timeout=5), 404)
    _problem(http.post(f"{base}/v1/jobs?priority=urgent", json=JOB, timeout=5), 422)
    assert queued(redis_url) == 0


def test_malformed_json_is_400_never_500(base: str, redis_url: str, http: requests.Session) -> None:
    for body in (b"{", b'{"image_url": ', b"\xff\xfe", b"[" * 3000, b"", b"null garbage"):
        for path in ("/v1/jobs", "/v1/events/s3"):
            response = http.post(base + path, data=body, headers={"Content-Type": "application/json"}, timeout=5)
            assert response.status_code in (400, 422), (path, body[:20], response.text)
            _problem(response, response.status_code)
    assert queued(redis_url) == 0


def test_oversized_bodies_are_413_while_reading(base: str, redis_url: str, http: requests.Session) -> None:
    big = {**JOB, "question": "x" * (MAX_BODY * 2)}
    _problem(http.post(f"{base}/v1/jobs", json=big, timeout=5), 413)

    def endless() -> Iterator[bytes]:  # chunked, no Content-Length: refused after the cap, not at the end
        yield b'[{"image_url": "https://images.example.com/a.png", "question": "'
        for _ in range(10_000):
            yield b"y" * 1024

    _problem(http.post(f"{base}/v1/jobs", data=endless(), headers={"Content-Type": "application/json"}, timeout=10), 413)
    _problem(http.post(f"{base}/v1/events/s3", data=endless(), headers={"Content-Type": "application/json"}, timeout=10), 413)
    assert queued(redis_url) == 0
    assert http.post(f"{base}/v1/jobs", json=JOB, timeout=5).status_code == 202  # still serving


def test_idempotency_key_same_body_same_job_other_body_422(base: str, redis_url: str, http: requests.Session) -> None:
    first = http.post(f"{base}/v1/jobs", json=JOB, headers={"Idempotency-Key": "order-42"}, timeout=5)
    again = http.post(f"{base}/v1/jobs", json=JOB, headers={"Idempotency-Key": "order-42"}, timeout=5)
    assert first.status_code == again.status_code == 202
    assert first.json() == again.json()
    assert queued(redis_url) == 1
    other = http.post(f"{base}/v1/jobs", json={**JOB, "question": "Another?"}, headers={"Idempotency-Key": "order-42"}, timeout=5)
    assert _problem(other, 422)["code"] == "idempotency_key_reused"
    # Without the key the same content is the content-hash job: another id than the keyed one.
    plain = http.post(f"{base}/v1/jobs", json=JOB, timeout=5).json()["job_ids"]
    assert plain != first.json()["job_ids"]
    assert queued(redis_url) == 2


def _minio(key: str, *, event: str = "s3:ObjectCreated:Put", etag: str = "0123abcd", bucket: str = IMAGE_BUCKET) -> dict[str, object]:
    """What MinIO's webhook target POSTs (one record; the key URL-encoded, '+' for spaces)."""
    encoded = urllib.parse.quote_plus(key, safe="/")
    return {
        "EventName": event,
        "Key": f"{bucket}/{encoded}",
        "Records": [{
            "eventVersion": "2.0", "eventSource": "minio:s3", "awsRegion": "", "eventTime": "2026-12-02T05:00:00.000Z",
            "eventName": event, "userIdentity": {"principalId": "minioadmin"},
            "requestParameters": {"sourceIPAddress": "127.0.0.1"}, "responseElements": {"x-amz-request-id": "17F0"},
            "s3": {"s3SchemaVersion": "1.0", "configurationId": "Config",
                   "bucket": {"name": bucket, "ownerIdentity": {"principalId": "minioadmin"}, "arn": f"arn:aws:s3:::{bucket}"},
                   "object": {"key": encoded, "size": 1234, "eTag": etag, "contentType": "image/png", "sequencer": "17F0"}},
            "source": {"host": "127.0.0.1", "port": "", "userAgent": "MinIO (linux; amd64)"},
        }],
    }


def _aws(key: str, *, version: str = "v1") -> dict[str, object]:
    """An AWS S3 event message (eventSource aws:s3, eventName without the s3: prefix)."""
    encoded = urllib.parse.quote_plus(key, safe="/")
    return {"Records": [{
        "eventVersion": "2.1", "eventSource": "aws:s3", "awsRegion": "us-east-1", "eventTime": "2026-12-02T05:00:00.000Z",
        "eventName": "ObjectCreated:Put", "userIdentity": {"principalId": "AWS:AIDA"},
        "s3": {"s3SchemaVersion": "1.0", "configurationId": "vqa", "bucket": {"name": IMAGE_BUCKET, "arn": f"arn:aws:s3:::{IMAGE_BUCKET}"},
               "object": {"key": encoded, "size": 1234, "eTag": "d41d8cd9", "versionId": version, "sequencer": "0A1B"}},
    }]}


def test_notifications_become_jobs_once(base: str, redis_url: str, http: requests.Session) -> None:
    assert http.head(f"{base}/v1/events/s3", timeout=5).status_code == 200  # MinIO's liveness probe
    minio = http.post(f"{base}/v1/events/s3", json=_minio("incoming/my cat.png"), timeout=5)
    assert minio.status_code == 200, minio.text
    body = minio.json()
    assert len(body["job_ids"]) == 2 and body["objects"] == 1  # one job per question of the rule
    assert queued(redis_url) == 2
    replay = http.post(f"{base}/v1/events/s3", json=_minio("incoming/my cat.png"), timeout=5).json()
    assert replay["job_ids"] == body["job_ids"] and queued(redis_url) == 2  # MinIO's queue replays: no new work
    rewritten = http.post(f"{base}/v1/events/s3", json=_minio("incoming/my cat.png", etag="ffff0000"), timeout=5).json()
    assert set(rewritten["job_ids"]).isdisjoint(body["job_ids"])  # a new version of the object is new work
    aws = http.post(f"{base}/v1/events/s3", json=_aws("incoming/dog.png"), timeout=5).json()
    assert len(aws["job_ids"]) == 2
    assert http.post(f"{base}/v1/events/s3", json=_aws("incoming/dog.png"), timeout=5).json()["job_ids"] == aws["job_ids"]
    assert queued(redis_url) == 6
    for ignored in (_minio("incoming/my cat.png", event="s3:ObjectRemoved:Delete"), _minio("other/x.png"), _minio("incoming/x.jpg"),
                    _minio("incoming/x.png", bucket="some-other-bucket"), {"Service": "Amazon S3", "Event": "s3:TestEvent"}):
        response = http.post(f"{base}/v1/events/s3", json=ignored, timeout=5)
        assert response.status_code == 200 and response.json()["job_ids"] == [], response.text
    assert queued(redis_url) == 6
    _problem(http.post(f"{base}/v1/events/s3", json={"Records": "nope"}, timeout=5), 422)


def test_bulk_run_from_a_body(base: str, redis_url: str, http: requests.Session) -> None:
    manifest = b"".join(f'{{"custom_id": "row-{n}", "image_url": "https://images.example.com/{n}.png"}}\n'.encode() for n in range(3))
    response = http.post(f"{base}/v1/bulk?questions=What%20is%20shown%3F&window=0", data=manifest,
                         headers={"Content-Type": "application/jsonl"}, timeout=10)
    assert response.status_code == 202, response.text
    bulk_id = response.json()["bulk_id"]
    assert response.headers["location"] == f"/v1/bulk/{bulk_id}"
    status = http.get(f"{base}/v1/bulk/{bulk_id}", timeout=5).json()
    assert status["bulk_id"] == bulk_id and status["state"] == "in_progress"
    results = http.get(f"{base}/v1/bulk/{bulk_id}/results", timeout=5)
    assert results.status_code == 200 and results.headers["content-type"].startswith("application/jsonl")
    assert results.text == ""  # nothing finished: no worker runs here
    cancelled = http.post(f"{base}/v1/bulk/{bulk_id}/cancel", timeout=5).json()
    assert cancelled["state"] in ("cancelling", "cancelled")  # queued jobs end as cancelled records once a worker sees them
    _problem(http.get(f"{base}/v1/bulk/no-such-run", timeout=5), 404)
    _problem(http.post(f"{base}/v1/bulk", json={"source": "https://x.example/m.jsonl"}, timeout=5), 422)
    _problem(http.post(f"{base}/v1/bulk", data=b"x", headers={"Content-Type": "image/png"}, timeout=5), 415)


def test_the_api_imports_no_torch() -> None:
    code = "import sys; import producer.api.app, producer.api.server; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
