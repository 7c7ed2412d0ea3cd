"""Message intake: one untrusted queue entry in, one validated :class:`producer.schema.Job` out.

Anyone who can write to the broker can put anything on the queue, so nothing of an entry is
trusted. Every check lives here, in the order it runs, and every refusal is one
:class:`producer.errors.MessageRejected` with the reason; the consumer then moves the entry to
the dead-letter list (``vqa dead-letters`` shows it) and goes on with the jobs around it.

    size          the raw entry against MAX_MESSAGE_BYTES, before it is parsed at all
    envelope      kombu's Redis envelope: a JSON object with headers, properties, a delivery
                  tag and a body string; compressed bodies are refused (kombu would inflate
                  them unbounded)
    task message  Celery task protocol 2 for ``vqa.answer`` only; JSON only (pickle and every
                  other content type are refused before a byte is deserialised); with signing
                  on, only messages signed by a trusted certificate (SignatureVerifier)
    job           the shared pydantic Job model, whose id must be the message's task id; a
                  Celery ``expires`` header earlier than the job's own deadline becomes it
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import padding

from producer import keys
from producer.errors import InvalidJob, MessageRejected
from producer.schema import Job

# The one size limit, on the entry as it is taken off the queue (the body inside is base64,
# 4 characters per 3 bytes). A job is a few KiB: URL and question are capped.
MAX_MESSAGE_BYTES = 384 * 1024
JSON_CONTENT_TYPE = "application/json"
# What Celery's "auth" serializer (celery.security) labels signed messages.
AUTH_CONTENT_TYPE = "application/data"
_AUTH_SEPARATOR = b"\x00\x01"
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


@dataclass(frozen=True)
class QueueMessage:
    """One queue entry read as a kombu envelope; the job in it is not validated yet."""

    delivery_tag: str
    headers: dict[str, Any]
    body: bytes
    content_type: str | None
    content_encoding: str | None
    properties: dict[str, Any]

    @property
    def task_id(self) -> str:
        """The message's task id for a log line, whatever the headers hold."""
        return printable(self.headers.get("id", "?"))


def read_message(tag: str, raw: bytes, *, verifier: SignatureVerifier | None = None) -> tuple[QueueMessage, Job]:
    """Everything the worker checks before a queue entry becomes a job; raise MessageRejected otherwise."""
    message = parse_envelope(tag, raw)
    try:
        return message, decode_task_message(message, verifier=verifier)
    except InvalidJob as exc:
        raise MessageRejected(f"message {message.task_id}: {exc.message}") from exc


def parse_envelope(tag: str, raw: bytes) -> QueueMessage:
    """Read a kombu Redis envelope; raise MessageRejected (oversized, not an envelope, compressed) otherwise."""
    if len(raw) > MAX_MESSAGE_BYTES:
        raise MessageRejected(f"queue entry of {len(raw):,} bytes is over the {MAX_MESSAGE_BYTES:,}-byte limit")
    try:
        payload = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise MessageRejected(f"queue entry is not JSON ({type(exc).__name__})") from exc
    if not isinstance(payload, dict):
        raise MessageRejected(f"envelope is a {type(payload).__name__}, not an object")
    headers, properties, body = payload.get("headers"), payload.get("properties"), payload.get("body")
    if not isinstance(headers, dict) or not isinstance(properties, dict):
        raise MessageRejected("envelope has no headers or properties object")
    if not isinstance(properties.get("delivery_tag"), str) or not isinstance(properties.get("delivery_info"), dict):
        raise MessageRejected("envelope has no delivery tag or delivery info")
    if not isinstance(body, str):
        raise MessageRejected("envelope has no body string")
    if headers.get("compression"):
        raise MessageRejected(
            f"message {printable(headers.get('id', '?'))}: compressed bodies ({str(headers['compression'])[:40]!r}) are refused"
        )
    if properties.get("body_encoding") == "base64":
        try:
            data = base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise MessageRejected("body is not valid base64") from exc
    else:
        data = body.encode()
    return QueueMessage(
        delivery_tag=tag,
        headers=headers,
        body=data,
        content_type=payload.get("content-type"),
        content_encoding=payload.get("content-encoding"),
        properties=properties,
    )


