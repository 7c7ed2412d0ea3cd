"""Errors as RFC 9457 ``application/problem+json``: ``type``, ``title``, ``status``, ``detail``."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from producer.errors import InvalidJob, RunBusy, TransientError, VQAError

MEDIA_TYPE = "application/problem+json"
_TYPE_BASE = "urn:vqa:problem:"


class Problem(Exception):
    """Raised by handlers: answered as a problem document with ``status`` (and ``headers``)."""

    def __init__(self, status: int, detail: str, *, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.code = code or HTTPStatus(status).phrase.lower().replace(" ", "_")
        self.headers = headers


def problem_response(status: int, detail: str, *, code: str, headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    body = {"type": _TYPE_BASE + code, "title": HTTPStatus(status).phrase, "status": status, "detail": detail, "code": code, **extra}
    return JSONResponse(body, status_code=status, media_type=MEDIA_TYPE, headers=headers)


# Problem documents in the OpenAPI schema, so clients (and the fuzzer) know what errors look like.
PROBLEM_SCHEMA = {
    "type": "object",
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "code": {"type": "string"},
    },
    "required": ["type", "title", "status", "detail"],
}


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The ``responses=`` entry of a route for these error statuses."""
    return {status: {"description": HTTPStatus(status).phrase, "content": {MEDIA_TYPE: {"schema": PROBLEM_SCHEMA}}} for status in statuses}


def install(app: FastAPI) -> None:
    """Every error the app can raise answers as a problem document; none leaks a traceback as a 500."""

    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        return problem_response(exc.status, exc.detail, code=exc.code, headers=exc.headers)

    @app.exception_handler(InvalidJob)
    async def _invalid(request: Request, exc: InvalidJob) -> JSONResponse:
        # The same message the CLI prints after "error: ".
        return problem_response(422, str(exc), code=exc.code)

    @app.exception_handler(VQAError)
    async def _ours(request: Request, exc: VQAError) -> JSONResponse:
        if isinstance(exc, RunBusy):
            return problem_response(409, str(exc), code=exc.code)
        if isinstance(exc, TransientError):
            return problem_response(503, str(exc), code=exc.code, headers={"Retry-After": "5"})
        return problem_response(422, str(exc), code=exc.code)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()))
            parts.append(f"{where}: {err.get('msg')}")
        return problem_response(422, "; ".join(parts) or "invalid request", code="invalid_request")

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        code = HTTPStatus(exc.status_code).phrase.lower().replace(" ", "_")
        return problem_response(exc.status_code, detail, code=code, headers=getattr(exc, "headers", None))
