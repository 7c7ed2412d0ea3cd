"""Secrets stay secret: a Redis password (over TLS) and an AWS secret key, through a worker's life.

The worker talks to a password-protected redis-server over ``rediss://`` only, with a
distinctive AWS secret in its environment. It answers good jobs, fails jobs with network,
S3 and SSRF errors, rides out a Redis restart and an S3 outage; the CLI fails on a wrong
password. Then every place text ends up is searched for the secrets: the worker log, every
record in S3 and in the result backend, every value in Redis, CLI output and exception
messages. Zero hits.
"""

from __future__ import annotations

import datetime
import gc
import ipaddress
import json
import signal
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from typer.testing import CliRunner

from producer.cli import app
from producer.client import VQAClient
from producer.errors import VQAError
from tests.security.conftest import wait_all
from tests.support.abusive_http import wait_until
from worker.dev.services import RedisServer, WorkerProcess, free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

PASSWORD = f"redispw{uuid.uuid4().hex}"
WRONG_PASSWORD = f"wrongpw{uuid.uuid4().hex}"
AWS_SECRET = f"awssecret{uuid.uuid4().hex}"
SECRETS = (PASSWORD, WRONG_PASSWORD, AWS_SECRET)


def _tls_files(directory: Path) -> tuple[str, str]:
    """A self-signed server certificate for localhost and 127.0.0.1 (it is its own CA)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "redis.pem", directory / "redis.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return str(cert_path), str(key_path)


@pytest.fixture()
def tls_redis(tmp_path: Path) -> Iterator[tuple[RedisServer, str]]:
    """A redis-server with a password, TLS on its own port; yields it and its rediss:// URL."""
    cert, key = _tls_files(tmp_path)
    tls_port = free_port()
    server = RedisServer(
        password=PASSWORD,
        extra_args=("--tls-port", str(tls_port), "--tls-cert-file", cert, "--tls-key-file", key,
                    "--tls-ca-cert-file", cert, "--tls-auth-clients", "no"),
    ).start()
    yield server, f"rediss://:{PASSWORD}@localhost:{tls_port}/0?ssl_cert_reqs=required&ssl_ca_certs={cert}"
    gc.collect()  # the clients' AsyncResults unsubscribe while this Redis still answers
    server.cleanup()


def _redis_dump(url: str) -> str:
    client = redis.Redis.from_url(url)
    parts = []
    for key in client.scan_iter():
        kind = client.type(key)
        if kind == b"string":
            value: Any = client.get(key)
        elif kind == b"list":
            value = client.lrange(key, 0, -1)
        elif kind == b"hash":
            value = client.hgetall(key)
        elif kind == b"zset":
            value = client.zrange(key, 0, -1)
        else:
            value = client.smembers(key) if kind == b"set" else b""
        parts.append(f"{key!r} {value!r}")
    client.close()
    return "\n".join(parts)


def _s3_dump(env: dict[str, str]) -> str:
    s3 = boto3.client("s3", endpoint_url=env["VQA_S3_ENDPOINT_URL"])
    listing = s3.list_objects_v2(Bucket=env["VQA_S3_BUCKET"]).get("Contents", [])
    return "\n".join(s3.get_object(Bucket=env["VQA_S3_BUCKET"], Key=item["Key"])["Body"].read().decode() for item in listing)


