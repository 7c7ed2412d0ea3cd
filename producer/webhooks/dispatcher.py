"""The ``vqa webhooks`` process: read completion events in a consumer group, deliver signed POSTs, retry on a schedule.

Per Standard Webhooks: headers ``webhook-id`` (stable across retries), ``webhook-timestamp``
(this try's) and ``webhook-signature`` (``v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">``,
one per secret in VQA_WEBHOOK_SECRETS, space-separated, so receivers can rotate), made with the
specification's reference library. A 2xx ends a delivery; 410 Gone ends it and dead-letters it
(no more tries to that URL); a timeout, a connection error or any other status retries after the
next delay of VQA_WEBHOOK_RETRY_SCHEDULE; after the last, the delivery is dead-lettered.

Deliveries run on a thread pool with at most VQA_WEBHOOK_PER_HOST in flight to one host, and
waiting retries sit in a Redis sorted set, so one slow receiver never delays the others. Behind
each host's in-flight deliveries wait at most twice as many more, claimed and held here: the thread
that finishes one starts the next at once, and the loop wakes as soon as a slot frees, so one
fast receiver is limited by its own latency, not by the loop's polling.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
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
_BUSY_HOST_DELAY_S = 0.1  # a delivery to a host whose slots and queue are full is claimable again after this
# After a claim that found hosts full, the next waits this long: a backlog to one busy host is
# not claimed and put back on every freed slot (its held queue refills that often, enough).
_FULL_ROUND_PAUSE_S = 0.02
_IDLE_BLOCK_MS = 200  # how long a read of the stream blocks when nothing is in flight


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
        self._hosts: Counter[str] = Counter()  # deliveries in flight per host
        self._waiting: dict[str, deque[Delivery]] = {}  # claimed, next in line per host (at most 2 x webhook_per_host)
        self._in_flight = 0
        self._held = 0  # in flight + waiting
        self._wake = threading.Event()  # set when a delivery ends: a slot is free
        self._next_claim = 0.0
        self._backlog = False  # the last claim found hosts full: more is due than was taken
        # A held delivery waits behind at most two rounds of its host's deliveries, then runs one:
        # its lease (when another dispatcher may take it) covers all three.
        self._lease_s = 3 * (settings.webhook_timeout_s + settings.webhook_connect_timeout_s) + 30
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
            with self._lock:
                active = self._held > 0 or self._backlog
            # While deliveries run, the stream is only polled (block=None) and the loop waits on
            # the wake-up instead: a freed slot is refilled at once.
            replies = self.client.xreadgroup(group, self.consumer, {stream: ">"}, count=100, block=None if active else _IDLE_BLOCK_MS)
            for _name, entries in replies or []:
                self._accept(entries)
            self._wake.clear()
            self._dispatch_due()
            if active and not replies:
                self._wake.wait(_BUSY_HOST_DELAY_S)
                pause = self._next_claim - time.monotonic()
                if pause > 0:
                    self.stopping.wait(pause)
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
            free = 3 * self.settings.webhook_concurrency - self._held
        if free <= 0:
            return
        busy: list[Delivery] = []
        for delivery in self.deliveries.claim(limit=free, lease_s=self._lease_s):
            host = urlsplit(delivery.url).netloc.lower()
            start = False
            with self._lock:
                if self._hosts[host] < self.settings.webhook_per_host and self._in_flight < self.settings.webhook_concurrency:
                    self._hosts[host] += 1
                    self._in_flight += 1
                    self._held += 1
                    start = True
                elif self._hosts[host] > 0 and len(self._waiting.setdefault(host, deque())) < 2 * self.settings.webhook_per_host:
                    # Only behind a delivery in flight to the same host: its thread takes it next.
                    self._waiting[host].append(delivery)
                    self._held += 1
                else:
                    busy.append(delivery)
            if start:
                self._pool.submit(self._deliver, delivery, host)
        self._backlog = bool(busy)
        if busy:
            self.deliveries.put_back(busy, at=time.time() + _BUSY_HOST_DELAY_S)
            self._next_claim = time.monotonic() + _FULL_ROUND_PAUSE_S

    def _deliver(self, delivery: Delivery | None, host: str) -> None:
        """Deliver, then the host's next waiting delivery, until none waits; then free the slot."""
        while delivery is not None:
            try:
                self._attempt(delivery)
            except Exception:  # noqa: BLE001 - the delivery stays leased and comes due again
                log.exception("webhook delivery %s failed unexpectedly", delivery.webhook_id)
            with self._lock:
                self._held -= 1
                waiting = self._waiting.get(host)
                if waiting:
                    delivery = waiting.popleft()
                else:
                    delivery = None
                    self._waiting.pop(host, None)
                    self._hosts[host] -= 1
                    if self._hosts[host] <= 0:
                        del self._hosts[host]  # a dispatcher runs for weeks: no counter per host ever seen
                    self._in_flight -= 1
            self._wake.set()

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
