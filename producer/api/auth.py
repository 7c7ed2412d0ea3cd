"""Bearer tokens (``VQA_API_TOKENS``): every endpoint but /healthz needs one.

Each presented token is compared with every configured one by ``hmac.compare_digest``, all of
them every time, so neither the match nor its position shows in the timing. Tokens are never
logged; a refusal says only that the token was missing or wrong.
"""

from __future__ import annotations

import hmac

from fastapi import Request

from producer.api.problems import Problem
from producer.settings import Settings

_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="vqa"'}


class BearerAuth:
    """The FastAPI dependency that checks ``Authorization: Bearer <token>``."""

    def __init__(self, settings: Settings) -> None:
        self._tokens = [token.get_secret_value().encode() for token in settings.api_tokens if token.get_secret_value()]

    @property
    def configured(self) -> bool:
        return bool(self._tokens)

    def __call__(self, request: Request) -> None:
        header = request.headers.get("authorization", "")
        scheme, _, presented = header.partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            raise Problem(401, "missing bearer token (Authorization: Bearer <token>)", code="unauthorized", headers=_CHALLENGE)
        if not self.accepts(presented.strip().encode()):
            raise Problem(401, "invalid bearer token", code="unauthorized", headers=_CHALLENGE)

    def accepts(self, presented: bytes) -> bool:
        matched = False
        for token in self._tokens:
            matched |= hmac.compare_digest(presented, token)
        return matched
