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

Ownership and liveness (as dramatiq's Redis broker does it): each worker process records what it
takes in its own unacked hash and keeps a heartbeat in Redis (worker/heartbeat.py, from a
thread of its own, so a long batch never misses one). About once a second every worker runs the
restore step: the messages of workers whose heartbeat is older than the heartbeat timeout go
back to the head of their priority's list, in one Lua script. A slow but alive worker keeps its
messages however long a batch takes; a dead one's come back within the heartbeat timeout.

Each delivery gets its own id (``<consumer id>.<n>``), the field of the worker's hash. Once a
dead (or cut-off) worker's messages are restored, its hash is gone: an ack or hand-back it sends
later finds nothing and is refused (False), and the ledger counts it (worker/ledger.py).

Layout (key names in producer/keys.py):

    <queue>, <queue>\x06\x163 ...          lists: producers LPUSH, workers RPOP (oldest first)
    vqa:unacked:<queue>:worker:<id>        hash: delivery id -> raw message, per worker process
    vqa:heartbeats:<queue>                 zset: consumer id -> its last heartbeat (Redis time)
    vqa:unacked:<queue> + vqa:unacked-index:<queue>
                                           the shared unacked set of workers before ownership:
                                           nothing new goes in; what is there is restored after
                                           the visibility timeout, as old workers did (migration)
    vqa:dead-letters:<queue>               list: entries refused at intake (worker/intake.py)

Redis server time is used throughout, so worker clocks do not matter. The restore script names a
dead worker's hash from its id, a key not passed in KEYS: fine on one Redis (and under
Sentinel), not on Redis Cluster (docs/reliability.md).
"""

from __future__ import annotations

import json
import time
import uuid
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

# KEYS: this worker's unacked hash, the heartbeats, then the queue's lists in the order they are served.
# ARGV: how many to take; which list to start from (0: the highest priority; see LOWER_LANE_EVERY);
# the consumer id; the number of this worker's next delivery. Returns id, raw, id, raw, ...
# Taking is proof of life too: the heartbeat is refreshed, so an owned hash always has one.
_POP = """
local now = redis.call('TIME')
local out = {}
local lanes = #KEYS - 2
local first = tonumber(ARGV[2]) or 0
local seq = tonumber(ARGV[4])
local tried = 0
while #out < 2 * tonumber(ARGV[1]) and tried < lanes do
  local list = 3 + (first + tried) % lanes
  local raw = redis.call('RPOP', KEYS[list])
  if raw then
    local id = ARGV[3] .. '.' .. seq
    seq = seq + 1
    redis.call('HSET', KEYS[1], id, raw)
    out[#out + 1] = id
    out[#out + 1] = raw
  else
    tried = tried + 1
  end
end
if #out > 0 then redis.call('ZADD', KEYS[2], now[1] + now[2] / 1000000, ARGV[3]) end
return out
"""

# Which list a message goes back to: kombu's rule (properties.priority clamped to 0-9, then the
# highest step at or below it). KEYS[base..base+3] are the lists of steps 0, 3, 6, 9.
_LIST_FOR = """
local function list_for(raw, base)
  local ok, message = pcall(cjson.decode, raw)
  local priority = 0
  if ok and type(message) == 'table' and type(message.properties) == 'table' then
    priority = tonumber(message.properties.priority) or 0
  end
  if priority >= 9 then return KEYS[base + 3] end
  if priority >= 6 then return KEYS[base + 2] end
  if priority >= 3 then return KEYS[base + 1] end
  return KEYS[base]
end
"""

# KEYS: this worker's unacked hash, the lists. ARGV: the delivery id. 0: not ours (any more).
_REQUEUE = _LIST_FOR + """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('RPUSH', list_for(raw, 2), raw)
return 1
"""

# The restore step. KEYS: heartbeats, the shared (old) unacked hash and index, the lists.
# ARGV: heartbeat timeout, visibility timeout (old set), limit, worker hash prefix, own id.
_RESTORE = _LIST_FOR + """
local now = redis.call('TIME')
local now_s = now[1] + now[2] / 1000000
local limit = tonumber(ARGV[3])
local restored = 0
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_s - tonumber(ARGV[1]), 'LIMIT', 0, limit)
for _, worker in ipairs(dead) do
  if worker ~= ARGV[5] then
    local hash = ARGV[4] .. worker
    for _, raw in ipairs(redis.call('HVALS', hash)) do
      redis.call('RPUSH', list_for(raw, 4), raw)
      restored = restored + 1
    end
    redis.call('DEL', hash)
    redis.call('ZREM', KEYS[1], worker)
  end
end
local tags = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now_s - tonumber(ARGV[2]), 'LIMIT', 0, limit)
for _, tag in ipairs(tags) do
  local raw = redis.call('HGET', KEYS[2], tag)
  redis.call('HDEL', KEYS[2], tag)
  redis.call('ZREM', KEYS[3], tag)
  if raw then
    redis.call('RPUSH', list_for(raw, 4), raw)
    restored = restored + 1
  end
