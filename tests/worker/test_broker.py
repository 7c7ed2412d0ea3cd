"""The reliable queue on a real redis-server: a taken message is always queued or owned by one worker, never neither."""

from __future__ import annotations

import base64
import json
import time
import uuid
from pathlib import Path

import pytest
import redis

from producer import keys
from producer.messages import TaskMessages
from producer.schema import GenerationSettings, Job, utcnow
from worker.broker import RedisQueue, held_messages, reconnect_delay
from worker.dev.services import RedisServer


HEARTBEAT_TIMEOUT_S = 1.0


@pytest.fixture()
def queue(redis_url: str) -> RedisQueue:
    q = RedisQueue.from_url(redis_url, queue="vqa", consumer_id="w-a", heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S)
    yield q
    q.client.close()


@pytest.fixture()
def other(redis_url: str) -> RedisQueue:
    """A second worker on the same queue: it restores what a silent worker held."""
    q = RedisQueue.from_url(redis_url, queue="vqa", consumer_id="w-b", heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S)
    yield q
    q.client.close()


def _unacked(queue: RedisQueue) -> int:
    return int(queue.client.hlen(keys.worker_unacked_key("vqa", queue.consumer_id)))


def _raw(i: int) -> str:
    """A job's message as it sits in the bare list (Celery priority 0), where these tests push it."""
    job = Job(
        job_id=f"job-{i}",
        image_url="https://images.example/a.png",
        question=f"question {i}?",
        model="m",
        generation=GenerationSettings(max_new_tokens=4),
        submitted_at=utcnow(),
    )
    return TaskMessages(queue="vqa", reply_to=str(uuid.uuid4())).encode(job, priority=0)


def test_pop_takes_oldest_first_and_records_each_as_this_workers(queue: RedisQueue) -> None:
    client = queue.client
    client.lpush("vqa", *(_raw(i) for i in range(5)))  # as producers push
    taken = queue.pop(3)
    assert [json.loads(d.raw)["headers"]["id"] for d in taken] == ["job-0", "job-1", "job-2"]
    assert client.llen("vqa") == 2 and _unacked(queue) == 3
    assert set(client.hkeys(keys.worker_unacked_key("vqa", "w-a"))) == {d.tag.encode() for d in taken}
    assert client.zscore(keys.heartbeats_key("vqa"), "w-a") is not None  # taking is a heartbeat
    assert client.hlen(keys.unacked_key("vqa")) == 0  # nothing goes to the old shared set
    assert queue.pop(10)[-1] and queue.pop(10) == []


def test_the_same_message_delivered_twice_gets_two_delivery_ids(queue: RedisQueue) -> None:
    raw = _raw(1)
    queue.client.lpush("vqa", raw, raw)  # a duplicate publish
    first, second = queue.pop(2)
    assert first.raw == second.raw and first.tag != second.tag and _unacked(queue) == 2


def test_ack_forgets_and_requeue_puts_back_at_the_head(queue: RedisQueue) -> None:
    queue.client.lpush("vqa", *(_raw(i) for i in range(3)))
    first, second = queue.pop(2)
    assert queue.ack(first.tag) and not queue.ack(first.tag)
    assert queue.requeue(second.tag) and not queue.requeue(second.tag)
    assert _unacked(queue) == 0
    [again] = queue.pop(1)
    assert again.raw == second.raw and again.tag != second.tag  # back at the head; a new delivery


def test_a_batch_of_acks_answers_per_tag(queue: RedisQueue) -> None:
    queue.client.lpush("vqa", *(_raw(i) for i in range(3)))
    first, second, third = queue.pop(3)
    assert queue.ack(second.tag)
    assert queue.ack_many([first.tag, second.tag, third.tag]) == [True, False, True]  # the second was no longer held
    assert _unacked(queue) == 0 and queue.client.llen("vqa") == 0


def test_a_silent_workers_messages_come_back_and_its_late_settles_are_refused(queue: RedisQueue, other: RedisQueue) -> None:
    queue.client.lpush("vqa", *(_raw(i) for i in range(3)))
    held = queue.pop(3)
    assert other.restore_expired(1800) == 0  # its heartbeat is fresh
    time.sleep(HEARTBEAT_TIMEOUT_S + 0.2)
    assert other.restore_expired(1800) == 3
    assert _unacked(queue) == 0 and queue.client.zscore(keys.heartbeats_key("vqa"), "w-a") is None
    assert not queue.ack(held[0].tag) and not queue.requeue(held[1].tag)  # no longer its own: refused
    assert queue.client.llen("vqa") == 3  # and the refusals changed nothing
    assert {d.raw for d in other.pop(3)} == {d.raw for d in held}
    assert queue.heartbeat()  # its next beat learns it had been presumed dead


