"""Optional message signing: Celery's ``auth`` serializer end to end.

Producers with ``VQA_SECURITY_KEY`` + ``VQA_SECURITY_CERTIFICATE`` sign every task message;
a worker with ``VQA_SECURITY_CERT_STORE`` then accepts only messages signed by a certificate
in that store. Unsigned JSON, a stranger's signature, a tampered body, and a valid signature
with the (unsigned) inner content type switched to pickle are all refused with a reason.
"""

from __future__ import annotations

import base64
import datetime
import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery.security.certificate import Certificate
from celery.security.key import PrivateKey
from celery.security.serialization import SecureSerializer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from kombu.serialization import registry

from producer.messages import TaskMessages
from producer.client import VQAClient
from producer.errors import InvalidJob
from producer.settings import Settings
from tests.security.conftest import wait_all
from tests.support.abusive_http import wait_until
from worker.dev.services import WorkerProcess
from worker.intake import SignatureVerifier

pytestmark = pytest.mark.timeout(180)


def write_identity(directory: Path, name: str, *, days: int = 1) -> tuple[Path, Path]:
    """An RSA key and a self-signed certificate (Celery signs with RSA only); returns (key, cert)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=2))
        .not_valid_after(now + datetime.timedelta(days=days))
        .sign(key, hashes.SHA256())
    )
    key_path, cert_path = directory / f"{name}.key", directory / f"{name}.pem"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


@pytest.fixture()
def identities(tmp_path: Path) -> dict[str, Any]:
    store = tmp_path / "trusted"
    store.mkdir()
    producer_key, producer_cert = write_identity(tmp_path, "producer")
    (store / "producer.pem").write_bytes(producer_cert.read_bytes())
    rogue_key, rogue_cert = write_identity(tmp_path, "rogue")
    return {"store": store, "key": producer_key, "cert": producer_cert, "rogue_key": rogue_key, "rogue_cert": rogue_cert}


@pytest.fixture(autouse=True)
def _restore_serializer_registry() -> Iterator[None]:
    """setup_security changes kombu's process-wide registry (default serializer, disabled types)."""
    saved = (
        registry._default_content_type,
        registry._default_content_encoding,
        registry._default_encode,
        set(registry._disabled_content_types),
        dict(registry._encoders),
        dict(registry._decoders),
        dict(registry.type_to_name),
        dict(registry.name_to_type),
    )
    yield
    (
        registry._default_content_type,
        registry._default_content_encoding,
        registry._default_encode,
        disabled,
        encoders,
        decoders,
        type_to_name,
        name_to_type,
    ) = saved
    registry._disabled_content_types = disabled
    registry._encoders, registry._decoders = encoders, decoders
    registry.type_to_name, registry.name_to_type = type_to_name, name_to_type


def _signed(key: Path, cert: Path, body: Any) -> str:
    return SecureSerializer(PrivateKey(key.read_text()), Certificate(cert.read_text()), None, "sha256").serialize(body)


def _entry(client: VQAClient, question: str, signed_body: str) -> tuple[str, str]:
    """(job id, a queue entry carrying ``signed_body`` as the auth serializer would)."""
    job = client.build_job("https://images.example/cat.png", question)
    entry = json.loads(TaskMessages(queue="vqa", reply_to=str(uuid.uuid4())).encode(job))
    entry["content-type"] = "application/data"
    entry["body"] = base64.b64encode(signed_body.encode()).decode()
    return job.job_id, json.dumps(entry)


def _protocol_body(client: VQAClient, question: str) -> tuple[str, list[Any]]:
    job = client.build_job("https://images.example/cat.png", question)
    return job.job_id, [[], {"job": job.model_dump(mode="json")}, {}]