end
return restored
"""

# A worker leaving: what it still holds goes back now, and its heartbeat goes.
# KEYS: this worker's unacked hash, the heartbeats, the lists. ARGV: the consumer id.
_RETIRE = _LIST_FOR + """
local raws = redis.call('HVALS', KEYS[1])
for _, raw in ipairs(raws) do redis.call('RPUSH', list_for(raw, 3), raw) end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return #raws
"""

# The heartbeat. KEYS: the heartbeats. ARGV: the consumer id. 1: it was missing (first beat, or
# this worker was presumed dead and its messages went to others); 0: refreshed.
_BEAT = """
local now = redis.call('TIME')
return redis.call('ZADD', KEYS[1], now[1] + now[2] / 1000000, ARGV[1])
"""

# How long the ids of a pop whose reply was lost are looked for in the worker's own hash.
_IN_DOUBT_KEPT_S = 60.0

# Once a worker's heartbeat is this old, live workers restore its messages (VQA_HEARTBEAT_TIMEOUT_S).
DEFAULT_HEARTBEAT_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class Delivery:
    """A raw message taken off the queue, recorded in this worker's unacked hash under ``tag`` (its delivery id)."""

    tag: str
    raw: bytes


def new_consumer_id(worker_name: str) -> str:
    """The id a worker process owns its messages under: its name plus a random part, so a restart is a new owner."""
    return f"{worker_name}~{uuid.uuid4().hex[:12]}"


