"""``/v1/jobs``: submit one job or a list, read a job's status and record, cancel it."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from producer.api.bodies import read_json
from producer.api.problems import Problem, problem_responses
from producer.api.state import ApiState
from producer.errors import InvalidJob
from producer.schema import JOB_ID_PATTERN, MAX_IDEMPOTENCY_KEY_LENGTH, MAX_QUESTION_LENGTH, MAX_URL_LENGTH, Job

MAX_JOBS_PER_REQUEST = 1000
JobId = Annotated[str, Path(min_length=1, max_length=64, pattern=JOB_ID_PATTERN, description="A job id from POST /v1/jobs.")]
Lane = Literal["high", "default", "low"]


class JobRequest(BaseModel):
    """One job, as ``vqa submit`` takes it (validated by the same code, with the same messages)."""

    image_url: str = Field(max_length=MAX_URL_LENGTH, description="http, https or s3://bucket/key")
    question: str = Field(max_length=MAX_QUESTION_LENGTH)
    idempotency_key: str | None = Field(default=None, max_length=MAX_IDEMPOTENCY_KEY_LENGTH)
    max_new_tokens: int | None = None
    generation: dict[str, Any] | None = None
    deadline: str | None = Field(default=None, description="ISO 8601 with a time zone")
    expires_in: str | float | None = Field(default=None, description="90s, 15m, 24h, 7d or seconds")
    webhook_url: str | None = None
    image_grid: str | None = Field(default=None, description="Less image detail than the workers' VQA_IMAGE_GRID: full or RxC (e.g. 2x1, 1x1)")


class Submitted(BaseModel):
    job_ids: list[str]


class JobStatus(BaseModel):
    job_id: str
    state: str = Field(description="PENDING (unknown or queued), STARTED, SUCCESS, FAILURE or REVOKED")
    record: dict[str, Any] | None = Field(description="The result record once the job finished")


class Cancelled(BaseModel):
    job_id: str
    cancelled: bool


_JOB_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "oneOf": [
                        {"$ref": "#/components/schemas/JobRequest"},
                        {"type": "array", "items": {"$ref": "#/components/schemas/JobRequest"}, "minItems": 1, "maxItems": MAX_JOBS_PER_REQUEST},
                    ]
                }
            }
        },
    }
}


def router(state: ApiState) -> APIRouter:
    routes = APIRouter(prefix="/v1/jobs", tags=["jobs"])

    @routes.post(
        "",
        status_code=202,
        response_model=Submitted,
        openapi_extra=_JOB_BODY,
        responses=problem_responses(400, 401, 413, 422, 503),
        summary="Submit one job or a list (all valid, or none enqueued)",
    )
    async def submit(request: Request, priority: Annotated[Lane, Query(description="The jobs' lane")] = "default") -> JSONResponse:
        payload = await read_json(request, state.settings.api_max_body_bytes)
        single = isinstance(payload, dict)
        items = [payload] if single else payload
        if not isinstance(items, list) or not items:
            raise InvalidJob("the body is one job object or a non-empty list of them")
        if len(items) > MAX_JOBS_PER_REQUEST:
            raise InvalidJob(f"at most {MAX_JOBS_PER_REQUEST} jobs per request")
        key = state.idempotency.key_of(request)
        if key is not None:
            items = [_with_key(item, key if single else f"{key}:{index}") for index, item in enumerate(items)]
        jobs = _build(state, items, single=single)
        if key is not None:
            canonical = json.dumps({"priority": priority, "body": payload}, sort_keys=True, separators=(",", ":")).encode()
            await run_in_threadpool(state.idempotency.check, "jobs", key, canonical)
        ids = await run_in_threadpool(state.client.submit_jobs, jobs, priority=priority)
        return JSONResponse({"job_ids": ids}, status_code=202, headers={"Location": f"/v1/jobs/{ids[0]}"})

    @routes.get("/{job_id}", response_model=JobStatus, responses=problem_responses(401, 422, 503), summary="A job's state and, once finished, its record")
    def status(job_id: JobId) -> JobStatus:
        state_name = state.client.status(job_id)
        record = None
        if state_name in ("SUCCESS", "FAILURE", "REVOKED"):
            found = state.client.result(job_id)
            record = None if found is None else found.model_dump(mode="json")
        return JobStatus(job_id=job_id, state=state_name, record=record)

    @routes.post("/{job_id}/cancel", status_code=202, response_model=Cancelled, responses=problem_responses(401, 422, 503), summary="Cancel a job")
    def cancel(job_id: JobId) -> Cancelled:
        state.client.cancel([job_id])
        return Cancelled(job_id=job_id, cancelled=True)

    return routes


def _with_key(item: Any, key: str) -> Any:
    """The request's Idempotency-Key becomes the job's own key, unless the job carries one."""
    if isinstance(item, dict) and item.get("idempotency_key") is None:
        return {**item, "idempotency_key": key}
    return item


def _build(state: ApiState, items: list[Any], *, single: bool) -> list[Job]:
    """Validate every item with the client (the CLI's messages): all valid, or InvalidJob listing each bad one."""
    jobs: list[Job] = []
    problems: list[str] = []
    for number, item in enumerate(items, start=1):
        try:
            jobs.append(state.client.build_request(item))
        except InvalidJob as exc:
            problems.append(str(exc) if single else f"line {number}: {exc}")
    if problems:
        raise InvalidJob("; ".join(problems))
    if not jobs:
        raise Problem(422, "no jobs")
    return jobs
