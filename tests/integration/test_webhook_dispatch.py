"""The dispatcher's per-host limits, on a real redis-server and two real HTTP receivers (two hosts).

A slow receiver gets at most VQA_WEBHOOK_PER_HOST requests at once and never holds up another
host's deliveries; every event is delivered exactly once.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis

from producer.settings import Settings
from producer.webhooks.dispatcher import Dispatcher
from tests.integration.receiver import Receiver, payload_job, webhook_receiver
from worker.dev.services import RedisServer

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
PER_HOST = 2
SLOW_S = 0.4


@pytest.fixture()
def private_redis(tmp_path: Path) -> Iterator[redis.Redis]:
    # A server of its own: the deliveries' keys are global, and other tests' dispatchers share the session's.
    server = RedisServer(data_dir=tmp_path).start()
    client = redis.Redis.from_url(server.url)
    try:
        yield client
    finally:
        client.close()
        server.stop(kill=True)


def _add(client: redis.Redis, url: str, count: int) -> list[str]:
    job_ids = [str(uuid.uuid4()) for _ in range(count)]
    for job_id in job_ids:
        client.xadd("vqa:events", {"job_id": job_id, "status": "succeeded", "error_code": "", "bulk_id": "", "custom_id": "",
                                   "s3_bucket": "b", "s3_key": f"results/{job_id}.json",
                                   "finished_at": datetime.now(UTC).isoformat(), "webhook_url": url})
    return job_ids


def _until(receiver: Receiver, path: str, count: int, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while len(receiver.deliveries(path)) < count:
        assert time.monotonic() < deadline, f"{len(receiver.deliveries(path))} of {count} deliveries to {path}"
        time.sleep(0.01)
    return time.monotonic()


@pytest.mark.timeout(60)
def test_a_slow_host_gets_its_limit_and_delays_no_other(private_redis: redis.Redis) -> None:
    with webhook_receiver(SECRET) as slow, webhook_receiver(SECRET) as fast:
        slow.delays = {"/slow": SLOW_S}
        hosts = [receiver.url.removeprefix("http://") for receiver in (slow, fast)]
        settings = Settings(webhook_secrets=SECRET, allowed_hosts=",".join(hosts), webhook_per_host=PER_HOST, webhook_concurrency=8)
        stopping = threading.Event()
        dispatcher = Dispatcher(private_redis, settings=settings, consumer="d1", stopping=stopping)
        thread = threading.Thread(target=dispatcher.run, daemon=True)
        thread.start()
        try:
            begun = time.monotonic()
            slow_jobs = _add(private_redis, f"{slow.url}/slow", 8)  # first in the stream, all due before the fast ones
            fast_jobs = _add(private_redis, f"{fast.url}/fast", 40)
            fast_done = _until(fast, "/fast", 40, timeout=30)
            slow_done = _until(slow, "/slow", 8, timeout=30)
            time.sleep(0.5)  # a second delivery of anything would land by now
        finally:
            stopping.set()
            thread.join(timeout=30)

    # 8 slow answers, PER_HOST at a time: the last round arrives after 8 / 2 - 1 rounds of 0.4 s
    # (a call is recorded as it arrives). The 40 fast ones are all done well before.
    assert slow_done - begun >= (8 / PER_HOST - 1) * SLOW_S * 0.9
    assert fast_done < slow_done - SLOW_S, "the slow host held up the fast one"
    assert slow.most_at_once == PER_HOST and fast.most_at_once <= PER_HOST
    assert sorted(payload_job(call) for call in slow.deliveries("/slow")) == sorted(slow_jobs)
    assert sorted(payload_job(call) for call in fast.deliveries("/fast")) == sorted(fast_jobs)  # each once
    assert dispatcher.delivered == 48
