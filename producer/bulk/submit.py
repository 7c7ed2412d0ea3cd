"""The submitter: reads a manifest as it streams and publishes it in chunks, never more than the window ahead.

Rows become chunks (jobs validated, messages encoded, invalid lines reported), and each chunk
goes to publish.lua in one round trip, which pushes its messages, adds its jobs to the run's
in-flight set and moves the run's cursor past it, all at once, and refuses while
``in flight + chunk > window``. One chunk at a time is held, so the producer's memory is flat for
any manifest; custom ids for the duplicate check are kept on disk (producer/bulk/lines.py).
(Reading on a thread of its own was slower: the two threads fought over the GIL for every
piece of a chunk's send.)

Resume: a submitter killed anywhere (``kill -9``) left the cursor after the last chunk it
published, and nothing half-published. Run again, it reads the manifest from the start (an S3
listing from after the last key), validates every line again (the duplicate check needs the
custom ids before the cursor) and publishes only what lies after the cursor. A job is thus
published once; one that finished has its outcome, one in flight is queued or running.

One submitter per run: a lease in Redis, renewed while it publishes and checked by every
publish (a stalled process that lost it publishes nothing). A holder on this host whose process
is gone is taken over at once, any other after its lease expires.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from producer import keys, messages
from producer.bulk.completions import Completions, mirror_status
from producer.bulk.ids import derive_bulk_id
from producer.bulk.lines import MAX_QUESTIONS_PER_LINE, InvalidLine, LineJobs, SeenIds, invalid_report
from producer.bulk.manifest import Manifest
from producer.bulk.state import Chunk, RunState
from producer.bulk.status import BulkStatus
from producer.bulk.store import BulkStore
from producer.connections import redis_client
from producer.errors import InvalidJob, RunBusy, TransientError, VQAError
from producer.schema import parse_duration, utcnow

if TYPE_CHECKING:
    from producer.client import VQAClient

log = logging.getLogger(__name__)

LEASE_TTL_S = 15.0  # renewed every third of it
_STALE_DRAIN_S = 30.0
_REDIS_PATIENCE_S = 60.0  # a Redis outage shorter than this only pauses publishing
_FLUSH_S = 1.0  # a slow stream (stdin) still publishes what it has at least this often


@dataclass(frozen=True)
class BulkOptions:
    """A run's options. All but ``window``, ``strict`` and ``priority`` are part of what the run is (and of its derived id)."""

    questions: tuple[str, ...] = ()
    max_new_tokens: int | None = None
    expires_in: str | float | None = None
    webhook_url: str | None = None
    window: int | None = None  # None: VQA_BULK_WINDOW; 0: no limit
    strict: bool = False
    # The run's lane (producer/keys.py PRIORITIES). Low by default: interactive submissions in the
    # default lane overtake a bulk backlog instead of waiting behind a million images.
    priority: str = "low"

    def identity(self, model: str) -> dict[str, Any]:
        return {
            "questions": [question.strip() for question in self.questions],
            "max_new_tokens": self.max_new_tokens,
            "expires_in": None if self.expires_in is None else str(self.expires_in),
            "webhook_url": self.webhook_url,
            "model": model,
        }


class InvalidManifest(InvalidJob):
    """``--strict``: the manifest has invalid lines, so nothing was published. ``reports`` holds the first ones."""

    def __init__(self, message: str, reports: list[str]) -> None:
        super().__init__(message)
        self.reports = reports


@dataclass
class Progress:
    """What this submitter did (the run's own counts are in its status)."""

    published: int = 0
    invalid: int = 0
    lines: int = 0
    stopped: str = ""  # why it stopped early: "cancelled", "stopped", or "" when it reached the end
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


