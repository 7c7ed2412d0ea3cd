"""The ``vqa webhooks`` process: read completion events in a consumer group, deliver signed POSTs, retry on a schedule.

Per Standard Webhooks: headers ``webhook-id`` (stable across retries), ``webhook-timestamp``
(this try's) and ``webhook-signature`` (``v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">``,
one per secret in VQA_WEBHOOK_SECRETS, space-separated, so receivers can rotate), made with the
specification's reference library. A 2xx ends a delivery; 410 Gone ends it and dead-letters it
(no more tries to that URL); a timeout, a connection error or any other status retries after the
next delay of VQA_WEBHOOK_RETRY_SCHEDULE; after the last, the delivery is dead-lettered.

Deliveries run on a thread pool with at most VQA_WEBHOOK_PER_HOST in flight to one host, and
waiting retries sit in a Redis sorted set, so one slow receiver never delays the others.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime
from urllib.parse import urlsplit

import redis
from standardwebhooks.webhooks import Webhook

from producer.errors import UpstreamUnavailable, WebhookRefused
from producer.events import decode_entry, default_consumer, ensure_group
from producer.settings import Settings
from producer.webhooks.deliveries import Deliveries, Delivery
from producer.webhooks.post import post
from worker.fetch.netguard import HostRules

log = logging.getLogger(__name__)

_STALE_MS = 60_000  # a consumer's unacked event older than this is claimed by another (XAUTOCLAIM)
_BUSY_HOST_DELAY_S = 0.1


def sign(delivery: Delivery, secrets: list[Webhook], *, now: datetime) -> dict[str, str]:
    signatures = " ".join(secret.sign(delivery.webhook_id, now, delivery.body) for secret in secrets)
    return {"webhook-id": delivery.webhook_id, "webhook-timestamp": str(int(now.timestamp())), "webhook-signature": signatures}


class Dispatcher:
    """One dispatcher; several may run (each a consumer of the same group)."""

    def __init__(self, client: redis.Redis, *, settings: Settings, consumer: str | None = None, stopping: threading.Event | None = None) -> None:
        if not settings.webhook_secrets:
            raise ValueError("VQA_WEBHOOK_SECRETS is empty: deliveries could not be signed")
        self.client = client
        self.settings = settings
        self.consumer = consumer or default_consumer()
        self.stopping = stopping or threading.Event()
        self.deliveries = Deliveries(client, dead_stream=settings.webhook_dead_stream, done_ttl_s=settings.events_dedupe_ttl_s)
        self._secrets = [Webhook(secret.get_secret_value()) for secret in settings.webhook_secrets]
        self._rules = HostRules(tuple(settings.allowed_hosts))
        self._pool = ThreadPoolExecutor(max_workers=settings.webhook_concurrency, thread_name_prefix="vqa-webhook")
        self._lock = threading.Lock()
        self._hosts: Counter[str] = Counter()
        self._in_flight = 0
        self._lease_s = settings.webhook_timeout_s + settings.webhook_connect_timeout_s + 30
        self.delivered = 0

    def run(self) -> None:
        stream, group = self.settings.events_stream, self.settings.webhook_group
        ensure_group(self.client, stream, group)
        next_autoclaim = 0.0
        while not self.stopping.is_set():
            if time.monotonic() >= next_autoclaim:
                # Events a dead dispatcher read and never stored as deliveries.
                _cursor, entries, *_ = self.client.xautoclaim(stream, group, self.consumer, min_idle_time=_STALE_MS, count=100)
                self._accept(entries)
                next_autoclaim = time.monotonic() + 10
            replies = self.client.xreadgroup(group, self.consumer, {stream: ">"}, count=100, block=200)
            for _name, entries in replies or []:
                self._accept(entries)
            self._dispatch_due()
        self._pool.shutdown(wait=True)

    def _accept(self, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        for entry_id, fields in entries:
            if not fields:  # trimmed away (MAXLEN) while pending
                self.client.xack(self.settings.events_stream, self.settings.webhook_group, entry_id)
                continue
            event = decode_entry(entry_id, fields)
            delivery = Delivery.for_event(event) if event.get("webhook_url") else None
            self.deliveries.accept(delivery, stream=self.settings.events_stream, group=self.settings.webhook_group, entry_id=event["id"])

    def _dispatch_due(self) -> None:
        with self._lock:
            free = self.settings.webhook_concurrency - self._in_flight
        if free <= 0:
            return
        for delivery in self.deliveries.claim(limit=free, lease_s=self._lease_s):
            host = urlsplit(delivery.url).netloc.lower()
            with self._lock:
                if self._hosts[host] >= self.settings.webhook_per_host:
                    busy = True
                else:
                    busy = False
                    self._hosts[host] += 1
                    self._in_flight += 1
            if busy:
                self.deliveries.put_back(delivery, at=time.time() + _BUSY_HOST_DELAY_S)
                continue
            self._pool.submit(self._deliver, delivery, host)

    def _deliver(self, delivery: Delivery, host: str) -> None:
        try:
            self._attempt(delivery)
        except Exception:  # noqa: BLE001 - the delivery stays leased and comes due again
            log.exception("webhook delivery %s failed unexpectedly", delivery.webhook_id)
        finally:
            with self._lock:
                self._hosts[host] -= 1
                self._in_flight -= 1

    def _attempt(self, delivery: Delivery) -> None:
        settings = self.settings
        headers = sign(delivery, self._secrets, now=datetime.now(UTC))
        tried = replace(delivery, attempt=delivery.attempt + 1)
        try:
            status = post(delivery.url, delivery.body.encode(), headers, rules=self._rules, timeout_s=settings.webhook_timeout_s,
                          connect_timeout_s=settings.webhook_connect_timeout_s, max_response_bytes=settings.webhook_max_response_bytes)
        except WebhookRefused as exc:
            log.warning("webhook %s refused: %s", delivery.webhook_id, exc)
            self.deliveries.dead(replace(tried, last_error=str(exc)), reason="refused")
            return
        except UpstreamUnavailable as exc:
            self._failed(replace(tried, last_error=str(exc)))
            return
        if 200 <= status < 300:
            self.deliveries.succeeded(tried)
            self.delivered += 1
        elif status == 410:
            log.info("webhook %s: 410 Gone from %s; no more tries", delivery.webhook_id, delivery.url)
            self.deliveries.dead(replace(tried, last_error="HTTP 410 Gone"), reason="gone")
        else:
            self._failed(replace(tried, last_error=f"HTTP {status}"))

    def _failed(self, delivery: Delivery) -> None:
        schedule = self.settings.webhook_retry_schedule
        if delivery.attempt > len(schedule):
            log.warning("webhook %s: giving up after %d tries (%s)", delivery.webhook_id, delivery.attempt, delivery.last_error)
            self.deliveries.dead(delivery, reason="exhausted")
            return
        delay = schedule[delivery.attempt - 1]
        log.info("webhook %s: try %d failed (%s); next in %gs", delivery.webhook_id, delivery.attempt, delivery.last_error, delay)
        self.deliveries.retry(delivery, at=time.time() + delay)
