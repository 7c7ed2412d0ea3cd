"""Fixtures for the HTTP API: ``vqa api`` as a real process over loopback, on the test's Redis and bucket."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import requests

from producer import keys
from worker.dev.services import ApiProcess

TOKEN = "test-token-7f3a9c"
IMAGE_BUCKET = "vqa-images-in"


@pytest.fixture()
def start_api(tmp_path: Path) -> Iterator[Callable[..., ApiProcess]]:
    """Factory: start ``vqa api`` with the given env (plus rules written to a file); stopped at teardown."""
    started: list[ApiProcess] = []

    def start(env: dict[str, str], *, rules: list[dict[str, object]] | None = None) -> ApiProcess:
        env = {"VQA_API_TOKENS": f"other-token,{TOKEN}", **env}
        if rules is not None:
            path = tmp_path / f"rules{len(started)}.json"
            path.write_text(json.dumps(rules))
            env["VQA_INGEST_RULES"] = str(path)
        proc = ApiProcess(env=env, log_path=tmp_path / f"api{len(started)}.log")
        started.append(proc)
        return proc.start()

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture()
def http() -> Iterator[requests.Session]:
    """A session that sends the test token."""
    with requests.Session() as session:
        session.headers["Authorization"] = f"Bearer {TOKEN}"
        yield session


def queued(redis_url: str, queue: str = "vqa") -> int:
    """Messages waiting in every priority lane of ``queue``: what "nothing enqueued" is checked against."""
    client = redis.Redis.from_url(redis_url)
    try:
        return sum(client.llen(name) for name in keys.priority_queue_keys(queue))
    finally:
        client.close()