class Submitter:
    """Publishes one run's manifest. ``prepare()`` checks and creates the run and takes its lease; ``publish()`` streams it (blocking)."""

    def __init__(
        self,
        client: VQAClient,
        manifest: Manifest,
        *,
        name: str | None,
        options: BulkOptions,
        on_invalid: Callable[[int, str], None] | None = None,
    ) -> None:
        settings = client.settings
        if not client.pushes_messages():
            raise InvalidJob("bulk runs publish ready-made messages: they need a Redis broker and unsigned messages")
        self.client = client
        self.manifest = manifest
        self.options = options
        self.window = settings.bulk_window if options.window is None else options.window
        if 0 < self.window < MAX_QUESTIONS_PER_LINE:
            raise InvalidJob(f"--window must be 0 (no limit) or at least {MAX_QUESTIONS_PER_LINE}")
        self.identity = options.identity(settings.model)
        self.fingerprint, self.lines = manifest.scan()
        if name is None:
            if not self.fingerprint:
                raise InvalidJob("a manifest read from stdin needs --name (its content cannot be hashed up front)")
            name = derive_bulk_id(self.fingerprint, self.identity)
        self.bulk_id = name
        if options.priority not in keys.PRIORITIES:
            raise InvalidJob(f"priority must be one of {', '.join(keys.PRIORITIES)}, not {options.priority[:40]!r}")
        self.priority = keys.PRIORITIES[options.priority]
        queue_key = client.task_messages().key_for(self.priority)
        self.state = RunState(redis_client(settings.broker_url, master_name=settings.sentinel_master_name), name, settings=settings, queue_key=queue_key)
        self.store = BulkStore(client.s3_client(), bucket=settings.s3_bucket, prefix=settings.s3_prefix, bulk_id=name)
        self.on_invalid = on_invalid or (lambda line, reason: None)
        self.progress = Progress()
        self._token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        self._meta: dict[str, str] = {}
        self._renewed = self._mirrored = self._drained = 0.0

    # -- before publishing ------------------------------------------------------------------

    def prepare(self) -> BulkStatus:
        """Create the run, or find it and check it is the same run; with ``strict``, validate every line first."""
        meta = self.state.meta()
        if meta is not None and json.loads(meta.get("options", "{}")) != self.identity:
            raise InvalidJob(f"run {self.bulk_id} exists with other options ({meta.get('options')}); choose another --name")
        if meta is not None and self.fingerprint and meta.get("fingerprint") not in ("", self.fingerprint):
            raise InvalidJob(f"run {self.bulk_id} was created from another manifest; choose another --name")
        if meta is None:
            lasting = self.store.get_status()
            if lasting is not None and lasting.ended:
                self._meta = {"state": lasting.state, "manifest_complete": "1"}
                return lasting  # ended, and Redis has let it go: nothing to publish
            if self.options.strict:
                self._validate_all()
            created = lasting.created_at if lasting is not None else utcnow()
            meta = self.state.create(self._fields(created))
        self._meta = meta
        if self._to_publish():
            self._acquire()
        status = self.state.snapshot()
        assert status is not None
        return status

    def _to_publish(self) -> bool:
        return self._meta.get("state", "in_progress") == "in_progress" and self._meta.get("manifest_complete") != "1"

    def _fields(self, created: datetime) -> dict[str, str]:
        expires = None
        if self.options.expires_in is not None:
            try:
                expires = created + parse_duration(self.options.expires_in)
            except ValueError as exc:
                raise InvalidJob(f"--expires-in: {exc}") from exc
        return {
            "state": "in_progress",
            "source": self.manifest.source,
            "fingerprint": self.fingerprint,
            "options": json.dumps(self.identity, sort_keys=True),
            "created_at": repr(created.timestamp()),
            "expires_at": "" if expires is None else repr(expires.timestamp()),
            "manifest_lines": "" if self.lines is None else str(self.lines),
            "window": str(self.window),
            "manifest_complete": "0",
            "lines_done": "0",
            "total": "0",
        }

    def _validate_all(self) -> None:
        reports: list[str] = []
        count = 0
        builder = self._builder(deadline=None)
        seen = SeenIds()
        try:
            for row in self.manifest.rows():
                try:
                    builder.build(row, seen)
                except InvalidLine as exc:
                    count += 1
                    self.on_invalid(row.line, str(exc))
                    if len(reports) < 100:
                        reports.append(f"line {row.line}: {exc}")
        finally:
            seen.close()
        if count:
            raise InvalidManifest(f"{count} invalid lines; nothing was published (--strict)", reports)

    def _builder(self, *, deadline: datetime | None) -> LineJobs:
        return LineJobs(
            self.client, bulk_id=self.bulk_id, questions=self.options.questions, max_new_tokens=self.options.max_new_tokens,
            deadline=deadline, webhook_url=self.options.webhook_url,
        )

    # -- publishing -------------------------------------------------------------------------

    def publish(self, stop: threading.Event | None = None) -> Progress:
        """Publish what is left of the manifest; return when it is all published, the run is cancelled, or ``stop`` is set."""
        stop = stop or threading.Event()
        progress = self.progress
        try:
            if self._to_publish():
                try:
                    self._publish_all(stop)
                finally:
                    self._quietly(lambda: self.state.release(self._token))
            self._quietly(lambda: mirror_status(self.state, self.store, invalid=True))
        except BaseException as exc:
            progress.error = exc
            raise
        finally:
            progress.done.set()
        return progress

    def _publish_all(self, stop: threading.Event) -> None:
        try:
            for chunk in self._chunks(stop):
                if not self._publish_chunk(chunk, stop):
                    return
                self.progress.lines = chunk.last_line
        except _Stopped:
            self.progress.stopped = "stopped"
            return
        closed, ended, segment = self._retrying(lambda: self.state.close(self._token, lines=self.progress.lines))
        if not closed:
            raise RunBusy(f"run {self.bulk_id}: another submitter took the lease")
        if segment:
            self._quietly(lambda: Completions(self.state, self.store).drain(segment))

    def _publish_chunk(self, chunk: Chunk, stop: threading.Event) -> bool:
        """Publish one chunk, waiting while the window is full; False when publishing must stop."""
        delay = 0.02
        while not stop.is_set():
            self._tick()
            verdict, value = self._retrying(lambda: self.state.publish(self._token, chunk, window=self.window))
            if verdict == "ok":
                self.progress.published += len(chunk.job_ids)
                self.progress.invalid += len(chunk.invalid)
                return True
            if verdict == "full":
                stop.wait(delay)
                delay = min(delay * 1.5, 0.5)
                continue
            if verdict == "stopped":
                self.progress.stopped = "cancelled"
                return False
            raise RunBusy(f"run {self.bulk_id}: another submitter publishes it ({verdict})")
        self.progress.stopped = "stopped"
        return False

    def _chunks(self, stop: threading.Event) -> Iterator[Chunk]:
        cursor = int(self._meta.get("lines_done") or 0)
        expires = self._meta.get("expires_at")
        deadline = datetime.fromtimestamp(float(expires), UTC) if expires else None
        builder = self._builder(deadline=deadline)
        encoder = self.client.task_messages()
        size = min(messages.CHUNK, max(MAX_QUESTIONS_PER_LINE, self.window // 4)) if self.window else messages.CHUNK
        if self.manifest.replays:
            rows = self.manifest.rows()
        else:
            rows = self.manifest.rows(after=self._meta.get("position", ""), after_line=cursor)
        seen = SeenIds()
        ids: list[str] = []
        encoded: list[str] = []
        invalid: list[str] = []
        first = last = 0
        position = ""
        flushed = time.monotonic()
        try:
            for count, row in enumerate(rows):
                if count % 1000 == 0:  # a long replay before the cursor keeps the lease, and can be stopped
                    if stop.is_set():
                        raise _Stopped()
                    self._tick()
                try:
                    jobs = builder.build(row, seen)
                    reason = None
                except InvalidLine as exc:
                    jobs, reason = [], str(exc)
                if row.line <= cursor:
                    continue  # published (or reported) before a restart
                if ids and len(ids) + len(jobs) > size:
                    yield Chunk(first, last, position, ids, encoded, invalid)
                    ids, encoded, invalid, first, flushed = [], [], [], 0, time.monotonic()
                first = first or row.line
                last, position = row.line, row.position
                if reason is not None:
                    self.on_invalid(row.line, reason)
                    invalid.append(invalid_report(row, reason))
                for job in jobs:
                    ids.append(job.job_id)
                    encoded.append(encoder.encode(job, priority=self.priority))
                if len(invalid) >= 1000 or (ids and time.monotonic() - flushed > _FLUSH_S):
                    yield Chunk(first, last, position, ids, encoded, invalid)
                    ids, encoded, invalid, first, flushed = [], [], [], 0, time.monotonic()
            if first:
                yield Chunk(first, last, position, ids, encoded, invalid)
        finally:
            seen.close()

    # -- the lease and housekeeping ---------------------------------------------------------

    def _acquire(self) -> None:
        deadline = time.monotonic() + LEASE_TTL_S + 2
        while True:
            won, holder = self._retrying(lambda: self.state.lease(self._token, ttl_s=LEASE_TTL_S, take_over=_dead_here(self.state.lease_holder())))
            if won:
                self._renewed = time.monotonic()
                return
            if time.monotonic() > deadline:
                raise RunBusy(f"run {self.bulk_id} is being published by {holder}; wait for it, or cancel the run")
            time.sleep(0.5)

    def _tick(self) -> None:
        now = time.monotonic()
        if now - self._renewed > LEASE_TTL_S / 3:
            won, holder = self._retrying(lambda: self.state.lease(self._token, ttl_s=LEASE_TTL_S))
            if not won:
                raise RunBusy(f"run {self.bulk_id}: the lease passed to {holder}")
            self._renewed = now
        if now - self._mirrored > self.client.settings.bulk_status_interval_s:
            self._mirrored = now
            self._quietly(lambda: mirror_status(self.state, self.store, invalid=True))
        if now - self._drained > _STALE_DRAIN_S:
            self._drained = now
            self._quietly(lambda: Completions(self.state, self.store).drain_stale())

    def _retrying(self, call: Callable[[], Any]) -> Any:
        """Redis blips pause publishing; an outage longer than _REDIS_PATIENCE_S ends it (run the command again)."""
        give_up = time.monotonic() + _REDIS_PATIENCE_S
        delay = 0.2
        while True:
            try:
                return call()
            except TransientError as exc:
                if isinstance(exc, RunBusy) or time.monotonic() > give_up:
                    raise
                log.warning("bulk run %s: %s; retrying in %.1f s", self.bulk_id, exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _quietly(self, call: Callable[[], Any]) -> None:
        try:
            call()
        except VQAError as exc:
            log.warning("bulk run %s: %s", self.bulk_id, exc)


class _Stopped(Exception):
    """``stop`` was set while the manifest was being read."""


def _dead_here(holder: str) -> str:
    """The holder's token if it names a process on this host that no longer exists (killed): taken over at once."""
    host, _, rest = holder.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return ""
    pid = int(pid_text)
    if pid == os.getpid():
        return ""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return holder
    except PermissionError:
        return ""
    return ""
