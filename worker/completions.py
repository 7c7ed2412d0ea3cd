"""Completion events, as a lifecycle hook: one entry in ``VQA_EVENTS_STREAM`` per stored record (producer/events.py).

``on_stored`` runs on the writer thread, after the record is in S3 and the result backend and
before the message is acked, never on the model thread; a batch's jobs at once
(``on_stored_batch``: their scripts in one pipeline, one round trip). One script per job does
both halves atomically in Redis:

    SET vqa:event-sent:<job> NX EX ttl   -- the marker: this job's event exists
    XADD stream MAXLEN ~ n * fields       -- only when the marker was new

so that:

* the normal case appends exactly one event;
* a redelivered job whose record already existed (``created=False``) finds the marker and
  appends nothing;
* a worker killed after storing and before the script ran left no marker, so the redelivery
  (``created=False`` too) appends the event: at-least-once, not at-most-once;
* when Redis is away the hook raises BackendUnavailable, the message goes back, and the
  redelivery tries again. A marker set and an event lost cannot happen: it is one script.

The marker lives ``VQA_EVENTS_DEDUPE_TTL_S``; a job redelivered after that emits again, which
is why consumers still dedupe on ``job_id``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import redis

from producer import keys
from producer.errors import BackendUnavailable, TransientError
from producer.events import event_fields
from producer.schema import Job, Record
from producer.settings import Settings
from worker.hooks import Hook, StoredJob

log = logging.getLogger(__name__)

# KEYS[1] marker, KEYS[2] stream; ARGV[1] ttl, ARGV[2] maxlen, ARGV[3..] field, value pairs.
_EMIT = """
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then
  local fields = {}
  for i = 3, #ARGV do fields[#fields + 1] = ARGV[i] end
  return redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', unpack(fields))
end
return false
"""


class CompletionEvents(Hook):
    """Appends each stored record's completion event to the events stream, once per job."""

    def __init__(self, client: redis.Redis, *, settings: Settings) -> None:
        self.client = client
        self.settings = settings
        self._emit = client.register_script(_EMIT)
        self.appended = 0  # events this worker appended (the rest were duplicates)

    def on_stored(self, record: Record, *, job: Job, created: bool) -> None:
        try:
            entry = self._emit(keys=self._keys(record), args=self._args(record, job))
        except redis.RedisError as exc:
            raise BackendUnavailable(f"cannot append the completion event of job {record.job_id}: {exc}") from exc
        self._appended(record, entry, created=created)

    def on_stored_batch(self, stored: Sequence[StoredJob]) -> list[TransientError | None]:
        """Each job's script, all in one pipeline; a job whose script Redis did not know yet is sent alone."""
        pipe = self.client.pipeline(transaction=False)
        for item in stored:
            script_keys = self._keys(item.record)
            pipe.evalsha(self._emit.sha, len(script_keys), *script_keys, *self._args(item.record, item.job))
        try:
            replies = pipe.execute(raise_on_error=False)
        except redis.RedisError as exc:
            return [BackendUnavailable(f"cannot append the completion events of {len(stored)} jobs: {exc}")] * len(stored)
        failures: list[TransientError | None] = []
        for item, reply in zip(stored, replies, strict=True):
            if isinstance(reply, redis.exceptions.NoScriptError):  # a restarted or new Redis: the Script loads it
                failures.extend(super().on_stored_batch([item]))
            elif isinstance(reply, Exception):
                failures.append(BackendUnavailable(f"cannot append the completion event of job {item.record.job_id}: {reply}"))
            else:
                self._appended(item.record, reply, created=item.created)
                failures.append(None)
        return failures

    def _keys(self, record: Record) -> list[str]:
        return [keys.event_sent_key(record.job_id), self.settings.events_stream]

    def _args(self, record: Record, job: Job) -> list[str | int]:
        fields = event_fields(record, bucket=self.settings.s3_bucket, prefix=self.settings.s3_prefix, webhook_url=job.webhook_url)
        argv: list[str | int] = [self.settings.events_dedupe_ttl_s, self.settings.events_maxlen]
        for name, value in fields.items():
            argv += [name, value]
        return argv

    def _appended(self, record: Record, entry: object, *, created: bool) -> None:
        if entry is not None:
            self.appended += 1
        elif created:
            # A new record whose event exists: a duplicate message of a job another delivery finished.
            log.debug("job %s: completion event already appended", record.job_id)
