"""Our own services fail under load: Redis restarts, S3 refuses or answers 503, the result backend goes away."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from producer.client import VQAClient
from producer.errors import BackendUnavailable
from tests.reliability.helpers import SLOW_GENERATION, submit, wait_until
from tests.reliability.history import History
from tests.support.faulty_proxy import FaultyProxy
from worker.dev.services import RedisServer, S3Server, WorkerProcess

pytestmark = pytest.mark.slow


class Producer(threading.Thread):
    """Submits 5 new jobs every 50 ms; a refused submission is retried as is (same jobs, same ids)."""

    def __init__(self, client: VQAClient, image_base_url: str) -> None:
        super().__init__(daemon=True)
        self.client = client
        self.url = f"{image_base_url}/tiny.png"
        self.accepted: list[str] = []
        self.accepted_at: dict[str, float] = {}
        self.refused = 0
        self.slowest_submit_s = 0.0
        self.stopping = threading.Event()

    def run(self) -> None:
        sent = 0
        while not self.stopping.is_set():
            requests = [{"image_url": self.url, "question": f"restart {sent + i}: what is shown?"} for i in range(5)]
            asked = time.monotonic()
            try:
                ids = self.client.submit_many(requests)
            except BackendUnavailable:
                self.refused += 1
                time.sleep(0.1)
                continue
            finally:
                self.slowest_submit_s = max(self.slowest_submit_s, time.monotonic() - asked)
            now = time.time()
            self.accepted += ids
            self.accepted_at.update(dict.fromkeys(ids, now))
            sent += 5
            time.sleep(0.05)


def test_redis_restart_under_load_loses_no_accepted_submission(
    rel_env: dict[str, str],
    image_base_url: str,
    client_for: Callable[[dict[str, str]], VQAClient],
    start_workers: Callable[..., list[WorkerProcess]],
    history_for: Callable[..., History],
    figures: Callable[..., dict[str, Any]],
) -> None:
    server = RedisServer().start()  # appendonly yes, appendfsync always
    try:
        env = {**rel_env, "VQA_BROKER_URL": server.url, "VQA_RESULT_BACKEND": server.url}
        history = history_for(env)
        workers = start_workers(env, ["a", "b"])
        producer = Producer(client_for(env), image_base_url)
        started = time.monotonic()
        producer.start()
        time.sleep(2.0)
        server.restart(down_s=1.0, kill=True)  # SIGKILL: only what AOF fsynced survives
        back_at = time.time()
        time.sleep(3.0)
        producer.stopping.set()
        producer.join(timeout=60)
        history.wait(producer.accepted, timeout=120)
        wall_s = time.monotonic() - started

        audit = history.audit(producer.accepted)
        after = [job_id for job_id in producer.accepted if producer.accepted_at[job_id] > back_at]
        first_after = min(audit.finished_at([job_id]) for job_id in after)
        figures(
            "4. Redis restart (AOF)",
            **audit.summary(),
            recovery_s=round(first_after - back_at, 1),
            wall_s=round(wall_s, 1),
            refused_submissions=producer.refused,
            slowest_submission_s=round(producer.slowest_submit_s, 1),
            accepted_after_restart=len(after),
        )
        assert audit.lost == [] and audit.disagreements == []
        assert audit.failed == {}, [audit.records[job_id]["error"] for job_id in audit.failed]
        assert audit.duplicate_records == 0
        assert after, "the producer got nothing accepted after the restart"
        for worker in workers:
            assert worker.proc is not None and worker.proc.poll() is None, "workers reconnect by themselves"
    finally:
        server.cleanup()


def test_s3_down_then_failing_loses_nothing(
    rel_env: dict[str, str],
    image_base_url: str,
    s3_server: S3Server,
    client_for: Callable[[dict[str, str]], VQAClient],
    start_workers: Callable[..., list[WorkerProcess]],
    history_for: Callable[..., History],
    figures: Callable[..., dict[str, Any]],
) -> None:
    proxy = FaultyProxy(s3_server.url).start()
    try:
        env = {**rel_env, "VQA_S3_ENDPOINT_URL": proxy.url}
        client = client_for(env)
        history = history_for(env, s3_url=s3_server.url)
        start_workers(env, ["a", "b"])
        started = time.monotonic()
        ids = submit(client, image_base_url, 80, tag="s3", generation=SLOW_GENERATION)
        wait_until(lambda: len(history.finished(ids)) >= 8, timeout=60, what="first records")
        proxy.set_mode("refuse")
        time.sleep(2.5)
        proxy.set_mode("error")
        time.sleep(2.5)
        proxy.set_mode("pass")
        back_at = time.time()
        done_during = len(history.finished(ids))
        history.wait(ids, timeout=120)
        wall_s = time.monotonic() - started

        audit = history.audit(ids)
        figures(
            "5. S3 refused, then 503",
            **audit.summary(),
            recovery_s=round(audit.finished_at(ids) - back_at, 1),
            wall_s=round(wall_s, 1),
            outage_s=5.0,
            requests_refused=proxy.requests["refuse"],
            requests_503=proxy.requests["error"],
        )
        assert proxy.requests["refuse"] > 0 and proxy.requests["error"] > 0
        assert done_during < len(ids)
        assert audit.lost == [] and audit.disagreements == []
        assert audit.failed == {}, "an outage of our own storage never fails a job"
        assert audit.duplicate_records == 0
    finally:
        proxy.stop()


def test_result_backend_down_then_back_agrees_with_s3(
    rel_env: dict[str, str],
    image_base_url: str,
    client_for: Callable[[dict[str, str]], VQAClient],
    start_workers: Callable[..., list[WorkerProcess]],
    history_for: Callable[..., History],
    figures: Callable[..., dict[str, Any]],
) -> None:
    backend = RedisServer().start()  # a second redis-server, the backend only
    try:
        env = {**rel_env, "VQA_RESULT_BACKEND": backend.url}
        client = client_for(env)
        history = history_for(env)
        start_workers(env, ["a", "b"])
        started = time.monotonic()
        ids = submit(client, image_base_url, 80, tag="backend", generation=SLOW_GENERATION)
        wait_until(lambda: len(history.finished(ids)) >= 8, timeout=60, what="first records")
        backend.stop(kill=True)
        time.sleep(4.0)
        backend.start()  # same port and AOF: the states written before come back
        back_at = time.time()
        history.wait(ids, timeout=120)
        wall_s = time.monotonic() - started

        audit = history.audit(ids)
        figures(
            "8. result backend down",
            **audit.summary(),
            recovery_s=round(audit.finished_at(ids) - back_at, 1),
            wall_s=round(wall_s, 1),
            outage_s=4.0,
        )
        assert audit.lost == [] and audit.failed == {}
        assert audit.disagreements == [], "the backend holds the same record as S3 for every job"
        assert audit.duplicate_records == 0
    finally:
        backend.cleanup()
