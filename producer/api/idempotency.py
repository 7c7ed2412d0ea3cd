"""The ``Idempotency-Key`` header (IETF draft "The Idempotency-Key HTTP Header Field").

The first request with a key stores a fingerprint of its body (SET NX, ``VQA_API_IDEMPOTENCY_TTL_S``).
A later request with the same key and the same body gets the same job, because the key
becomes the idempotency key of the jobs it carries (their ids derive from it); one with
another body is refused with 422, as the draft says.
"""

from __future__ import annotations

import hashlib

import redis
from fastapi import Request

from producer import keys
from producer.api.problems import Problem
from producer.errors import BackendUnavailable

HEADER = "Idempotency-Key"
# Room for ":<index>" when a list's jobs each take the key (schema: 256 characters at most).
MAX_KEY_LENGTH = 200


class IdempotencyKeys:
    """Checks a request's key against the body first sent with it."""

    def __init__(self, client: redis.Redis, *, ttl_s: int) -> None:
        self.client = client
        self.ttl_s = ttl_s

    def key_of(self, request: Request) -> str | None:
        value = request.headers.get(HEADER)
        if value is None:
            return None
        value = value.strip().strip('"')  # the draft's form is a quoted string
        if not value or len(value) > MAX_KEY_LENGTH or not value.isprintable():
            raise Problem(400, f"{HEADER} must be 1-{MAX_KEY_LENGTH} printable characters", code="bad_idempotency_key")
        return value

    def check(self, scope: str, key: str, body: bytes) -> None:
        """Remember ``body`` for ``key``, or raise 422 when the key came with another body before."""
        digest = hashlib.sha256(key.encode()).hexdigest()
        fingerprint = hashlib.sha256(body).hexdigest()
        name = keys.api_idempotency_key(scope, digest)
        try:
            stored = self.client.set(name, fingerprint, nx=True, ex=self.ttl_s, get=True)
        except redis.RedisError as exc:
            raise BackendUnavailable(f"cannot reach Redis to check the Idempotency-Key: {type(exc).__name__}") from exc
        if stored is not None and stored.decode() != fingerprint:
            raise Problem(422, f"this {HEADER} was used with another request body", code="idempotency_key_reused")
