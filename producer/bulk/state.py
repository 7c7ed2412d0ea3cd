"""A bulk run's state in Redis: every read and write of a run's keys, through the scripts in lua/.

Submitter, workers and readers share it (producer/bulk/__init__.py draws who does what). Each
write is one script, so each is atomic: a chunk is published together with its bookkeeping, a
job's outcome is counted together with its log entry, and a cancel cannot cross a publish.
Redis errors become :class:`producer.errors.BackendUnavailable` here, where they enter.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis
from redis.commands.core import Script

from producer import keys
from producer.bulk.status import BulkStatus, from_meta
from producer.errors import BackendUnavailable
from producer.settings import Settings

# How many invalid-line reports a run keeps for invalid.jsonl (all are counted).
INVALID_REPORTS_KEPT = 10_000


@functools.cache
def _script(name: str) -> Script:
    """The script ``lua/<name>.lua`` behind the shared helpers; loaded once per process (EVALSHA after)."""
    folder = resources.files("producer.bulk") / "lua"
    source = (folder / "common.lua").read_text() + "\n" + (folder / f"{name}.lua").read_text()
    # A Script only needs a client to hash its source; every call names the client it runs on.
    return Script(redis.Redis(), source)


@dataclass(frozen=True)
class Chunk:
    """Consecutive manifest lines, published together: their jobs (id and message) and invalid-line reports."""

    first_line: int
    last_line: int
    position: str  # where a source that does not replay resumes after this chunk (an S3 key)
    job_ids: Sequence[str]
    messages: Sequence[str]
    invalid: Sequence[str]


@dataclass(frozen=True)
class Stored:
    """What counting one stored record did."""

    counted: bool  # False: the job was counted before (a redelivery, a duplicate) or is no longer in flight
    segment: int  # a segment sealed now (to write to S3), or 0
    ended: bool  # this was the run's last job


def _stored_from(reply: Sequence[Any]) -> Stored:
    counted, segment, ended = reply
    return Stored(counted=bool(counted), segment=int(segment), ended=bool(ended))


class RunState:
    """The Redis side of one run (keys from producer/keys.py)."""

    def __init__(self, client: redis.Redis, bulk_id: str, *, settings: Settings, queue_key: str = "") -> None:
        self.client = client
        self.bulk_id = bulk_id
        self.settings = settings
        self.meta_key = keys.bulk_meta_key(bulk_id)
        self.inflight_key = keys.bulk_inflight_key(bulk_id)
        self.running_key = keys.bulk_running_key(bulk_id)
        self.log_key = keys.bulk_log_key(bulk_id)
        self.sealed_key = keys.bulk_sealed_key(bulk_id)
        self.invalid_key = keys.bulk_invalid_key(bulk_id)
        self.segment_prefix = keys.bulk_segment_key_prefix(bulk_id)
        # The order common.lua expects; the queue's list is only used by publish.lua.
        self._keys = [
            self.meta_key, self.inflight_key, self.running_key, self.log_key,
            self.sealed_key, self.invalid_key, keys.bulk_lease_key(bulk_id), queue_key or "-",
        ]

    def _run(self, script: str, *args: Any) -> Any:
        try:
            return _script(script)(keys=self._keys, args=list(args), client=self.client)
        except redis.RedisError as exc:
            raise BackendUnavailable(f"bulk run {self.bulk_id}: Redis is unreachable ({type(exc).__name__}: {exc})") from exc

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return getattr(self.client, method)(*args, **kwargs)
        except redis.RedisError as exc:
            raise BackendUnavailable(f"bulk run {self.bulk_id}: Redis is unreachable ({type(exc).__name__}: {exc})") from exc

    # -- the run ----------------------------------------------------------------------------

    def create(self, fields: dict[str, str]) -> dict[str, str]:
        """Create the run with these meta fields unless it exists; return its meta either way."""
        flat = [item for pair in fields.items() for item in pair]
        raw = self._run("create", self.settings.bulk_ttl_s, *flat)
        return {raw[i].decode(): raw[i + 1].decode() for i in range(0, len(raw), 2)}

    def meta(self) -> dict[str, str] | None:
        raw = self._call("hgetall", self.meta_key)
        return {key.decode(): value.decode() for key, value in raw.items()} or None

    def snapshot(self) -> BulkStatus | None:
        """The run's status from one atomic read, or None when Redis has no run by this id (any more)."""
        try:
            pipe = self.client.pipeline(transaction=True)
            pipe.hgetall(self.meta_key).scard(self.inflight_key).scard(self.running_key)
            raw, in_flight, running = pipe.execute()
        except redis.RedisError as exc:
            raise BackendUnavailable(f"bulk run {self.bulk_id}: Redis is unreachable ({type(exc).__name__})") from exc
        if not raw:
            return None
        meta = {key.decode(): value.decode() for key, value in raw.items()}
        return from_meta(self.bulk_id, meta, in_flight=int(in_flight), running=int(running))

    # -- the submitter ----------------------------------------------------------------------

    def lease(self, token: str, *, ttl_s: float, take_over: str = "") -> tuple[bool, str]:
        """Take or renew the submitter's lease; (False, holder) when another process holds it."""
        won, holder = self._run("lease", token, int(ttl_s * 1000), take_over)
        return bool(won), holder.decode() if isinstance(holder, bytes) else str(holder)

    def lease_holder(self) -> str:
        value = self._call("get", keys.bulk_lease_key(self.bulk_id))
        return value.decode() if value else ""

    def release(self, token: str) -> None:
        self._run("release", token)

    def publish(self, token: str, chunk: Chunk, *, window: int) -> tuple[str, int]:
        """Publish a chunk (publish.lua): ("ok", in flight), ("full", in flight), ("stopped", 0), ("lease", 0), ("stale", lines done)."""
        reply = self._run(
            "publish", token, chunk.first_line, chunk.last_line, chunk.position, window, self.settings.bulk_ttl_s,
            INVALID_REPORTS_KEPT, len(chunk.job_ids), len(chunk.invalid), *chunk.job_ids, *chunk.messages, *chunk.invalid,
        )
        verdict = reply[0].decode()
        value = reply[1] if len(reply) > 1 and isinstance(reply[1], int) else 0
        return verdict, value

    def close(self, token: str, *, lines: int) -> tuple[bool, bool, int]:
        """The manifest was read to its end: (lease still ours, the run ended now, segment sealed)."""
        verdict, ended, segment = self._run("close", token, lines, *self._ttls())
        return verdict == b"ok", bool(ended), int(segment)

    def cancel(self) -> tuple[str, bool, int]:
        """Stop publishing and close the run (cancel.lua): (state before, the run ended now, segment sealed)."""
        before, ended, segment = self._run("cancel", *self._ttls())
        return before.decode(), bool(ended), int(segment)

    def in_flight(self) -> Iterator[str]:
        """The job ids published and without an outcome (SSCAN: a large window is read in pieces)."""
        try:
            for job_id in self.client.sscan_iter(self.inflight_key, count=1000):
                yield job_id.decode()
        except redis.RedisError as exc:
            raise BackendUnavailable(f"bulk run {self.bulk_id}: Redis is unreachable ({type(exc).__name__})") from exc

    def invalid_reports(self) -> list[bytes]:
        return list(self._call("lrange", self.invalid_key, 0, -1))

    # -- the workers ------------------------------------------------------------------------

    def started(self, job_ids: Sequence[str]) -> int:
        return int(self._run("started", self.settings.bulk_ttl_s, *job_ids))

    def stored(self, job_id: str, *, outcome: str, entry: str, usage: Sequence[float]) -> Stored:
        """Count one stored record and log it (stored.lua), once per job."""
        return _stored_from(self._run("stored", *self._stored_args(job_id, outcome=outcome, entry=entry, usage=usage)))

    @staticmethod
    def stored_many(calls: Sequence[tuple[RunState, dict[str, Any]]]) -> list[Stored | BackendUnavailable]:
        """:meth:`stored` for many jobs (``(run, its keyword arguments)``, of one run or several) in one pipeline.

        Each job is still its own stored.lua, so "once per job" holds job by job. Per job, what
        counting it did, or why Redis could not count it (its message goes back).
        """
        if not calls:
            return []
        script = _script("stored")
        pipe = calls[0][0].client.pipeline(transaction=False)
        for state, kwargs in calls:
            # On a pipeline the Script is loaded (SCRIPT EXISTS, then LOAD where missing) before the batch runs.
            script(keys=state._keys, args=state._stored_args(**kwargs), client=pipe)
        try:
            replies = pipe.execute(raise_on_error=False)
        except redis.RedisError as exc:
            error = BackendUnavailable(f"{len(calls)} bulk jobs: Redis is unreachable ({type(exc).__name__}: {exc})")
            return [error] * len(calls)
        return [
            BackendUnavailable(f"bulk run {state.bulk_id}: Redis could not count job {kwargs['job_id']} ({reply})")
            if isinstance(reply, Exception) else _stored_from(reply)
            for (state, kwargs), reply in zip(calls, replies, strict=True)
        ]

    def _stored_args(self, job_id: str, *, outcome: str, entry: str, usage: Sequence[float]) -> list[Any]:
        prompt, image, generated, model_ms = usage
        return [job_id, outcome, entry, int(prompt), int(image), int(generated), repr(float(model_ms)),
                self.settings.bulk_segment_jobs, *self._ttls()]

    def _ttls(self) -> tuple[int, int, str]:
        return self.settings.bulk_ttl_s, self.settings.bulk_finished_ttl_s, self.segment_prefix

    # -- the completion log -----------------------------------------------------------------

    def segment(self, seq: int) -> bytes | None:
        """A sealed segment still waiting in Redis, or None once it is in S3."""
        return self._call("get", keys.bulk_segment_key(self.bulk_id, seq))

    def segment_written(self, seq: int) -> None:
        """The segment is in S3: drop it from Redis."""
        try:
            pipe = self.client.pipeline(transaction=True)
            pipe.delete(keys.bulk_segment_key(self.bulk_id, seq)).zrem(self.sealed_key, seq)
            pipe.execute()
        except redis.RedisError as exc:
            raise BackendUnavailable(f"bulk run {self.bulk_id}: Redis is unreachable ({type(exc).__name__})") from exc

    def claim_stale(self, *, age_s: float, limit: int = 20) -> list[int]:
        """Sealed segments whose writer seems gone, now claimed by the caller to write."""
        return [int(seq) for seq in self._run("claim_stale", "", age_s, limit)]

    def log_snapshot(self) -> tuple[dict[int, bytes], list[bytes]]:
        """What of the log is still in Redis, read at once: sealed segments by number, and the tail."""
        try:
            pipe = self.client.pipeline(transaction=True)
            pipe.zrange(self.sealed_key, 0, -1).lrange(self.log_key, 0, -1)
            sealed, tail = pipe.execute()
            seqs = [int(seq) for seq in sealed]
            bodies = self.client.mget([keys.bulk_segment_key(self.bulk_id, seq) for seq in seqs]) if seqs else []
        except redis.RedisError as exc:
            raise BackendUnavailable(f"bulk run {self.bulk_id}: Redis is unreachable ({type(exc).__name__})") from exc
        # A segment written and dropped between the two reads is in S3 by then.
        return {seq: body for seq, body in zip(seqs, bodies, strict=True) if body is not None}, list(tail)