class RedisQueue:
    """The reliable consuming side of one Celery queue in Redis, for one worker process; every method is one atomic step."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        queue: str,
        consumer_id: str | None = None,
        heartbeat_timeout_s: float = DEFAULT_HEARTBEAT_TIMEOUT_S,
        lower_lane_every: int = LOWER_LANE_EVERY,
    ) -> None:
        self.client = client
        self.queue = queue
        self.consumer_id = consumer_id or new_consumer_id("vqa")
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self._lower_lane_every = lower_lane_every
        self._pops = 0
        self._next_delivery = 1
        # Pops whose reply never came: (the delivery ids they would have used, look until).
        self._in_doubt: list[tuple[list[str], float]] = []
        self._lists = keys.priority_queue_keys(queue)
        self._owned = keys.worker_unacked_key(queue, self.consumer_id)
        self._heartbeats = keys.heartbeats_key(queue)
        self._dead_letters = keys.dead_letters_key(queue)
        self._pop = client.register_script(_POP)
        self._requeue = client.register_script(_REQUEUE)
        self._restore = client.register_script(_RESTORE)
        self._retire = client.register_script(_RETIRE)
        self._beat = client.register_script(_BEAT)

    @classmethod
    def from_url(cls, url: str, *, queue: str, consumer_id: str | None = None,
                 heartbeat_timeout_s: float = DEFAULT_HEARTBEAT_TIMEOUT_S, master_name: str | None = None) -> RedisQueue:
        # No automatic retries: a pop retried after a lost reply would take more messages before
        # the first ones were looked for (see pop). The consumer retries, after a pause.
        return cls(redis_client(url, retries=False, master_name=master_name), queue=queue, consumer_id=consumer_id, heartbeat_timeout_s=heartbeat_timeout_s)

    def pop(self, limit: int) -> list[Delivery]:
        """Take up to ``limit`` messages, highest priority first and oldest first within it, each recorded as this worker's in the same step.

        Every ``lower_lane_every``-th call starts from a lower priority's list instead (then goes
        on down and wraps round to the top), so lower lanes are served under a flood of higher ones.
        """
        if limit <= 0:
            return []
        recovered = self._recover_in_doubt()
        limit -= len(recovered)
        if limit <= 0:
            return recovered
        first = self._next_delivery
        try:
            out = self._pop(keys=[self._owned, self._heartbeats, *self._lists],
                            args=[limit, self._first_list(), self.consumer_id, first])
        except (redis.ConnectionError, redis.TimeoutError):
            # The reply is lost, not necessarily the pop: Redis may have run it (and written it to
            # its AOF) just before it went away. Those messages now sit in our hash under ids
            # first..first+limit-1, and this worker's heartbeat keeps them from being restored, so
            # they are looked for on the next pops; their ids are never given out again (reusing
            # one would overwrite a message we hold with another, and the first would be gone).
            self._next_delivery = first + limit
            tags = [f"{self.consumer_id}.{seq}" for seq in range(first, first + limit)]  # as _POP names them
            self._in_doubt.append((tags, time.monotonic() + _IN_DOUBT_KEPT_S))
            raise
        deliveries = [Delivery(tag=out[i].decode(), raw=out[i + 1]) for i in range(0, len(out), 2)]
        self._next_delivery += len(deliveries)
        return recovered + deliveries

    def _recover_in_doubt(self) -> list[Delivery]:
        """The messages of pops whose reply was lost that did take them: found in our hash under their ids, delivered now."""
        if not self._in_doubt:
            return []
        tags = [tag for pop_tags, _ in self._in_doubt for tag in pop_tags]
        raws = self.client.hmget(self._owned, tags)
        found = {tag: raw for tag, raw in zip(tags, raws, strict=True) if raw is not None}
        # A range is looked at until it is found or for _IN_DOUBT_KEPT_S: a command whose
        # connection broke can still be run by Redis a moment later, after our first look.
        now = time.monotonic()
        self._in_doubt = [(pop_tags, until) for pop_tags, until in self._in_doubt if now < until and found.keys().isdisjoint(pop_tags)]
        return [Delivery(tag=tag, raw=raw) for tag, raw in found.items()]

    def _first_list(self) -> int:
        """0 (the top priority first), except on every ``lower_lane_every``-th pop: then the next lower list in turn."""
        self._pops += 1
        if self._pops % self._lower_lane_every:
            return 0
        lower = len(keys.PRIORITY_STEPS) - 1
        return 1 + (self._pops // self._lower_lane_every - 1) % lower

    def ack(self, tag: str) -> bool:
        """The message is done with (its record is stored, or it is refused): forget it. False: not ours any more (refused)."""
        return bool(self.client.hdel(self._owned, tag))

    def ack_many(self, tags: list[str]) -> list[bool]:
        """:meth:`ack` for each tag, in one round trip (a batch's acks, worker/ledger.py)."""
        pipe = self.client.pipeline(transaction=False)
        for tag in tags:
            pipe.hdel(self._owned, tag)
        return [bool(removed) for removed in pipe.execute()]

    def requeue(self, tag: str) -> bool:
        """Hand the message back to the head of its priority's list; False: not ours any more (refused)."""
        return bool(self._requeue(keys=[self._owned, *self._lists], args=[tag]))

    def dead_letter(self, tag: str, raw: bytes, *, reason: str) -> None:
        """Move a refused entry from this worker's unacked hash to the dead-letter list, with why it was refused (one transaction)."""
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
        pipe.hdel(self._owned, tag)
        pipe.execute()

    def dead_letters(self, limit: int = 100) -> list[dict[str, object]]:
        """The newest ``limit`` dead letters."""
        return [json.loads(item) for item in self.client.lrange(self._dead_letters, 0, limit - 1)]

    def restore_expired(self, visibility_timeout: float, *, limit: int = 1000) -> int:
        """The restore step: messages of workers silent past the heartbeat timeout, and old-set ones past ``visibility_timeout``, back at the head of their lists; how many."""
        return int(self._restore(
            keys=[self._heartbeats, keys.unacked_key(self.queue), keys.unacked_index_key(self.queue), *self._lists],
            args=[self.heartbeat_timeout_s, visibility_timeout, limit, keys.worker_unacked_prefix(self.queue), self.consumer_id],
        ))

    def heartbeat(self) -> bool:
        """Tell the others this worker is alive. True when its heartbeat was missing: the first beat, or it had been presumed dead."""
        return bool(self._beat(keys=[self._heartbeats], args=[self.consumer_id]))

    def retire(self) -> int:
        """Leaving: hand back whatever this worker still holds and drop its heartbeat; how many went back."""
        return int(self._retire(keys=[self._owned, self._heartbeats, *self._lists], args=[self.consumer_id]))


def held_messages(client: redis.Redis, queue: str) -> list[bytes]:
    """Every message taken and not settled, by any worker (their own hashes) or an old one (the shared set)."""
    held = list(client.hvals(keys.unacked_key(queue)))
    for consumer_id in client.zrange(keys.heartbeats_key(queue), 0, -1):
        held += client.hvals(keys.worker_unacked_key(queue, consumer_id.decode()))
    return held


RECONNECT_MAX_S = 10.0


def reconnect_delay(previous_s: float) -> float:
    """The wait before looking for Redis again, ``previous_s`` being the last wait (0 after a success).

    0.25 s, then 1.5x longer each time, at most 10 s: looks again 0.25, 0.6, 1.2, 2.0, 3.3 s ...
    after the first error. A Sentinel promotion is reachable ~1.8 s after the master dies, and
    doubling from 0.5 s (0.5, 1.5, 3.5) first looked again at 3.5 s
    (docs/benchmarks/failover/broker-backoff/).
    """
    return min(max(1.5 * previous_s, 0.25), RECONNECT_MAX_S)
