"""Taking messages off the Celery queue in Redis without a gap: pop and record as unacked in one atomic step.

Why not kombu's consumer: kombu's Redis transport pops a message with BRPOP and records it as
unacked (HSET + ZADD) in a second command. If Redis crashes between the two after writing the
pop to its append-only file, or the worker dies between them, the message is in neither place
and is lost for good (tests/reliability saw it under load with Redis restarts; see
docs/reliability.md). Here one Lua script pops up to N messages and records each of them, atomically;
so an accepted message is always either queued or recorded as unacked, and with
``appendfsync always`` it stays so across a Redis crash. Producers are unchanged: the queue is
the lists Celery and kombu push to, one per priority step (producer/keys.py), served as kombu
serves them: the bare queue name (priority 0-2) first, then 3-5, 6-8 and 9.

Layout (key names in producer/keys.py):

    <queue>, <queue>\x06\x163 ...  lists: producers LPUSH, workers RPOP (oldest first)
    vqa:unacked:<queue>         hash: tag -> raw message, for every taken, unacked message
    vqa:unacked-index:<queue>   zset: tag -> when it was taken (Redis server time, seconds)

A message's tag is the SHA-1 of its raw bytes, so a message pushed back keeps its tag. It goes
back to the head of its priority's list when a worker hands it back (:meth:`RedisQueue.requeue`) or when
it has been unacked longer than the visibility timeout (:meth:`RedisQueue.restore_expired`,
which every worker runs about once a second). Redis server time is used throughout, so worker
clocks do not matter.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from producer import keys
# The same refusals as kombu's guarded channel had (compressed or oversized bodies).
from worker.messages import MAX_MESSAGE_BYTES, RefusedMessage
from worker.messages import check_envelope

# KEYS: unacked hash, unacked index, then the queue's lists in the order they are served.
_POP = """
local now = redis.call('TIME')
local taken_at = now[1] + now[2] / 1000000
local out = {}
local list = 3
while #out < tonumber(ARGV[1]) and list <= #KEYS do
  local raw = redis.call('RPOP', KEYS[list])
  if raw then
    local tag = redis.sha1hex(raw)
    redis.call('HSET', KEYS[1], tag, raw)
    redis.call('ZADD', KEYS[2], taken_at, tag)
    out[#out + 1] = raw
  else
    list = list + 1
  end
end
return out
"""

# Which list a message goes back to: kombu's rule (properties.priority clamped to 0-9, then the
# highest step at or below it). KEYS[3..6] are the lists of steps 0, 3, 6, 9.
_LIST_FOR = """
local function list_for(raw)
  local ok, message = pcall(cjson.decode, raw)
  local priority = 0
  if ok and type(message) == 'table' and type(message.properties) == 'table' then
    priority = tonumber(message.properties.priority) or 0
  end
  if priority >= 9 then return KEYS[6] end
  if priority >= 6 then return KEYS[5] end
  if priority >= 3 then return KEYS[4] end
  return KEYS[3]
end
"""

_REQUEUE = _LIST_FOR + """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
if raw then
  redis.call('RPUSH', list_for(raw), raw)
  return 1
end
return 0
"""

_RESTORE = _LIST_FOR + """
local now = redis.call('TIME')
local ceiling = now[1] + now[2] / 1000000 - tonumber(ARGV[1])
local tags = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ceiling, 'LIMIT', 0, tonumber(ARGV[2]))
for _, tag in ipairs(tags) do
  local raw = redis.call('HGET', KEYS[1], tag)
  redis.call('HDEL', KEYS[1], tag)
  redis.call('ZREM', KEYS[2], tag)
  if raw then redis.call('RPUSH', list_for(raw), raw) end