def test_a_live_worker_keeps_its_messages_however_long_it_holds_them(queue: RedisQueue, other: RedisQueue) -> None:
    queue.client.lpush("vqa", _raw(1))
    queue.pop(1)
    for _ in range(3):
        time.sleep(HEARTBEAT_TIMEOUT_S / 2)
        assert not queue.heartbeat()
        assert other.restore_expired(5) == 0 and queue.restore_expired(5) == 0
    assert _unacked(queue) == 1


def test_a_worker_never_restores_its_own_messages(queue: RedisQueue) -> None:
    queue.client.lpush("vqa", _raw(1))
    queue.pop(1)
    time.sleep(HEARTBEAT_TIMEOUT_S + 0.2)
    assert queue.restore_expired(5) == 0 and _unacked(queue) == 1  # it is running: it is alive


def test_messages_in_the_old_shared_set_come_back_after_the_visibility_timeout(queue: RedisQueue) -> None:
    """Migration: a worker of before recorded its messages in one shared hash + index; new workers restore them as old ones did."""
    raw = _raw(1)
    client = queue.client
    now = client.time()
    client.hset(keys.unacked_key("vqa"), "oldtag", raw)
    client.zadd(keys.unacked_index_key("vqa"), {"oldtag": now[0] + now[1] / 1e6})
    assert queue.restore_expired(60) == 0
    time.sleep(1.1)
    assert queue.restore_expired(1) == 1
    assert client.hlen(keys.unacked_key("vqa")) == 0 and client.zcard(keys.unacked_index_key("vqa")) == 0
    assert queue.pop(1)[0].raw == raw.encode()


def test_retiring_hands_back_what_is_held_and_drops_the_heartbeat(queue: RedisQueue) -> None:
    queue.client.lpush("vqa", *(_raw(i) for i in range(2)))
    queue.pop(2)
    assert queue.retire() == 2
    assert _unacked(queue) == 0 and queue.client.llen("vqa") == 2
    assert queue.client.zcard(keys.heartbeats_key("vqa")) == 0


def test_a_dead_letter_leaves_unacked_with_its_reason(queue: RedisQueue, other: RedisQueue) -> None:
    queue.client.lpush("vqa", b"not a message")
    [taken] = queue.pop(1)
    queue.dead_letter(taken.tag, taken.raw, reason="queue entry is not JSON")
    assert _unacked(queue) == 0
    [letter] = queue.dead_letters()
    assert letter["reason"] == "queue entry is not JSON" and letter["raw"] == "not a message" and letter["tag"] == taken.tag
    time.sleep(HEARTBEAT_TIMEOUT_S + 0.2)
    assert other.restore_expired(0) == 0 and other.pop(1) == []  # gone from the queue for good


def test_the_unacked_set_survives_a_redis_restart(tmp_path: Path) -> None:
    """AOF with fsync always: what was taken before the crash is still recorded after it."""
    # A server of its own: killing the session's Redis would end other tests' leftover client
    # threads mid-read, and their sockets would close unclosed during this test.
    server = RedisServer(data_dir=tmp_path).start()
    queue = RedisQueue.from_url(server.url, queue="vqa", consumer_id="w-a", heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S)
    try:
        queue.client.lpush("vqa", *(_raw(i) for i in range(4)))
        taken = queue.pop(2)
        server.restart(kill=True)
        assert _unacked(queue) == 2 and queue.client.llen("vqa") == 2
        assert len(held_messages(queue.client, "vqa")) == 2
        taken += queue.pop(1)
        for delivery in taken:
            assert queue.ack(delivery.tag)  # acked after the restart, by tag
        assert _unacked(queue) == 0 and queue.client.llen("vqa") == 1
    finally:
        queue.client.close()
        server.stop(kill=True)


class _ReplyLost:
    """The pop script as Redis runs it, with the reply lost on the way back (a crash after the AOF write)."""

    def __init__(self, script, *, ran: bool) -> None:
        self.script, self.ran = script, ran

    def __call__(self, **kwargs):
        if self.ran:
            self.script(**kwargs)
        raise redis.ConnectionError("Connection closed by server.")


@pytest.mark.parametrize("ran", [True, False], ids=["pop-ran", "pop-never-ran"])
def test_a_pop_whose_reply_was_lost_loses_no_message(queue: RedisQueue, ran: bool) -> None:
    """Its messages are delivered by the next pop; a new pop never reuses its ids (that overwrote them)."""
    ids = {f"job-{i}" for i in range(6)}
    queue.client.lpush("vqa", *(_raw(i) for i in range(6)))
    real = queue._pop
    queue._pop = _ReplyLost(real, ran=ran)
    with pytest.raises(redis.ConnectionError):
        queue.pop(3)
    queue._pop = real
    taken = queue.pop(4) + queue.pop(4)
    assert sorted(json.loads(d.raw)["headers"]["id"] for d in taken) == sorted(ids)
    assert len({d.tag for d in taken}) == 6 and _unacked(queue) == 6
    assert queue.pop(4) == []
    # Found: no longer looked for. Never ran: looked for a while longer (Redis may run it late).
    assert len(queue._in_doubt) == (0 if ran else 1)
    for delivery in taken:
        assert queue.ack(delivery.tag)
    assert _unacked(queue) == 0 and len(held_messages(queue.client, "vqa")) == 0


