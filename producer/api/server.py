"""``vqa api``: serve the app with uvicorn."""

from __future__ import annotations

import logging

from producer.api.app import create_app
from producer.settings import Settings

log = logging.getLogger(__name__)


def run_api(settings: Settings, *, host: str, port: int) -> None:
    import uvicorn

    app = create_app(settings)
    if not settings.api_tokens:
        log.warning("VQA_API_TOKENS is empty: every endpoint but /healthz answers 401")
    # Uvicorn's access log names method, path and status, never headers: tokens stay out of it.
    uvicorn.run(app, host=host, port=port, log_level=settings.log_level.lower(), proxy_headers=False, server_header=False)