end
return #tags
"""

# An envelope holds the body base64-encoded (4 characters per 3 bytes) plus headers.
_MAX_RAW_BYTES = MAX_MESSAGE_BYTES * 4 // 3 + 64 * 1024


class MalformedMessage(ValueError):
    """The queue entry is not a kombu message envelope; it is dropped with this reason."""


@dataclass(frozen=True)
class QueueMessage:
    """One message as taken off the queue: what worker.messages.decode_task_message reads."""

    delivery_tag: str
    headers: dict[str, Any]
    body: bytes
    content_type: str | None
    content_encoding: str | None
    properties: dict[str, Any]


def parse_envelope(tag: str, raw: bytes) -> QueueMessage:
    """Read a kombu Redis envelope; raise MalformedMessage (or RefusedMessage: compressed, oversized) otherwise."""
    if len(raw) > _MAX_RAW_BYTES:
        raise RefusedMessage(f"queue entry of {len(raw):,} bytes is over the {MAX_MESSAGE_BYTES:,}-byte limit")
    try:
        payload = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise MalformedMessage(f"not JSON ({type(exc).__name__})") from exc
    if not isinstance(payload, dict):
        raise MalformedMessage(f"envelope is a {type(payload).__name__}, not an object")
    headers, properties, body = payload.get("headers"), payload.get("properties"), payload.get("body")
    if not isinstance(headers, dict) or not isinstance(properties, dict):
        raise MalformedMessage("envelope has no headers or properties object")
    if not isinstance(properties.get("delivery_tag"), str) or not isinstance(properties.get("delivery_info"), dict):
        raise MalformedMessage("envelope has no delivery tag or delivery info")
    if not isinstance(body, str):
        raise MalformedMessage("envelope has no body string")
    check_envelope(payload)  # compressed or oversized bodies: refused before decoding
    if properties.get("body_encoding") == "base64":
        try:
            data = base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise MalformedMessage("body is not valid base64") from exc
    else:
        data = body.encode()
    return QueueMessage(
        delivery_tag=tag,
        headers=headers,
        body=data,
        content_type=payload.get("content-type"),
        content_encoding=payload.get("content-encoding"),
        properties=properties,
    )


@dataclass(frozen=True)
class Delivery:
    """A raw message taken off the queue, recorded as unacked under ``tag``."""

    tag: str
    raw: bytes


class RedisQueue:
    """The reliable consuming side of one Celery queue in Redis; every method is one atomic step."""

    def __init__(self, client: redis.Redis, *, queue: str) -> None:
        self.client = client
        self.queue = queue
        self._keys = [keys.unacked_key(queue), keys.unacked_index_key(queue), *keys.priority_queue_keys(queue)]
        self._pop = client.register_script(_POP)
        self._requeue = client.register_script(_REQUEUE)
        self._restore = client.register_script(_RESTORE)

    @classmethod
    def from_url(cls, url: str, *, queue: str) -> RedisQueue:
        # No automatic retries: a pop retried after a lost reply would take more messages while
        # the first ones wait for the visibility timeout. The consumer retries, after a pause.
        client = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=30, retry=Retry(NoBackoff(), 0))
        return cls(client, queue=queue)

    def pop(self, limit: int) -> list[Delivery]:
        """Take up to ``limit`` messages, highest priority first and oldest first within it, each recorded as unacked in the same step."""
        if limit <= 0:
            return []
        raws = self._pop(keys=self._keys, args=[limit])
        # The tag is what the script keyed the unacked entry by.
        return [Delivery(tag=hashlib.sha1(raw).hexdigest(), raw=raw) for raw in raws]  # noqa: S324 - an id, not security

    def ack(self, tag: str) -> None:
        """The message is done with (its record is stored, or it is refused): forget it."""
        pipe = self.client.pipeline(transaction=True)
        pipe.hdel(self._keys[0], tag)
        pipe.zrem(self._keys[1], tag)
        pipe.execute()

    def requeue(self, tag: str) -> bool:
        """Hand the message back to the head of its priority's list; False if it was no longer unacked."""
        return bool(self._requeue(keys=self._keys, args=[tag]))

    def restore_expired(self, visibility_timeout: float, *, limit: int = 1000) -> int:
        """Put messages unacked for longer than ``visibility_timeout`` back at the head of the queue; how many."""
        return int(self._restore(keys=self._keys, args=[visibility_timeout, limit]))

    def unacked(self) -> int:
        return int(self.client.hlen(self._keys[0]))

    def close(self) -> None:
        self.client.close()
