"""Submission claims on a real Redis: a resubmission of a queued job is a no-op, a failed publish never swallows a retry."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
import redis

from producer import client as client_module
from producer import keys
from producer.client import VQAClient
from producer.errors import BackendUnavailable

# Where a job submitted without a priority is queued (producer/keys.py PRIORITIES).
DEFAULT_LANE = keys.priority_queue_key("vqa", keys.DEFAULT_PRIORITY)

URL = "https://images.example/cat.png"


@pytest.fixture()
def make_client(redis_url: str, client_for: Callable[[dict[str, str]], VQAClient]) -> Callable[[], VQAClient]:
    env = {"VQA_BROKER_URL": redis_url, "VQA_RESULT_BACKEND": redis_url}
    return lambda: client_for(env)


def test_resubmitting_a_queued_job_publishes_nothing(make_client: Callable[[], VQAClient], redis_url: str) -> None:
    client = make_client()
    broker = redis.Redis.from_url(redis_url)
    job_id = client.submit(URL, "What is it?")
    assert broker.get(keys.submitted_key(job_id)) == b"queued"
    assert client.submit(URL, "What is it?") == job_id
    assert broker.llen(DEFAULT_LANE) == 1


def test_concurrent_submissions_of_the_same_jobs_publish_them_once(make_client: Callable[[], VQAClient], redis_url: str) -> None:
    requests = [{"image_url": URL, "question": f"q{i}?"} for i in range(300)]
    clients = [make_client(), make_client(), make_client()]
    results: list[list[str]] = [[] for _ in clients]
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, clients[i].submit_many(requests))) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results[0] == results[1] == results[2]
    assert redis.Redis.from_url(redis_url).llen(DEFAULT_LANE) == 300


def test_a_producer_publishes_its_own_claims_before_waiting_for_anothers(make_client: Callable[[], VQAClient], redis_url: str) -> None:
    # Two producers that each claimed part of the same jobs must not wait for each other before
    # publishing: that deadlocked them until the claims expired, then both published all (the
    # concurrent test above saw 600 messages for 300 jobs under load).
    client = make_client()
    broker = redis.Redis.from_url(redis_url)
    requests = [{"image_url": URL, "question": f"q{i}?"} for i in range(20)]
    theirs = [client.build_request(request) for request in requests[10:]]
    for job in theirs:  # another producer is publishing these right now
        broker.set(keys.submitted_key(job.job_id), "publishing:other", ex=60)
    submitting = threading.Thread(target=client.submit_many, args=(requests,))
    submitting.start()
    deadline = time.monotonic() + 5
    while broker.llen(DEFAULT_LANE) < 10 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert broker.llen(DEFAULT_LANE) == 10, "its own 10 were published while it waits for the other 10"
    assert submitting.is_alive()
    broker.mset({keys.submitted_key(job.job_id): "queued" for job in theirs})  # the other producer is done
    submitting.join(5)
    assert not submitting.is_alive() and broker.llen(DEFAULT_LANE) == 10


def test_a_claim_left_by_a_failed_publish_does_not_swallow_the_retry(
    make_client: Callable[[], VQAClient], redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client_module, "_PUBLISHING_TTL_S", 1)
    client = make_client()
    broker = redis.Redis.from_url(redis_url)
    job = client.build_job(URL, "Retried?")
    # What a producer leaves when Redis went away between claiming and publishing: a claim, no message.
    broker.set(keys.submitted_key(job.job_id), "publishing", ex=1)
    started = time.monotonic()
    assert client.submit(URL, "Retried?") == job.job_id
    assert broker.llen(DEFAULT_LANE) == 1, "the retry published the job once the stale claim expired"
    assert time.monotonic() - started < 5


def test_a_retry_by_the_same_client_takes_its_own_leftover_claim_at_once(make_client: Callable[[], VQAClient], redis_url: str) -> None:
    client = make_client()
    broker = redis.Redis.from_url(redis_url)
    job = client.build_job(URL, "Mine?")
    broker.set(keys.submitted_key(job.job_id), client._claim_token, ex=60)  # its publish failed, the cleanup too
    started = time.monotonic()
    assert client.submit(URL, "Mine?") == job.job_id
    assert broker.llen(DEFAULT_LANE) == 1 and time.monotonic() - started < 1
    assert broker.get(keys.submitted_key(job.job_id)) == b"queued"


def test_a_failed_publish_raises_and_frees_the_claim(make_client: Callable[[], VQAClient], redis_url: str) -> None:
    client = make_client()

    def refuse(*_args: object) -> None:
        raise redis.ConnectionError("broker gone")

    client._redis.lpush = refuse  # type: ignore[method-assign]
    with pytest.raises(BackendUnavailable):
        client.submit(URL, "Refused?")
    job = client.build_job(URL, "Refused?")
    assert redis.Redis.from_url(redis_url).get(keys.submitted_key(job.job_id)) is None