def test_no_secret_in_logs_records_or_errors(
    tls_redis: tuple[RedisServer, str],
    stack_env: dict[str, str],
    image_base_url: str,
    client_for: Callable[[dict[str, str]], VQAClient],
    start_worker: Callable[..., WorkerProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server, url = tls_redis
    dead_port = free_port()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)  # moto takes any secret; so do the clients
    env = {
        **stack_env,
        "VQA_BROKER_URL": url,
        "VQA_RESULT_BACKEND": url,
        "AWS_SECRET_ACCESS_KEY": AWS_SECRET,
        "VQA_ALLOWED_HOSTS": f"{stack_env['VQA_ALLOWED_HOSTS']},127.0.0.1:{dead_port}",
        "VQA_IMAGE_S3_BUCKETS": f"{stack_env['VQA_S3_BUCKET']},vqa-no-such-bucket",
        "VQA_MAX_ATTEMPTS": "1",
    }
    # Plain-text Redis on the TLS port is refused: the URL really is TLS.
    with pytest.raises(redis.ConnectionError):
        redis.Redis(host="127.0.0.1", port=int(url.split(":")[3].split("/")[0]), password=PASSWORD, socket_timeout=2).ping()

    client = client_for(env)
    worker = start_worker(env)
    bucket = env["VQA_S3_BUCKET"]
    failing = {
        f"http://127.0.0.1:{dead_port}/refused.png": "connection_failed",
        f"s3://{bucket}/no/such/key.png": "http_status",
        "s3://vqa-no-such-bucket/key.png": "http_status",
        "http://169.254.169.254/latest/meta-data/iam/security-credentials/": "blocked_address",
    }
    ids = client.submit_many(
        [{"image_url": f"{image_base_url}/small.png", "question": "Good?"}, {"image_url": f"{image_base_url}/tall.png", "question": "Good?"}]
        + [{"image_url": image_url, "question": "Bad?"} for image_url in failing]
    )
    records = wait_all(client, ids)
    assert [records[job_id].status for job_id in ids[:2]] == ["succeeded", "succeeded"]
    assert [records[job_id].error.code for job_id in ids[2:]] == list(failing.values())  # type: ignore[union-attr]

    # A Redis restart: every client reconnects and logs about it.
    server.restart(down_s=1.0)
    after_restart = client.submit(f"{image_base_url}/tiny.png", "After the restart?")
    assert client.wait(after_restart, timeout=90).status == "succeeded"

    texts = {"records in S3": _s3_dump(env), "Redis": _redis_dump(url), "settings repr": f"{client.settings!r} {client.settings}"}

    # The CLI: a record, and a wrong password.
    runner = CliRunner()
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    shown = runner.invoke(app, ["result", ids[2]])
    assert shown.exit_code == 1 and json.loads(shown.stdout)["error"]["code"] == "connection_failed"
    texts["vqa result"] = shown.output
    wrong = url.replace(PASSWORD, WRONG_PASSWORD)
    monkeypatch.setenv("VQA_BROKER_URL", wrong)
    monkeypatch.setenv("VQA_RESULT_BACKEND", wrong)
    refused = runner.invoke(app, ["submit", "--image", f"{image_base_url}/small.png", "--question", "Wrong password?"])
    assert refused.exit_code == 1 and refused.stderr.startswith("error: ")
    texts["vqa submit, wrong password"] = refused.output
    with VQAClient(client.settings.model_copy(update={"broker_url": wrong, "result_backend": wrong})) as intruder:
        with pytest.raises(VQAError) as caught:
            intruder.submit(f"{image_base_url}/small.png", "Wrong password?")
    texts["exception, wrong password"] = f"{caught.value!r} {caught.value.__cause__!r}"

    # S3 goes away: the worker logs its storage errors while it retries.
    s3 = boto3.client("s3", endpoint_url=env["VQA_S3_ENDPOINT_URL"])
    for item in s3.list_objects_v2(Bucket=bucket).get("Contents", []):
        s3.delete_object(Bucket=bucket, Key=item["Key"])
    s3.delete_bucket(Bucket=bucket)
    client.submit(f"{image_base_url}/wide.jpg", "During the S3 outage?")
    assert wait_until(lambda: "storing job" in worker.log, timeout=60), worker.log[-2000:]
    worker.signal(signal.SIGTERM)
    worker.wait(timeout=60)
    texts["worker log"] = worker.log
    assert "NoSuchBucket" in texts["worker log"]

    for where, text in texts.items():
        for secret in SECRETS:
            assert secret not in text, f"a secret leaked into {where}"