def decode_task_message(message: QueueMessage, *, verifier: SignatureVerifier | None = None) -> Job:
    """Validate a Celery protocol-2 message for our task and return its job; raise InvalidJob otherwise.

    Headers, content type and body are checked in that order, and the body is deserialised
    only as JSON (after its signature is verified, when ``verifier`` is given).
    """
    headers = message.headers
    task = headers.get("task")
    if task != keys.TASK_NAME:
        raise InvalidJob(f"not a {keys.TASK_NAME} message (task={str(task)[:80]!r})")
    content_type = message.content_type
    body: Any
    if verifier is not None:
        if content_type != AUTH_CONTENT_TYPE:
            raise InvalidJob(f"unsigned message (content type {str(content_type)[:80]!r}); this worker requires signed messages")
        body = verifier.verify(message.body)
    else:
        # kombu's own accept list lets "application/data" and "application/text" through
        # whatever it is told, so the content type is checked here, by name.
        if content_type != JSON_CONTENT_TYPE:
            raise InvalidJob(f"content type {str(content_type)[:80]!r} refused; only {JSON_CONTENT_TYPE} is accepted")
        try:
            body = _json(message.body)
        except ValueError as exc:
            raise InvalidJob(f"cannot decode the message body: {type(exc).__name__}") from exc
    if not (isinstance(body, list | tuple) and len(body) == 3 and isinstance(body[1], dict)):
        raise InvalidJob("body is not Celery protocol 2 [args, kwargs, embed]")
    args, kwargs, _ = body
    if args or set(kwargs) != {"job"}:
        raise InvalidJob("expected exactly one keyword argument 'job'")
    job = Job.decode(kwargs["job"])
    if headers.get("id") != job.job_id:
        raise InvalidJob("message id does not match the job id")
    expires = _celery_expires(headers.get("expires"))
    if expires is not None and (job.deadline is None or expires < job.deadline):
        job = job.model_copy(update={"deadline": expires})
    return job


def _celery_expires(value: object) -> datetime | None:
    """The ``expires`` header Celery's ``send_task(expires=...)`` writes (ISO 8601); naive times are UTC, as in Celery."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidJob(f"expires header is a {type(value).__name__}, not an ISO 8601 time")
    try:
        when = datetime.fromisoformat(value)
    except ValueError as exc:
        raise InvalidJob(f"expires header {printable(value)!r} is not an ISO 8601 time") from exc
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _json(body: Any) -> Any:
    if not isinstance(body, str | bytes):
        raise ValueError("no body")
    try:
        return json.loads(body)
    except RecursionError as exc:  # "[[[[..." nested deeper than the parser's stack
        raise ValueError("nested too deeply") from exc


def printable(value: object, limit: int = 64) -> str:
    """At most ``limit`` characters with no control characters: ids go into log lines as they are."""
    return _CONTROL.sub("?", str(value)[:limit])


class SignatureVerifier:
    """Verifies Celery ``auth``-serializer messages against a store of trusted certificates.

    Same wire format and algorithm as ``celery.security`` (RSA-PSS over the serialised body,
    the signer named by certificate issuer and serial), verified here rather than through
    kombu's serializer registry for three reasons: the registry's ``auth`` decoder would
    deserialise the inner body with whatever content type the message names (it is not
    covered by the signature), ours insists on JSON; the registry is process-wide state;
    and Celery 5.6 turns a bad signature into a TypeError instead of its SecurityError.
    """

    def __init__(self, cert_store: str, *, digest: str = "sha256") -> None:
        from celery.security.certificate import FSCertStore
        from celery.security.utils import get_digest_algorithm

        self._store = FSCertStore(cert_store)  # refuses expired and non-RSA certificates
        if not list(self._store.itercerts()):
            raise ValueError(f"no certificates found in {cert_store!r}")
        self._digest = get_digest_algorithm(digest)

    def verify(self, data: Any) -> Any:
        """Return the JSON body of a signed message, or raise InvalidJob saying why not."""
        from celery.exceptions import SecurityError

        try:
            raw = base64.b64decode(data if isinstance(data, bytes) else str(data).encode(), validate=True)
            signer, signature, content_type, _encoding, body = raw.split(_AUTH_SEPARATOR, 4)
            signer_id = base64.b64decode(signer).decode()
            signature = base64.b64decode(signature)
        except (ValueError, binascii.Error) as exc:
            raise InvalidJob("malformed signed message") from exc
        try:
            cert = self._store[signer_id]
        except SecurityError as exc:
            raise InvalidJob(f"signed by an unknown certificate ({signer_id[:120]!r})") from exc
        if cert.has_expired():
            raise InvalidJob(f"the signer's certificate has expired ({signer_id[:120]!r})")
        pad = padding.PSS(mgf=padding.MGF1(self._digest), salt_length=padding.PSS.MAX_LENGTH)
        try:
            cert.get_pubkey().verify(signature, body, pad, self._digest)
        except (InvalidSignature, ValueError, TypeError) as exc:
            raise InvalidJob("bad signature") from exc
        if content_type != JSON_CONTENT_TYPE.encode():
            raise InvalidJob(f"signed content type {content_type[:80]!r} refused; only {JSON_CONTENT_TYPE} is accepted")
        try:
            return _json(body)
        except ValueError as exc:
            raise InvalidJob(f"cannot decode the signed body: {type(exc).__name__}") from exc
