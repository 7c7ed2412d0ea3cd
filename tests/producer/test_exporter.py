"""``vqa exporter``: backlog per priority lane, the oldest job's age and dead letters, read from a real Redis."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from datetime import timedelta

import pytest
import redis
from prometheus_client import CollectorRegistry, generate_latest

from producer import keys
from producer.exporter import QueueCollector, submitted_at
from producer.messages import TaskMessages
from producer.schema import utcnow
from tests.support.http import get
from tests.worker.test_metrics import _job
from worker.dev.services import free_port, wait_for_port


def _scrape(client: redis.Redis) -> str:
    registry = CollectorRegistry()
    registry.register(QueueCollector(client, queue="vqa"))
    return generate_latest(registry).decode()


def _value(text: str, sample: str) -> float:
    match = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.MULTILINE)
    assert match, f"{sample} missing from:\n{text}"
    return float(match.group(1))


def test_backlog_and_age_per_lane(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    messages = TaskMessages(queue="vqa", reply_to="r")
    old = _job("old").model_copy(update={"submitted_at": utcnow() - timedelta(seconds=120)})
    new = _job("new").model_copy(update={"submitted_at": utcnow() - timedelta(seconds=5)})
    client.lpush("vqa", messages.encode(old), messages.encode(new))  # old first: the tail a worker takes next
    client.lpush(keys.priority_queue_keys("vqa")[2], messages.encode(new))  # lane 6
    client.lpush(keys.priority_queue_keys("vqa")[3], b"not a celery message")  # lane 9: no age to tell
    client.lpush(keys.dead_letters_key("vqa"), json.dumps({"reason": "x"}))
    text = _scrape(client)
    assert _value(text, "vqa_exporter_redis_up") == 1
    assert [_value(text, f'vqa_queue_backlog{{lane="{lane}",queue="vqa"}}') for lane in (0, 3, 6, 9)] == [2, 0, 1, 1]
    assert 119 < _value(text, 'vqa_queue_oldest_age_seconds{lane="0",queue="vqa"}') < 150
    assert _value(text, 'vqa_queue_oldest_age_seconds{lane="3",queue="vqa"}') == 0  # empty
    assert 4 < _value(text, 'vqa_queue_oldest_age_seconds{lane="6",queue="vqa"}') < 60
    assert 'lane="9"' not in "".join(line for line in text.splitlines() if line.startswith("vqa_queue_oldest"))
    assert _value(text, 'vqa_queue_dead_letters{queue="vqa"}') == 1
    client.close()


def test_redis_away_is_a_metric_not_an_error() -> None:
    port = free_port()  # nothing listens there
    text = _scrape(redis.Redis(port=port, socket_connect_timeout=0.5))
    assert _value(text, "vqa_exporter_redis_up") == 0 and "vqa_queue_backlog" not in text


def test_a_signed_or_foreign_message_has_no_age() -> None:
    assert submitted_at(b'{"body": "bm90IGpzb24=", "properties": {"body_encoding": "base64"}}') is None
    assert submitted_at(b"[1, 2]") is None


@pytest.mark.slow
def test_the_exporter_command_serves_the_metrics(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    client.lpush("vqa", TaskMessages(queue="vqa", reply_to="r").encode(_job("j")))
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "producer.cli", "exporter", "--host", "127.0.0.1", "--port", str(port)],
                            env={**os.environ, "VQA_BROKER_URL": redis_url}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, proc=proc)
        status, body = get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200 and _value(body.decode(), 'vqa_queue_backlog{lane="0",queue="vqa"}') == 1
    finally:
        proc.terminate()
        started = time.monotonic()
        output, _ = proc.communicate(timeout=10)
        assert proc.returncode == 0 and time.monotonic() - started < 5, output.decode()
        client.close()