def _send_with_priority(redis_url: str, priorities: list[int]) -> list[str]:
    """Publish through Celery's own send_task, so the lists are the ones kombu writes."""
    import gc

    from producer.celery_app import make_celery
    from producer.settings import Settings

    app = make_celery(Settings(broker_url=redis_url, result_backend=redis_url))
    ids = []
    for i, priority in enumerate(priorities):
        job = json.loads(base64.b64decode(json.loads(_raw(i))["body"]))[1]["job"]
        sent = app.send_task(keys.TASK_NAME, kwargs={"job": job}, task_id=f"p{priority}-{i}", queue="vqa", priority=priority)
        ids.append(sent.id)
        del sent
    gc.collect()  # AsyncResults unsubscribe when collected: while Redis is up
    app.close()
    return ids


def test_messages_sent_with_a_celery_priority_are_consumed_in_kombus_order(redis_url: str, queue: RedisQueue) -> None:
    # In Celery on Redis, 0 is the highest priority; kombu keeps steps 0-2, 3-5, 6-8 and 9 in
    # separate lists and serves them in that order.
    _send_with_priority(redis_url, [9, 0, 4, 7, 2, 5])
    assert sorted(queue.client.keys("vqa*")) == sorted(k.encode() for k in keys.priority_queue_keys("vqa"))
    taken = queue.pop(10)
    assert [json.loads(d.raw)["headers"]["id"] for d in taken] == ["p0-1", "p2-4", "p4-2", "p5-5", "p7-3", "p9-0"]
    assert _unacked(queue) == 6 and queue.pop(10) == []


def test_a_prioritised_message_goes_back_to_its_own_list(redis_url: str, queue: RedisQueue, other: RedisQueue) -> None:
    _send_with_priority(redis_url, [7, 7])
    handed_back, expired = queue.pop(2)
    step6 = keys.priority_queue_keys("vqa")[2]
    assert queue.requeue(handed_back.tag)
    assert queue.client.llen(step6) == 1 and queue.client.llen("vqa") == 0
    time.sleep(HEARTBEAT_TIMEOUT_S + 0.2)
    assert other.restore_expired(1800) == 1  # the silent worker's
    assert queue.client.llen(step6) == 2 and queue.client.llen("vqa") == 0
    # Each went back to the head of the list: the last one put back is served first.
    assert [d.raw for d in other.pop(2)] == [expired.raw, handed_back.raw]


def test_no_lane_starves_under_a_flood_of_high_priority_jobs(queue: RedisQueue) -> None:
    """Every LOWER_LANE_EVERY-th pop starts from a lower lane, each lower lane in turn (worker/broker.py)."""
    every = queue._lower_lane_every
    encoder = TaskMessages(queue="vqa", reply_to="r")

    def push(name: str, priority: int, count: int) -> None:
        for i in range(count):
            job = Job(job_id=f"{name}-{i}", image_url="https://images.example/a.png", question=f"{name} {i}?", model="m",
                      generation=GenerationSettings(max_new_tokens=4), submitted_at=utcnow())
            queue.client.lpush(encoder.key_for(priority), encoder.encode(job, priority=priority))

    push("high", keys.PRIORITIES["high"], 5 * every)
    push("default", keys.PRIORITIES["default"], 2)
    push("low", keys.PRIORITIES["low"], 2)
    served = [json.loads(queue.pop(1)[0].raw)["headers"]["id"].split("-")[0] for _ in range(5 * every)]
    turns = {pop: served[pop - 1] for pop in range(every, 5 * every + 1, every)}
    # Turns go to the lists below the top in rotation: 3-5, 6-8, 9 (empty: on to the top), 3-5 again.
    assert turns == {every: "default", 2 * every: "low", 3 * every: "high", 4 * every: "default", 5 * every: "low"}
    assert served.count("high") == 5 * every - 4


def test_reconnect_delay_looks_again_soon_then_backs_off_to_ten_seconds() -> None:
    waits, wait = [], 0.0
    for _ in range(12):
        wait = reconnect_delay(wait)
        waits.append(wait)
    looks = [round(sum(waits[: n + 1]), 2) for n in range(5)]
    assert looks == [0.25, 0.62, 1.19, 2.03, 3.3]  # a promotion ~1.8 s after the kill is found at 2.0 s
    assert waits[-1] == 10.0 and max(waits) == 10.0
