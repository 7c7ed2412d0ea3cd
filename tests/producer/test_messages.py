"""The bulk enqueue path: hand-built task messages that kombu, Celery and our worker read like send_task's."""

from __future__ import annotations

import base64
import gc
import json
from collections.abc import Callable

import pytest
import redis
from kombu import Connection, Consumer, Queue

from producer import keys, messages
from producer.client import VQAClient
from producer.errors import BackendUnavailable
from worker.intake import decode_task_message
from worker.dev.services import WorkerProcess

# Where a job submitted without a priority is queued (producer/keys.py PRIORITIES).
DEFAULT_LANE = keys.priority_queue_key("vqa", keys.DEFAULT_PRIORITY)


def _env(redis_url: str) -> dict[str, str]:
    return {"VQA_BROKER_URL": redis_url, "VQA_RESULT_BACKEND": redis_url, "VQA_MAX_NEW_TOKENS": "4"}


def _requests(count: int, *, prefix: str = "q") -> list[dict[str, str]]:
    return [{"image_url": f"https://images.example/{i}.png", "question": f"{prefix} {i}?"} for i in range(count)]


def test_message_matches_what_send_task_writes(redis_url: str, client_for: Callable[[dict[str, str]], VQAClient]) -> None:
    client = client_for(_env(redis_url))
    broker = redis.Redis.from_url(redis_url)
    job = client.build_job("https://images.example/cat.png", "What is it?")
    sent = client.app.send_task(keys.TASK_NAME, kwargs={"job": job.model_dump(mode="json")}, task_id=job.job_id, queue="vqa")
    # Its AsyncResult unsubscribes from the result channel when collected: do it while Redis is up.
    del sent
    gc.collect()
    theirs = json.loads(broker.rpop(DEFAULT_LANE))
    client.submit_jobs([job])
    ours = json.loads(broker.rpop(DEFAULT_LANE))

    assert set(ours) == set(theirs)
    for field in ("content-encoding", "content-type"):
        assert ours[field] == theirs[field]
    assert json.loads(base64.b64decode(ours["body"])) == json.loads(base64.b64decode(theirs["body"]))
    # Display-only: Celery's saferepr and our repr may differ in truncation, nothing else.
    assert ours["headers"].pop("kwargsrepr").startswith("{'job': {")
    theirs["headers"].pop("kwargsrepr")
    # Celery 5.6 writes ignore_result=False, 5.7 None: both mean "keep the result".
    assert not ours["headers"].pop("ignore_result") and not theirs["headers"].pop("ignore_result")
    assert ours["headers"] == theirs["headers"]
    assert ours["properties"].pop("delivery_tag") != theirs["properties"].pop("delivery_tag")
    assert ours["properties"] == theirs["properties"]


def test_kombu_consumer_reads_bulk_messages_in_order(
    redis_url: str, client_for: Callable[[dict[str, str]], VQAClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(messages, "CHUNK", 3)  # several LPUSH commands; order must hold across them
    client = client_for(_env(redis_url))
    ids = client.submit_many(_requests(8))
    received: list[str] = []

    def on_message(message: object) -> None:
        received.append(decode_task_message(message).job_id)  # type: ignore[arg-type] - a kombu Message reads the same
        message.ack()  # type: ignore[attr-defined]

    with Connection(redis_url) as conn:
        with Consumer(conn.channel(), queues=[Queue("vqa", routing_key="vqa")], on_message=on_message, accept=["json"]):
            while len(received) < len(ids):
                conn.drain_events(timeout=5)
    assert received == ids


def test_dedupe_holds_on_the_bulk_path(redis_url: str, client_for: Callable[[dict[str, str]], VQAClient]) -> None:
    client = client_for(_env(redis_url))
    broker = redis.Redis.from_url(redis_url)
    requests = _requests(5)
    ids = client.submit_many(requests + requests[:2])  # duplicates inside one call
    assert len(ids) == 7 and ids[5:] == ids[:2]
    assert broker.llen(DEFAULT_LANE) == 5
    assert client.submit_many(requests) == ids[:5]  # queued already: nothing new
    assert broker.llen(DEFAULT_LANE) == 5
    keyed = client.submit_many([{**requests[0], "idempotency_key": "k1"}, {**requests[1], "idempotency_key": "k1"}])
    assert keyed[0] == keyed[1]
    assert broker.llen(DEFAULT_LANE) == 6


def test_publish_failure_releases_the_claims(
    redis_url: str, client_for: Callable[[dict[str, str]], VQAClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    client = client_for(_env(redis_url))
    broker = redis.Redis.from_url(redis_url)

    def refuse(*args: object) -> None:
        raise redis.ConnectionError("broker went away")

    monkeypatch.setattr(client._redis, "lpush", refuse)
    with pytest.raises(BackendUnavailable):
        client.submit_many(_requests(3))
    assert broker.keys(keys.submitted_key("*")) == []
    monkeypatch.undo()
    assert len(client.submit_many(_requests(3))) == 3
    assert broker.llen(DEFAULT_LANE) == 3


@pytest.mark.slow
def test_worker_answers_bulk_published_jobs_once(
    stack_env: dict[str, str],
    image_base_url: str,
    client_for: Callable[[dict[str, str]], VQAClient],
    start_worker: Callable[..., WorkerProcess],
) -> None:
    client = client_for(stack_env)
    names = ["small.png", "wide.jpg", "tall.png", "square.jpg"]
    requests = [{"image_url": f"{image_base_url}/{names[i % 4]}", "question": f"Bulk question {i}?"} for i in range(10)]
    ids = client.submit_many(requests)
    start_worker(stack_env)
    records = [client.wait(job_id, timeout=180) for job_id in ids]
    assert all(record.status == "succeeded" and record.answer for record in records)
    assert max(record.batch_size for record in records) > 1

    broker = redis.Redis.from_url(stack_env["VQA_BROKER_URL"])
    assert client.submit_many(requests) == ids  # finished: same ids, nothing enqueued, nothing recomputed
    assert broker.llen(DEFAULT_LANE) == 0
    assert all(int(broker.get(keys.executions_key(job_id))) == 1 for job_id in ids)
    # client.wait leaves AsyncResults in reference cycles; their __del__ talks to Redis, so
    # collect them now, while this test's Redis is still up.
    gc.collect()
