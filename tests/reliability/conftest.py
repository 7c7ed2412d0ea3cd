"""Fixtures for the fault-injection suite: a versioned bucket, fast settings, history, figures.

Every test runs real processes (redis-server, moto's S3 server, ``vqa worker``) from
tests/conftest.py, injects one kind of fault, then reads the history back from S3, the result
backend and the execution counters (history.py) and asserts on it. Each test also writes its
figures as JSON into ``$VQA_RELIABILITY_FIGURES_DIR`` (a temporary folder when unset);
scripts/reliability_report.py turns them into the table in docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from tests.reliability.helpers import MAX_NEW_TOKENS, VISIBILITY_TIMEOUT_S
from tests.reliability.history import History
from worker.dev.services import WorkerProcess


@pytest.fixture(scope="session")
def figures_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    configured = os.environ.get("VQA_RELIABILITY_FIGURES_DIR")
    path = Path(configured) if configured else tmp_path_factory.mktemp("reliability-figures")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture()
def figures(figures_dir: Path, request: pytest.FixtureRequest) -> Callable[..., dict[str, Any]]:
    """``figures(scenario, **values)``: write this test's figures as JSON and return them."""

    def write(scenario: str, **values: Any) -> dict[str, Any]:
        entry = {"scenario": scenario, "test": request.node.name, **values}
        (figures_dir / f"{request.node.name}.json").write_text(json.dumps(entry, indent=2, sort_keys=True))
        return entry

    return write


@pytest.fixture()
def rel_env(stack_env: dict[str, str], s3_server: Any, bucket: str) -> dict[str, str]:
    """Worker/client settings for fault injection: short visibility timeout, tiny answers, one torch thread per worker."""
    boto3.client("s3", endpoint_url=s3_server.url).put_bucket_versioning(
        Bucket=bucket, VersioningConfiguration={"Status": "Enabled"}
    )
    return {
        **stack_env,
        "VQA_MAX_BATCH_SIZE": "8",
        "VQA_MAX_BATCH_DELAY_MS": "50",
        "VQA_MAX_NEW_TOKENS": str(MAX_NEW_TOKENS),
        "VQA_VISIBILITY_TIMEOUT": str(VISIBILITY_TIMEOUT_S),
        "VQA_SHUTDOWN_GRACE_S": "10",
        "VQA_FETCH_TIMEOUT_S": "2",
        "VQA_MAX_ATTEMPTS": "3",
        # Two workers share two cores: one intra-op thread each is several times faster than two.
        "OMP_NUM_THREADS": "1",
    }


@pytest.fixture()
def history_for() -> Iterator[Callable[..., History]]:
    """``history_for(env, s3_url=None)``: reads this env's stores; ``s3_url`` bypasses a fault proxy."""
    made: list[History] = []

    def build(env: dict[str, str], *, s3_url: str | None = None) -> History:
        history = History(
            s3=boto3.client("s3", endpoint_url=s3_url or env["VQA_S3_ENDPOINT_URL"]),
            bucket=env["VQA_S3_BUCKET"],
            backend_url=env["VQA_RESULT_BACKEND"],
            broker_url=env["VQA_BROKER_URL"],
        )
        made.append(history)
        return history

    yield build
    for history in made:
        history.close()


@pytest.fixture()
def start_workers(start_worker: Callable[..., WorkerProcess]) -> Callable[..., list[WorkerProcess]]:
    """Start several workers at once (each takes seconds to load torch); returns them in name order."""

    def start(env: dict[str, str], names: list[str]) -> list[WorkerProcess]:
        started: dict[str, WorkerProcess] = {}
        errors: list[BaseException] = []

        def one(name: str) -> None:
            try:
                started[name] = start_worker(env, name=name)
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                errors.append(exc)

        threads = [threading.Thread(target=one, args=(name,)) for name in names]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        return [started[name] for name in names]

    return start
