"""``/v1/bulk``: start a bulk run from a manifest in the body (JSON Lines) or in S3, follow it, stream its results, cancel it.

The API process publishes the run on a thread of its own (producer/bulk/run.py), as ``vqa
bulk submit`` does; the same manifest posted again resumes the same run.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path as FilePath
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from producer.api.bodies import read_body
from producer.api.problems import Problem, problem_responses
from producer.api.state import ApiState, Publishing
from producer.bulk.run import BulkRun, attach, start
from producer.errors import InvalidJob
from producer.schema import BULK_ID_PATTERN, MAX_BULK_ID_LENGTH, MAX_URL_LENGTH

BulkId = Annotated[str, Path(min_length=1, max_length=MAX_BULK_ID_LENGTH, pattern=BULK_ID_PATTERN, description="A run id from POST /v1/bulk.")]
JSONL_TYPES = ("application/jsonl", "application/x-ndjson", "application/x-jsonlines", "text/plain")


class BulkOptionsBody(BaseModel):
    """The run's options: query parameters with a JSON Lines body, fields of the JSON body with an S3 ``source``."""

    model_config = ConfigDict(extra="forbid")

    source: str | None = Field(default=None, max_length=MAX_URL_LENGTH, description="s3://bucket/prefix/ (JSON body only)")
    name: str | None = Field(default=None, max_length=MAX_BULK_ID_LENGTH)
    questions: list[str] = Field(default_factory=list, max_length=32)
    max_new_tokens: int | None = None
    expires_in: str | float | None = None
    webhook_url: str | None = None
    window: int | None = None
    strict: bool = False
    priority: Literal["high", "default", "low"] = "low"


_BULK_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/jsonl": {"schema": {"type": "string", "description": "The manifest: one JSON object per line"}},
            "application/json": {"schema": {"$ref": "#/components/schemas/BulkOptionsBody"}},
        },
    },
    "parameters": [
        {"name": name, "in": "query", "required": False, "schema": schema}
        for name, schema in (
            ("name", {"type": "string"}),
            ("questions", {"type": "array", "items": {"type": "string"}}),
            ("max_new_tokens", {"type": "integer"}),
            ("expires_in", {"type": "string"}),
            ("webhook_url", {"type": "string"}),
            ("window", {"type": "integer"}),
            ("strict", {"type": "boolean"}),
            ("priority", {"type": "string", "enum": ["high", "default", "low"]}),
        )
    ],
}


def router(state: ApiState) -> APIRouter:
    routes = APIRouter(prefix="/v1/bulk", tags=["bulk"])
    limit = state.settings.api_max_body_bytes

    @routes.post("", status_code=202, openapi_extra=_BULK_BODY, responses=problem_responses(400, 401, 409, 413, 415, 422, 503), summary="Start (or resume) a bulk run")
    async def submit(request: Request) -> JSONResponse:
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        body = await read_body(request, limit)
        manifest: FilePath | None = None
        if media == "application/json":
            options = _options(_json_object(body))
            if options.source is None or not options.source.startswith("s3://"):
                raise InvalidJob("a JSON body names its manifest as source: s3://bucket/prefix/; send a manifest itself as application/jsonl")
            source = options.source
        elif media in JSONL_TYPES:
            options = _options(_query_options(request))
            if options.source is not None:
                raise InvalidJob("source is for a JSON body; this body is the manifest")
            manifest = _write_manifest(body)
            source = str(manifest)
        else:
            raise Problem(415, "send the manifest as application/jsonl, or a JSON body with an s3:// source", code="unsupported_media_type")
        key = state.idempotency.key_of(request)
        name = options.name
        if key is not None:
            await run_in_threadpool(state.idempotency.check, "bulk", key, json.dumps([media, body.decode(errors="replace"), dict(request.query_params)]).encode())
            name = name or "api-" + hashlib.sha256(key.encode()).hexdigest()[:24]
        try:
            run = await run_in_threadpool(_start, state, source, name, options)
        except BaseException:
            if manifest is not None:
                manifest.unlink(missing_ok=True)
            raise
        state.keep_publishing(Publishing(run=run, manifest=manifest))
        status = await run_in_threadpool(run.status)
        return JSONResponse(status.model_dump(mode="json"), status_code=202, headers={"Location": f"/v1/bulk/{run.bulk_id}"})

    @routes.get("/{bulk_id}", responses=problem_responses(401, 404, 422, 503), summary="A run's status and counts")
    def status(bulk_id: BulkId) -> dict[str, Any]:
        with attach(state.client, bulk_id) as run:
            return _status(run).model_dump(mode="json")

    @routes.get(
        "/{bulk_id}/results",
        responses={200: {"content": {"application/jsonl": {"schema": {"type": "string"}}}}, **problem_responses(401, 404, 422, 503)},
        response_class=StreamingResponse,
        summary="The finished jobs' results, streamed as JSON Lines (partial while the run runs)",
    )
    def results(bulk_id: BulkId) -> StreamingResponse:
        run = attach(state.client, bulk_id)
        try:
            _status(run)
        except BaseException:
            run.close()
            raise
        return StreamingResponse(_lines(run), media_type="application/jsonl")

    @routes.post("/{bulk_id}/cancel", status_code=202, responses=problem_responses(401, 404, 422, 503), summary="Cancel a run")
    def cancel(bulk_id: BulkId) -> dict[str, Any]:
        with attach(state.client, bulk_id) as run:
            _status(run)
            return run.cancel().model_dump(mode="json")

    return routes


def _start(state: ApiState, source: str, name: str | None, options: BulkOptionsBody) -> BulkRun:
    return start(state.client, source, name=name, **options.model_dump(exclude={"source", "name"}))


def _status(run: BulkRun) -> Any:
    try:
        return run.status()
    except InvalidJob as exc:
        raise Problem(404, str(exc), code="no_such_run") from exc


def _lines(run: BulkRun) -> Iterator[bytes]:
    try:
        for entry in run.entries():
            yield (json.dumps(entry, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
    finally:
        run.close()


def _json_object(body: bytes) -> Any:
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise Problem(400, "body is not JSON", code="malformed_json") from None
    if not isinstance(payload, dict):
        raise InvalidJob("the JSON body is an object of run options with source")
    return payload


def _query_options(request: Request) -> dict[str, Any]:
    params = request.query_params
    options: dict[str, Any] = {name: value for name, value in params.items() if name != "questions"}
    if "questions" in params:
        options["questions"] = params.getlist("questions")
    return options


def _options(values: dict[str, Any]) -> BulkOptionsBody:
    try:
        return BulkOptionsBody.model_validate(values)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'options'}: {e['msg']}" for e in exc.errors(include_url=False, include_input=False))
        raise InvalidJob(problems) from exc


def _write_manifest(body: bytes) -> FilePath:
    """The body as a JSON Lines file for the bulk submitter, which reads it as it publishes."""
    if not body.strip():
        raise InvalidJob("the manifest is empty")
    handle, path = tempfile.mkstemp(prefix="vqa-api-manifest-", suffix=".jsonl")
    with os.fdopen(handle, "wb") as out:
        out.write(body)
    return FilePath(path)
