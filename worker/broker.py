"""Taking messages off the Celery queue in Redis without a gap: pop and record as unacked in one atomic step.

Why not kombu's consumer: kombu's Redis transport pops a message with BRPOP and records it as
unacked (HSET + ZADD) in a second command. If Redis crashes between the two after writing the
pop to its append-only file, or the worker dies between them, the message is in neither place
and is lost for good (tests/reliability saw it under load with Redis restarts; see
docs/reliability.md). Here one Lua script pops up to N messages and records each of them, atomically;
so an accepted message is always either queued or recorded as unacked, and with
``appendfsync always`` it stays so across a Redis crash. Producers are unchanged: the queue is
the lists Celery and kombu push to, one per priority step (producer/keys.py), served as kombu
serves them: the bare queue name (priority 0-2) first, then 3-5, 6-8 and 9 — except that every
``LOWER_LANE_EVERY``-th pop starts from a lower list (each in turn), so no lane starves forever.

Layout (key names in producer/keys.py):

    <queue>, <queue>\x06\x163 ...  lists: producers LPUSH, workers RPOP (oldest first)
    vqa:unacked:<queue>         hash: tag -> raw message, for every taken, unacked message
    vqa:unacked-index:<queue>   zset: tag -> when it was taken (Redis server time, seconds)
    vqa:dead-letters:<queue>    list: entries refused at intake (worker/intake.py), with the reason

A message's tag is the SHA-1 of its raw bytes, so a message pushed back keeps its tag. It goes
back to the head of its priority's list when a worker hands it back (:meth:`RedisQueue.requeue`) or when
it has been unacked longer than the visibility timeout (:meth:`RedisQueue.restore_expired`,
which every worker runs about once a second). Redis server time is used throughout, so worker
clocks do not matter.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass

import redis

from producer import keys
from producer.connections import redis_client

# Rejected entries kept for inspection (``vqa dead-letters``), newest first; older ones are dropped.
DEAD_LETTERS_KEPT = 10_000
# A dead letter keeps this much of the raw entry: enough to see what it was.
DEAD_LETTER_RAW_BYTES = 16 * 1024
# Never starved forever: every this many pops, a worker serves a lower priority list first
# (the lists below the top take that turn in rotation), so under a constant stream of
# high-priority jobs each lower lane still gets a pop in every LOWER_LANE_EVERY x 3.
LOWER_LANE_EVERY = 10

# KEYS: unacked hash, unacked index, then the queue's lists in the order they are served.
# ARGV: how many to take; which list to start from (0: the highest priority; see LOWER_LANE_EVERY).
_POP = """
local now = redis.call('TIME')
local taken_at = now[1] + now[2] / 1000000
local out = {}
local lanes = #KEYS - 2
local first = tonumber(ARGV[2]) or 0
local tried = 0
while #out < tonumber(ARGV[1]) and tried < lanes do
  local list = 3 + (first + tried) % lanes
  local raw = redis.call('RPOP', KEYS[list])
  if raw then
    local tag = redis.sha1hex(raw)
    redis.call('HSET', KEYS[1], tag, raw)
    redis.call('ZADD', KEYS[2], taken_at, tag)
    out[#out + 1] = raw
  else
    tried = tried + 1
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

@dataclass(frozen=True)
class Delivery:
    """A raw message taken off the queue, recorded as unacked under ``tag``."""

    tag: str
    raw: bytes


class RedisQueue:
    """The reliable consuming side of one Celery queue in Redis; every method is one atomic step."""

    def __init__(self, client: redis.Redis, *, queue: str, lower_lane_every: int = LOWER_LANE_EVERY) -> None:
        self.client = client
        self.queue = queue
        self._lower_lane_every = lower_lane_every
        self._pops = 0
        self._keys = [keys.unacked_key(queue), keys.unacked_index_key(queue), *keys.priority_queue_keys(queue)]
        self._dead_letters = keys.dead_letters_key(queue)
        self._pop = client.register_script(_POP)
        self._requeue = client.register_script(_REQUEUE)
        self._restore = client.register_script(_RESTORE)

    @classmethod
    def from_url(cls, url: str, *, queue: str) -> RedisQueue:
        # No automatic retries: a pop retried after a lost reply would take more messages while
        # the first ones wait for the visibility timeout. The consumer retries, after a pause.
        return cls(redis_client(url, retries=False), queue=queue)

    def pop(self, limit: int) -> list[Delivery]:
        """Take up to ``limit`` messages, highest priority first and oldest first within it, each recorded as unacked in the same step.

        Every ``lower_lane_every``-th call starts from a lower priority's list instead (then goes
        on down and wraps round to the top), so lower lanes are served under a flood of higher ones.
        """
        if limit <= 0:
            return []
        raws = self._pop(keys=self._keys, args=[limit, self._first_list()])
        # The tag is what the script keyed the unacked entry by.
        return [Delivery(tag=hashlib.sha1(raw).hexdigest(), raw=raw) for raw in raws]  # noqa: S324 - an id, not security

    def _first_list(self) -> int:
        """0 (the top priority first), except on every ``lower_lane_every``-th pop: then the next lower list in turn."""
        self._pops += 1
        if self._pops % self._lower_lane_every:
            return 0
        lower = len(keys.PRIORITY_STEPS) - 1
        return 1 + (self._pops // self._lower_lane_every - 1) % lower

    def ack(self, tag: str) -> None:
        """The message is done with (its record is stored, or it is refused): forget it."""
        pipe = self.client.pipeline(transaction=True)
        pipe.hdel(self._keys[0], tag)
        pipe.zrem(self._keys[1], tag)
        pipe.execute()

    def requeue(self, tag: str) -> bool:
        """Hand the message back to the head of its priority's list; False if it was no longer unacked."""
        return bool(self._requeue(keys=self._keys, args=[tag]))

    def dead_letter(self, tag: str, raw: bytes, *, reason: str) -> None:
        """Move a refused entry from unacked to the dead-letter list, with why it was refused (one transaction)."""
        letter = json.dumps(
            {
                "reason": reason[:1000],
                "rejected_at": time.time(),
                "tag": tag,
                "size": len(raw),
                "raw": raw[:DEAD_LETTER_RAW_BYTES].decode("utf-8", errors="replace"),
            }
        )
        pipe = self.client.pipeline(transaction=True)
        pipe.lpush(self._dead_letters, letter)
        pipe.ltrim(self._dead_letters, 0, DEAD_LETTERS_KEPT - 1)
        pipe.hdel(self._keys[0], tag)
        pipe.zrem(self._keys[1], tag)
        pipe.execute()

    def dead_letters(self, limit: int = 100) -> list[dict[str, object]]:
        """The newest ``limit`` dead letters."""
        return [json.loads(item) for item in self.client.lrange(self._dead_letters, 0, limit - 1)]

    def restore_expired(self, visibility_timeout: float, *, limit: int = 1000) -> int:
        """Put messages unacked for longer than ``visibility_timeout`` back at the head of the queue; how many."""
        return int(self._restore(keys=self._keys, args=[visibility_timeout, limit]))
