"""The FastAPI application of ``vqa api``: every route but /healthz behind the bearer token."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse

from producer.api import bulk, events, jobs
from producer.api.auth import BearerAuth
from producer.api.problems import install as install_problems
from producer.api.problems import problem_responses
from producer.api.state import ApiState
from producer.settings import Settings


def create_app(settings: Settings, *, state: ApiState | None = None) -> FastAPI:
    """The app over ``settings``: one VQAClient, rules loaded now (InvalidJob if they are broken)."""
    state = state or ApiState.build(settings)
    auth = BearerAuth(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        state.close()

    # /openapi.json is served below, behind the token like everything but /healthz.
    app = FastAPI(
        title="vqa-queue job API",
        version="1",
        description="Visual questions over HTTP: jobs, bulk runs, S3 bucket notifications. Bearer token on every route but /healthz.",
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.vqa = state
    install_problems(app)
    guarded = [Depends(auth)]
    app.include_router(jobs.router(state), dependencies=guarded)
    app.include_router(bulk.router(state), dependencies=guarded)
    app.include_router(events.router(state), dependencies=guarded)

    @app.get("/healthz", tags=["health"], summary="Liveness and readiness (no token)")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    schema: dict[str, Any] = {}

    @app.get("/openapi.json", tags=["health"], include_in_schema=False, dependencies=guarded, responses=problem_responses(401))
    def openapi() -> JSONResponse:
        if not schema:
            schema.update(_with_security(app.openapi()))
        return JSONResponse(schema)

    return app


def _with_security(schema: dict[str, Any]) -> dict[str, Any]:
    components = schema.setdefault("components", {})
    components.setdefault("securitySchemes", {})["bearer"] = {"type": "http", "scheme": "bearer"}
    # Bodies the routes read themselves (to cap their size while reading) are described here.
    for model in (jobs.JobRequest, bulk.BulkOptionsBody):
        components.setdefault("schemas", {})[model.__name__] = model.model_json_schema(ref_template="#/components/schemas/{model}")
    for path, operations in schema.get("paths", {}).items():
        if path == "/healthz":
            continue
        for operation in operations.values():
            operation["security"] = [{"bearer": []}]
    return schema
