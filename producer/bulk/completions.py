"""The completion path of a bulk run: outcomes counted and logged by the workers, drained to S3, read back in bulk.

A worker that stored a bulk job's record calls :meth:`Completions.record` (worker/bulkruns.py,
before the message is acked). One script counts the outcome and appends the job's entry to the
run's log, once per job. Every ``VQA_BULK_SEGMENT_JOBS`` entries the script seals the log into a
numbered segment, and the worker that sealed it writes it to S3 at once and drops it from Redis.

Workers drain, not the submitter: they are the ones making the log grow, they run as long as
jobs finish (a submitter may have exited once everything was published, or been killed), and a
segment costs one PUT per 1,000 jobs on a store thread, beside the 1,000 record PUTs it follows.
A segment whose writer died between sealing and writing stays in Redis; after
``STALE_SEGMENT_S`` any worker sealing a segment, the ending of the run, a submitter, and every
results collection claim it and write it. Readers never wait for that: they read what is still
in Redis too.

Collecting a run (:func:`entries`) reads Redis first (sealed segments and the tail, at once),
then the S3 segments: an entry moves from Redis to S3 only after its segment is written, so it
is seen at least once; duplicates are dropped by job id.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from typing import Any

from producer.bulk.state import RunState, Stored
from producer.bulk.store import BulkStore
from producer.errors import STOPPED_CODES, BackendUnavailable, VQAError
from producer.schema import Record

log = logging.getLogger(__name__)

STALE_SEGMENT_S = 60.0


def outcome_of(record: Record) -> str:
    """succeeded, failed, cancelled or expired: what the run counts the record as."""
    if record.status == "succeeded":
        return "succeeded"
    if record.error is not None and record.error.code in STOPPED_CODES:
        return record.error.code
    return "failed"


def _stored_call(record: Record) -> dict[str, Any]:
    """What :meth:`RunState.stored` counts and logs for a record."""
    usage = record.usage
    counts = (0, 0, 0, 0.0) if usage is None else (usage.prompt_tokens, usage.image_tokens, usage.generated_tokens, usage.model_ms)
    entry = json.dumps(entry_of(record), separators=(",", ":"), ensure_ascii=False)
    return {"job_id": record.job_id, "outcome": outcome_of(record), "entry": entry, "usage": counts}


def entry_of(record: Record) -> dict[str, Any]:
    """The job's line in the completion log: everything its line in the results file needs."""
    error = record.error
    usage = record.usage
    return {
        "custom_id": record.custom_id,
        "question": record.question,
        "job_id": record.job_id,
        "status": outcome_of(record),
        "answer": record.answer,
        "error": None if error is None else {"code": error.code, "message": error.message},
        "usage": None if usage is None else usage.model_dump(),
    }


class Completions:
    """One run's completion log: recorded by workers, drained to S3, read by results collection."""

    def __init__(self, state: RunState, store: BulkStore) -> None:
        self.state = state
        self.store = store

    def record(self, record: Record) -> Stored:
        """Count and log a stored record once; write what that sealed. Raises BackendUnavailable when Redis is away."""
        stored = self.state.stored(**_stored_call(record))
        self._written(stored)
        return stored

    @staticmethod
    def record_many(items: Sequence[tuple[Completions, Record]]) -> list[Stored | BackendUnavailable]:
        """:meth:`record` for a batch's jobs (of one run or several), counted in one Redis round trip; per job, what counting did or why it could not."""
        counted = RunState.stored_many([(completions.state, _stored_call(record)) for completions, record in items])
        for (completions, _), stored in zip(items, counted, strict=True):
            if isinstance(stored, Stored):
                completions._written(stored)
        return counted

    def _written(self, stored: Stored) -> None:
        """After a job was counted: write the segment it sealed, and the run's status when it ended it."""
        if stored.segment or stored.ended:
            # The outcome is counted and logged in Redis already: nothing below may hand the
            # message back. What fails here is picked up later (stale segments, the next mirror).
            try:
                if stored.segment:
                    self.drain(stored.segment)
                self.drain_stale()
                mirror_status(self.state, self.store, invalid=stored.ended)
            except VQAError as exc:
                log.warning("bulk run %s: %s; retried later", self.state.bulk_id, exc)

    def drain(self, seq: int) -> None:
        """Write a sealed segment to S3, then drop it from Redis (a segment already gone was written)."""
        body = self.state.segment(seq)
        if body is None:
            return
        self.store.put_segment(seq, body)
        self.state.segment_written(seq)

    def drain_stale(self) -> int:
        """Write the segments whose writer seems to have died; return how many."""
        seqs = self.state.claim_stale(age_s=STALE_SEGMENT_S)
        for seq in seqs:
            self.drain(seq)
        return len(seqs)

    def entries(self) -> Iterator[dict[str, Any]]:
        """Every logged outcome of the run once, roughly in completion order."""
        sealed, tail = self.state.log_snapshot()
        seen: set[str] = set()
        for seq in sorted(set(self.store.segment_numbers()) | sealed.keys()):
            body = sealed[seq] if seq in sealed else self.store.get_segment(seq)
            if body is not None:
                yield from _fresh(body.splitlines(), seen)
        yield from _fresh(tail, seen)


def _fresh(lines: list[bytes], seen: set[str]) -> Iterator[dict[str, Any]]:
    for line in lines:
        if not line.strip():
            continue
        entry = json.loads(line)
        if entry["job_id"] in seen:
            continue
        seen.add(entry["job_id"])
        yield entry


def mirror_status(state: RunState, store: BulkStore, *, invalid: bool = False) -> None:
    """Write the run's status to S3 (and its invalid.jsonl with ``invalid``).

    Several processes mirror a run (submitter, workers), so a snapshot taken just before the run
    ended may land after the final one: after writing, a writer that sees the run ended since
    its snapshot writes the final status again. The last write is then always the final one.
    """
    status = state.snapshot()
    if status is None:
        return
    if invalid and status.counts.invalid:
        store.put_invalid(state.invalid_reports())
    store.put_status(status)
    if not status.ended:
        after = state.snapshot()
        if after is not None and after.ended:
            if after.counts.invalid:
                store.put_invalid(state.invalid_reports())
            store.put_status(after)