def test_verifier_refuses_everything_but_a_trusted_signature(identities: dict[str, Any]) -> None:
    verifier = SignatureVerifier(str(identities["store"]))
    body = [[], {"job": {"x": 1}}, {}]
    assert verifier.verify(_signed(identities["key"], identities["cert"], body).encode()) == body
    with pytest.raises(InvalidJob, match="unknown certificate"):
        verifier.verify(_signed(identities["rogue_key"], identities["rogue_cert"], body))
    with pytest.raises(InvalidJob, match="malformed"):
        verifier.verify(b"not base64 !!!")
    with pytest.raises(InvalidJob, match="malformed"):
        verifier.verify(base64.b64encode(b"no separators"))
    raw = base64.b64decode(_signed(identities["key"], identities["cert"], body))
    with pytest.raises(InvalidJob, match="bad signature"):
        verifier.verify(base64.b64encode(raw.replace(b'"x": 1', b'"x": 2')))
    with pytest.raises(InvalidJob, match="content type"):
        verifier.verify(base64.b64encode(raw.replace(b"application/json", b"application/x-python-serialize")))


def test_an_expired_certificate_in_the_store_stops_the_worker_at_start(tmp_path: Path) -> None:
    _, cert = write_identity(tmp_path, "old", days=-1)
    with pytest.raises(Exception, match="[Ee]xpired"):
        SignatureVerifier(str(cert))


@pytest.mark.slow
def test_signing_worker_answers_signed_jobs_and_refuses_the_rest(
    identities: dict[str, Any],
    stack_env: dict[str, str],
    image_base_url: str,
    client_for: Callable[[dict[str, str]], VQAClient],
    start_worker: Callable[..., WorkerProcess],
) -> None:
    worker_env = {**stack_env, "VQA_SECURITY_CERT_STORE": str(identities["store"])}
    producer_env = {
        **stack_env,
        "VQA_SECURITY_KEY": str(identities["key"]),
        "VQA_SECURITY_CERTIFICATE": str(identities["cert"]),
    }
    worker = start_worker(worker_env)
    signer = client_for(producer_env)
    assert signer.app.conf.task_serializer == "auth"
    broker = redis.Redis.from_url(stack_env["VQA_BROKER_URL"])

    good = signer.submit_many([{"image_url": f"{image_base_url}/small.png", "question": f"Signed {i}?"} for i in range(3)])
    # Unsigned JSON, exactly what a producer without the key sends.
    with VQAClient(Settings(security_key=None, security_certificate=None)) as unsigned:
        assert not unsigned.settings.signs_messages
        unsigned_id = unsigned.submit(f"{image_base_url}/small.png", "Unsigned?")
    rogue_id, rogue = _entry(signer, "Rogue?", _signed(identities["rogue_key"], identities["rogue_cert"], _protocol_body(signer, "Rogue?")[1]))
    tampered_id, body = _protocol_body(signer, "Tampered?")
    raw = base64.b64decode(_signed(identities["key"], identities["cert"], body))
    tampered = base64.b64encode(raw.replace(b"Tampered?", b"Tampered!")).decode()
    _, tampered_entry = _entry(signer, "Tampered?", tampered)
    switched_id, body = _protocol_body(signer, "Switched?")
    raw = base64.b64decode(_signed(identities["key"], identities["cert"], body))
    _, switched = _entry(signer, "Switched?", base64.b64encode(raw.replace(b"application/json", b"application/x-python-serialize")).decode())
    for entry in (rogue, tampered_entry, switched):
        broker.lpush("vqa", entry)
    good += signer.submit_many([{"image_url": f"{image_base_url}/tall.png", "question": f"Signed after {i}?"} for i in range(2)])

    assert all(record.status == "succeeded" for record in wait_all(signer, good).values())
    reasons = {
        unsigned_id: "requires signed messages",
        rogue_id: "unknown certificate",
        tampered_id: "bad signature",
        switched_id: "signed content type",
    }
    assert wait_until(lambda: worker.log.count("rejected a message") >= len(reasons), timeout=20), worker.log[-2000:]
    lines = [line for line in worker.log.splitlines() if "rejected a message" in line]
    assert len(lines) == len(reasons)
    for job_id, reason in reasons.items():
        if job_id != tampered_id:  # the id header is outside the signature; the body is not
            assert any(job_id in line and reason in line for line in lines), (reason, lines)
        assert signer.status(job_id) == "PENDING"
    assert any("bad signature" in line for line in lines)
    assert worker.proc is not None and worker.proc.poll() is None
