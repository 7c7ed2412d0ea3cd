"""``/v1/events/s3``: bucket notifications (MinIO's webhook target, AWS S3 event messages) into jobs.

Always 2xx for a well-formed notification, whatever it held: a delete, an object no rule
matches, a replay of one already answered (the same jobs, not new ones). A notifier retries
non-2xx answers, and a permanent refusal would be retried forever.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from producer.api.bodies import read_json
from producer.api.problems import problem_responses
from producer.api.state import ApiState
from producer.errors import InvalidJob
from producer.ingest.notifications import IngestRequest, created_objects, requests_for
from producer.schema import Job

log = logging.getLogger(__name__)


class Ingested(BaseModel):
    job_ids: list[str]
    objects: int
    unmatched: int
    ignored: int
    rejected: list[str]


_NOTIFICATION_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {"Records": {"type": "array", "items": {"type": "object"}}},
                    "description": "An S3 event notification (MinIO webhook target or AWS eventSource aws:s3)",
                }
            }
        },
    }
}


def router(state: ApiState) -> APIRouter:
    routes = APIRouter(prefix="/v1/events", tags=["events"])

    @routes.head("/s3", status_code=200, summary="MinIO's liveness probe of its webhook target")
    def probe() -> Response:
        return Response(status_code=200)

    @routes.post("/s3", response_model=Ingested, openapi_extra=_NOTIFICATION_BODY, responses=problem_responses(400, 401, 413, 422, 503), summary="An S3 bucket notification")
    async def notification(request: Request) -> Ingested:
        payload = await read_json(request, state.settings.api_max_body_bytes)
        objects, ignored = created_objects(payload)
        requests, unmatched = requests_for(objects, state.rules)
        jobs, rejected = _build(state, requests)
        job_ids: list[str] = []
        for priority, lane in jobs.items():
            job_ids += await run_in_threadpool(state.client.submit_jobs, lane, priority=priority)
        return Ingested(job_ids=job_ids, objects=len(objects), unmatched=unmatched, ignored=ignored, rejected=rejected)

    return routes


def _build(state: ApiState, requests: list[IngestRequest]) -> tuple[dict[str, list[Job]], list[str]]:
    """Jobs by lane; a request no job can be made of (a key too long for a URL...) is reported, never retried."""
    lanes: dict[str, list[Job]] = defaultdict(list)
    rejected: list[str] = []
    for item in requests:
        try:
            lanes[item.priority].append(state.client.build_request(item.request))
        except InvalidJob as exc:
            image: Any = item.request.get("image_url")
            log.warning("notification for %s makes no job: %s", str(image)[:200], exc)
            rejected.append(f"{str(image)[:200]}: {exc}")
    return dict(lanes), rejected
