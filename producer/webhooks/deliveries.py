"""Webhook deliveries in Redis: nothing is lost if a dispatcher dies, and a waiting retry blocks nobody.

    vqa:webhooks:pending   hash  delivery id -> JSON (url, body, webhook_id, attempt, last_error)
    vqa:webhooks:due       zset  delivery id -> when it is due (a retry's time, or the lease of one in flight)
    VQA_WEBHOOK_DEAD_STREAM      stream of deliveries that ran out of tries, were refused, or got 410 Gone

An event is acked on the stream in the same script that stores its delivery (accept), so it is
either still pending in the group or durable here. A claimed delivery's due time moves to the
end of its lease: a dispatcher killed mid-delivery leaves it due again afterwards.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import redis

from producer import keys

_ACCEPT = """
if redis.call('EXISTS', KEYS[1]) == 0 and redis.call('HSETNX', KEYS[2], ARGV[3], ARGV[4]) == 1 then
  redis.call('ZADD', KEYS[3], ARGV[5], ARGV[3])
end
return redis.call('XACK', KEYS[4], ARGV[1], ARGV[2])
"""
_CLAIM = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local out = {}
for _, id in ipairs(ids) do
  local body = redis.call('HGET', KEYS[2], id)
  if body then
    redis.call('ZADD', KEYS[1], ARGV[3], id)
    out[#out + 1] = body
  else
    redis.call('ZREM', KEYS[1], id)
  end
end
return out
"""
_DEAD_MAXLEN = 100_000


@dataclass(frozen=True)
class Delivery:
    """One event to one URL; ``webhook_id`` is the same on every try (receivers dedupe on it)."""

    delivery_id: str
    webhook_id: str
    url: str
    body: str
    attempt: int = 0  # tries made so far
    last_error: str = ""

    @classmethod
    def for_event(cls, event: dict[str, str]) -> Delivery:
        url = event["webhook_url"]
        job_id = event["job_id"]
        data = {name: value for name, value in event.items() if name not in ("id", "webhook_url")}
        payload = {"type": f"job.{event.get('status', 'completed')}", "timestamp": event.get("finished_at", ""), "data": data}
        delivery_id = hashlib.sha256(f"{job_id}\n{url}".encode()).hexdigest()[:32]
        return cls(delivery_id=delivery_id, webhook_id=f"msg_{job_id}", url=url,
                   body=json.dumps(payload, separators=(",", ":")))

    def dumps(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def loads(cls, text: bytes | str) -> Delivery:
        return cls(**json.loads(text))


class Deliveries:
    """Every Redis operation on webhook deliveries."""

    def __init__(self, client: redis.Redis, *, dead_stream: str, done_ttl_s: int) -> None:
        self.client = client
        self.dead_stream = dead_stream
        self.done_ttl_s = done_ttl_s
        self._accept = client.register_script(_ACCEPT)
        self._claim = client.register_script(_CLAIM)

    def accept(self, delivery: Delivery | None, *, stream: str, group: str, entry_id: str) -> None:
        """Store the delivery (due now) unless it exists or was done, and ack its event, atomically."""
        if delivery is None:
            self.client.xack(stream, group, entry_id)
            return
        self._accept(
            keys=[keys.webhook_done_key(delivery.delivery_id), keys.webhook_pending_key(), keys.webhook_due_key(), stream],
            args=[group, entry_id, delivery.delivery_id, delivery.dumps(), time.time()],
        )

    def claim(self, *, limit: int, lease_s: float) -> list[Delivery]:
        now = time.time()
        found = self._claim(keys=[keys.webhook_due_key(), keys.webhook_pending_key()], args=[now, limit, now + lease_s])
        return [Delivery.loads(text) for text in found]

    def put_back(self, deliveries: list[Delivery], *, at: float) -> None:
        """Make claimed deliveries due again at ``at`` (one round trip for all)."""
        self.client.zadd(keys.webhook_due_key(), {delivery.delivery_id: at for delivery in deliveries})

    def succeeded(self, delivery: Delivery) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.hdel(keys.webhook_pending_key(), delivery.delivery_id)
        pipe.zrem(keys.webhook_due_key(), delivery.delivery_id)
        pipe.set(keys.webhook_done_key(delivery.delivery_id), "1", ex=self.done_ttl_s)
        pipe.execute()

    def retry(self, delivery: Delivery, *, at: float) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(keys.webhook_pending_key(), delivery.delivery_id, delivery.dumps())
        pipe.zadd(keys.webhook_due_key(), {delivery.delivery_id: at})
        pipe.execute()

    def dead(self, delivery: Delivery, *, reason: str) -> None:
        pipe = self.client.pipeline(transaction=True)
        fields: dict[Any, Any] = {"delivery": delivery.dumps(), "reason": reason, "url": delivery.url,
                                  "webhook_id": delivery.webhook_id, "error": delivery.last_error,
                                  "attempts": delivery.attempt, "dead_at": time.time()}
        pipe.xadd(self.dead_stream, fields, maxlen=_DEAD_MAXLEN, approximate=True)
        pipe.hdel(keys.webhook_pending_key(), delivery.delivery_id)
        pipe.zrem(keys.webhook_due_key(), delivery.delivery_id)
        pipe.execute()

    def list_dead(self, *, count: int | None = None) -> list[dict[str, Any]]:
        entries = self.client.xrange(self.dead_stream, count=count)
        out = []
        for entry_id, fields in entries:
            text = {name.decode(): value.decode() for name, value in fields.items()}
            delivery = json.loads(text.pop("delivery"))
            out.append({"id": entry_id.decode(), **text, "body": delivery["body"]})
        return out

    def replay(self, entry_ids: list[str] | None = None) -> int:
        """Put dead deliveries back (all, or those entries), due now with a fresh schedule; return how many."""
        entries = self.client.xrange(self.dead_stream)
        replayed = 0
        for entry_id, fields in entries:
            if entry_ids and entry_id.decode() not in entry_ids:
                continue
            delivery = replace(Delivery.loads(fields[b"delivery"]), attempt=0, last_error="")
            pipe = self.client.pipeline(transaction=True)
            pipe.hset(keys.webhook_pending_key(), delivery.delivery_id, delivery.dumps())
            pipe.zadd(keys.webhook_due_key(), {delivery.delivery_id: time.time()})
            pipe.xdel(self.dead_stream, entry_id)
            pipe.execute()
            replayed += 1
        return replayed
