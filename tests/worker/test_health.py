"""/healthz: the worker reports whether its loop, threads and model calls make progress."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest

from producer.client import VQAClient
from worker.dev.services import WorkerProcess, free_port
from worker.health import LOOP_STALE_S, Progress, Readiness, check
from worker.ledger import LedgerStats
from worker.metrics import WorkerMetrics, serve_metrics
from worker.runner import BatchStats
from tests.support.consumer import FakeChannel, NoCancels
from tests.support.http import get
from tests.support.images import SIZES

HEALTHY = Progress(loop_age_s=0.1, model_thread_alive=True, writer_thread_alive=True, broker_reachable=True,
                   generate_running_s=None, jobs_held=3)


def test_a_worker_making_progress_is_healthy_even_with_redis_away() -> None:
    healthy, report = check(replace(HEALTHY, broker_reachable=False, generate_running_s=30.0), visibility_timeout=60)
    assert healthy and report["status"] == "ok" and report["problems"] == []
    assert report["broker_reachable"] is False and report["jobs_held"] == 3


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"loop_age_s": None}, "not started"),
        ({"loop_age_s": LOOP_STALE_S + 1}, "stalled"),
        ({"model_thread_alive": False}, "model thread"),
        ({"writer_thread_alive": False}, "writer thread"),
        ({"generate_running_s": 61.0}, "past the visibility timeout"),
    ],
)
def test_each_stuck_part_makes_it_unhealthy_and_is_named(change: dict[str, Any], problem: str) -> None:
    healthy, report = check(replace(HEALTHY, **change), visibility_timeout=60)
    assert not healthy and report["status"] == "unhealthy"
    assert len(report["problems"]) == 1 and problem in report["problems"][0]



def test_the_endpoint_serves_healthz_beside_the_metrics() -> None:
    state = {"healthy": True}

    def health() -> tuple[bool, dict[str, Any]]:
        return state["healthy"], {"status": "ok" if state["healthy"] else "unhealthy"}

    port = free_port()
    metrics = WorkerMetrics(worker="w1", ledger=LedgerStats(acked=4))
    server = serve_metrics(port, registry=metrics.registry, health=health)
    try:
        assert get(f"http://127.0.0.1:{port}/healthz") == (200, b'{"status": "ok"}')
        state["healthy"] = False
        status, body = get(f"http://127.0.0.1:{port}/healthz")
        assert status == 503 and json.loads(body) == {"status": "unhealthy"}
        status, body = get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200 and b'vqa_messages_acked_total{worker="w1"} 4.0' in body
    finally:
        server.shutdown()
        server.server_close()


def test_a_real_worker_reports_healthy_while_it_answers_jobs(
    stack_env: dict[str, str],
    image_base_url: str,
    client_for: Callable[[dict[str, str]], VQAClient],
    start_worker: Callable[..., WorkerProcess],
) -> None:
    port = free_port()
    env = {**stack_env, "VQA_METRICS_PORT": str(port)}
    start_worker(env, name="w-health")
    client = client_for(env)
    job_id = client.submit(f"{image_base_url}/{sorted(SIZES)[0]}", "Is it healthy?")
    assert client.wait(job_id, timeout=60).status == "succeeded"
    status, body = get(f"http://127.0.0.1:{port}/healthz")
    report = json.loads(body)
    assert status == 200 and report["status"] == "ok", report
    assert report["loop_age_s"] < 5 and report["model_thread_alive"] and report["writer_thread_alive"]
    assert report["broker_reachable"] and report["generate_running_s"] is None


def test_a_consumer_not_yet_running_is_not_healthy() -> None:
    from worker.consumer import BatchingConsumer

    from producer.settings import Settings

    class _Runner:
        stats = BatchStats()

    consumer = BatchingConsumer(settings=Settings(), runner=_Runner(), prepare=None, stopping=threading.Event(),  # type: ignore[arg-type]
                                broker=FakeChannel(), cancels=NoCancels())  # type: ignore[arg-type]
    healthy, report = check(consumer.progress(), visibility_timeout=60)
    assert not healthy and "consumer loop not started" in report["problems"]
    assert "model thread is not running" in report["problems"]


def test_readiness_follows_the_phases_and_liveness_holds_while_starting() -> None:
    readiness = Readiness()
    progress = {"now": replace(HEALTHY, loop_age_s=None)}
    readiness.watch(lambda: progress["now"])
    for phase in ("loading", "warming"):
        if phase == "warming":
            readiness.advance("warming", model_load_s=4.2)
        ready, report = readiness.readiness(visibility_timeout=60)
        assert not ready and report["phase"] == phase and report["problems"] == [f"worker is {phase}"]
        alive, report = readiness.liveness(visibility_timeout=60)
        assert alive and report["phase"] == phase  # a long model load is no reason to restart
    readiness.advance("ready")
    ready, report = readiness.readiness(visibility_timeout=60)
    assert not ready and "consumer loop not started" in report["problems"]  # ready only once the loop runs
    progress["now"] = HEALTHY
    ready, report = readiness.readiness(visibility_timeout=60)
    assert ready and report["status"] == "ready" and report["model_load_s"] == 4.2
    progress["now"] = replace(HEALTHY, model_thread_alive=False)
    assert readiness.readiness(visibility_timeout=60)[0] is False and readiness.liveness(visibility_timeout=60)[0] is False
    readiness.advance("stopping")
    assert readiness.readiness(visibility_timeout=60)[0] is False and readiness.liveness(visibility_timeout=60)[0] is True


def test_the_endpoint_serves_readyz_apart_from_healthz() -> None:
    port = free_port()
    server = serve_metrics(port, registry=WorkerMetrics(worker="w1", ledger=LedgerStats()).registry,
                           health=lambda: (True, {"status": "ok"}), ready=lambda: (False, {"status": "not ready"}))
    try:
        assert get(f"http://127.0.0.1:{port}/healthz")[0] == 200
        assert get(f"http://127.0.0.1:{port}/readyz") == (503, b'{"status": "not ready"}')
    finally:
        server.shutdown()
        server.server_close()
