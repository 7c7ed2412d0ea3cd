"""``vqa exporter``: the fleet's signals from Redis, for Prometheus and autoscalers.

Worker metrics say what each worker did; these say what waits for the fleet as a whole, read
from Redis at each scrape (a handful of commands in one pipeline):

    vqa_queue_backlog{queue, lane}              messages waiting in each priority lane's list
    vqa_queue_oldest_age_seconds{queue, lane}   age of the oldest waiting job (0 when the lane is empty)
    vqa_queue_dead_letters{queue}               entries the workers refused (``vqa dead-letters``)
    vqa_exporter_redis_up                       1 when the last scrape reached Redis

``lane`` is kombu's priority step (0, 3, 6, 9; producer/keys.py), served in that order. A job's
age is Redis's clock minus the job's ``submitted_at``: what an SLO on queueing time watches, and
what to scale on besides the backlog (deploy/k8s/ uses the lists' length for KEDA).
"""

from __future__ import annotations

import base64
import json
import logging
import signal
import threading
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import redis
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from producer import keys
from producer.connections import redis_client
from producer.settings import Settings

log = logging.getLogger(__name__)


class QueueCollector(Collector):
    """Backlog, oldest job's age and dead letters of one queue, read from Redis at scrape time."""

    def __init__(self, client: redis.Redis, *, queue: str) -> None:
        self.client = client
        self.queue = queue
        self.lanes = list(zip(keys.PRIORITY_STEPS, keys.priority_queue_keys(queue), strict=True))

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("vqa_exporter_redis_up", "1 when the last scrape reached Redis.")
        try:
            now, lanes, dead = self._read()
        except redis.RedisError as exc:
            log.warning("cannot read the queue from Redis: %s: %s", type(exc).__name__, exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        backlog = GaugeMetricFamily("vqa_queue_backlog", "Messages waiting in the queue, per priority lane.", labels=["queue", "lane"])
        age = GaugeMetricFamily("vqa_queue_oldest_age_seconds", "Age of the oldest waiting job, per priority lane (0 when empty).",
                                labels=["queue", "lane"])
        for step, length, oldest in lanes:
            backlog.add_metric([self.queue, str(step)], length)
            submitted = submitted_at(oldest) if oldest is not None else None
            if length == 0:
                age.add_metric([self.queue, str(step)], 0.0)
            elif submitted is not None:
                age.add_metric([self.queue, str(step)], max(0.0, now - submitted.timestamp()))
        yield backlog
        yield age
        letters = GaugeMetricFamily("vqa_queue_dead_letters", "Queue entries refused by the workers and kept for inspection.",
                                    labels=["queue"])
        letters.add_metric([self.queue], dead)
        yield letters

    def _read(self) -> tuple[float, list[tuple[int, int, bytes | None]], int]:
        pipe = self.client.pipeline(transaction=False)
        pipe.time()
        for _, key in self.lanes:
            pipe.llen(key)
            pipe.lindex(key, -1)  # producers LPUSH, workers RPOP: the tail is the oldest
        pipe.llen(keys.dead_letters_key(self.queue))
        replies = pipe.execute()
        seconds, micros = replies[0]
        lanes = [(step, int(replies[1 + 2 * n]), replies[2 + 2 * n]) for n, (step, _) in enumerate(self.lanes)]
        return seconds + micros / 1e6, lanes, int(replies[-1])


def submitted_at(raw: bytes) -> datetime | None:
    """The ``submitted_at`` of the job in a queued Celery message (kombu's envelope, base64 JSON body); None if it has none."""
    try:
        envelope = json.loads(raw)
        body: Any = envelope["body"]
        if envelope.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        _args, kwargs, _embed = json.loads(body)
        return datetime.fromisoformat(kwargs["job"]["submitted_at"])
    except (ValueError, KeyError, TypeError):  # signed, foreign or malformed: no age for it
        return None


def run_exporter(settings: Settings, *, host: str, port: int) -> None:
    """Serve /metrics on host:port until SIGTERM or SIGINT. Blocks."""
    client = redis_client(settings.broker_url, master_name=settings.sentinel_master_name)
    registry = CollectorRegistry()
    registry.register(QueueCollector(client, queue=settings.queue))
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    server, _thread = start_http_server(port, addr=host, registry=registry)
    log.info("exporter for queue %r on %s:%d/metrics", settings.queue, host, port)
    print(f"vqa exporter listening on {host}:{port}", flush=True)  # tests wait for this line
    stop.wait()
    server.shutdown()
    client.close()
