"""Untrusted messages from the queue: refuse, verify and validate before anything runs.

Anyone who can write to the broker can put anything on the queue. A message becomes a
:class:`producer.schema.Job` only after every check below; otherwise the worker logs the
reason and drops it (:class:`producer.errors.InvalidJob`), never crashing and never
holding up the jobs around it.

    check_envelope(payload)     on the raw envelope, before the body is decoded: no compressed
                                 bodies (kombu's Message would inflate them unbounded), no
                                 oversized ones (worker/broker.py calls it)
    decode_task_message(msg)     Celery task protocol 2 for ``vqa.answer`` only; JSON only
                                 (pickle and every other content type are refused before a
                                 byte is deserialised); with signing on, only messages signed
                                 by a trusted certificate; then the shared pydantic Job model
    SignatureVerifier            the ``auth`` serializer's signatures (Celery message signing),
                                 checked against a store of trusted certificates
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import padding

from producer import keys
from producer.errors import InvalidJob
from producer.schema import Job

# A job is a few KiB (URL and question are capped); nothing legitimate comes near this.
MAX_MESSAGE_BYTES = 256 * 1024
JSON_CONTENT_TYPE = "application/json"
# What Celery's "auth" serializer (celery.security) labels signed messages.
AUTH_CONTENT_TYPE = "application/data"
_AUTH_SEPARATOR = b"\x00\x01"
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


class RefusedMessage(ValueError):
    """The raw envelope is refused before its body is decoded: the message is dropped unread."""


def check_envelope(payload: dict[str, Any]) -> None:
    """Refuse (RefusedMessage) an envelope whose body is compressed or over the size limit."""
    headers = payload.get("headers")
    task_id = _printable(headers.get("id")) if isinstance(headers, dict) else "?"
    if isinstance(headers, dict) and headers.get("compression"):
        raise RefusedMessage(f"message {task_id}: compressed bodies ({str(headers['compression'])[:40]!r}) are refused")
    body = payload.get("body")
    # The envelope holds the body base64-encoded: 4 characters per 3 bytes.
    if isinstance(body, str | bytes) and len(body) > MAX_MESSAGE_BYTES * 4 // 3 + 4:
        raise RefusedMessage(f"message {task_id}: body of {len(body):,} characters is over the {MAX_MESSAGE_BYTES:,}-byte limit")


def decode_task_message(message: Any, *, verifier: SignatureVerifier | None = None) -> Job:
    """Validate a Celery protocol-2 message for our task and return its job; raise InvalidJob otherwise.

    Nothing of the message is trusted: headers, content type, size and body are checked in
    that order, and the body is deserialised only as JSON (after its signature is verified,
    when ``verifier`` is given).
    """
    headers = message.headers
    if not isinstance(headers, dict):
        raise InvalidJob("message has no Celery headers")
    task = headers.get("task")
    if task != keys.TASK_NAME:
        raise InvalidJob(f"not a {keys.TASK_NAME} message (task={str(task)[:80]!r})")
    body = message.body
    if isinstance(body, str | bytes) and len(body) > MAX_MESSAGE_BYTES:
        raise InvalidJob(f"message body is {len(body):,} bytes; the limit is {MAX_MESSAGE_BYTES:,}")
    content_type = message.content_type
    if verifier is not None:
        if content_type != AUTH_CONTENT_TYPE:
            raise InvalidJob(f"unsigned message (content type {str(content_type)[:80]!r}); this worker requires signed messages")
        body = verifier.verify(body)
    else:
        # kombu's own accept list lets "application/data" and "application/text" through
        # whatever it is told, so the content type is checked here, by name.
        if content_type != JSON_CONTENT_TYPE:
            raise InvalidJob(f"content type {str(content_type)[:80]!r} refused; only {JSON_CONTENT_TYPE} is accepted")
        try:
            body = _json(body)
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
    return job


def _json(body: Any) -> Any:
    if not isinstance(body, str | bytes):
        raise ValueError("no body")
    try:
        return json.loads(body)
    except RecursionError as exc:  # "[[[[..." nested deeper than the parser's stack
        raise ValueError("nested too deeply") from exc


def message_id(message: Any) -> str:
    """The message's task id for a log line, whatever the headers hold."""
    headers = getattr(message, "headers", None)
    return _printable(headers.get("id", "?")) if isinstance(headers, dict) else "?"


def _printable(value: object, limit: int = 64) -> str:
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
