"""Bulk-run progress, as a lifecycle hook: each job of a run is counted and logged by the worker that stored it.

    on_started   jobs of a run about to run in a model count as running (status thread)
    on_stored    the job's outcome is counted and appended to its run's completion log, in one
                 script, exactly once per job (producer/bulk/lua/stored.lua: a job leaves its
                 run's in-flight set once, so a redelivery, which calls on_stored again with
                 created=False, or a duplicate message changes nothing). It runs before the ack:
                 when Redis is away it raises BackendUnavailable and the message is handed back,
                 so no outcome goes uncounted. The worker that sealed a segment of the log writes
                 it to S3; the one that stored a run's last job ends the run and writes its final
                 status.json (producer/bulk/completions.py says why the workers drain). A batch's
                 jobs come at once (on_stored_batch): their scripts go in one pipeline

Jobs without a ``bulk_id`` cost nothing here.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import redis

from producer.bulk.completions import Completions
from producer.bulk.state import RunState
from producer.bulk.store import BulkStore
from producer.errors import BackendUnavailable, TransientError
from producer.schema import Job, Record
from producer.settings import Settings
from worker.hooks import Hook, StoredJob

log = logging.getLogger(__name__)


class BulkRuns(Hook):
    """Keeps every bulk run's counts, completion log and S3 mirror up to date from this worker's outcomes."""

    def __init__(self, *, client: redis.Redis, s3_client: Any, settings: Settings) -> None:
        self.client = client
        self.s3 = s3_client
        self.settings = settings

    def _completions(self, bulk_id: str) -> Completions:
        state = RunState(self.client, bulk_id, settings=self.settings)
        store = BulkStore(self.s3, bucket=self.settings.s3_bucket, prefix=self.settings.s3_prefix, bulk_id=bulk_id)
        return Completions(state, store)

    def on_started(self, jobs: Sequence[Job]) -> None:
        runs: dict[str, list[str]] = defaultdict(list)
        for job in jobs:
            if job.bulk_id is not None:
                runs[job.bulk_id].append(job.job_id)
        for bulk_id, job_ids in runs.items():
            # An observer: a lost "running" only shows the job as queued until its outcome.
            RunState(self.client, bulk_id, settings=self.settings).started(job_ids)

    def on_stored(self, record: Record, *, job: Job, created: bool) -> None:
        if job.bulk_id is None:
            return
        stored = self._completions(job.bulk_id).record(record)
        if stored.ended:
            log.info("bulk run %s ended with job %s", job.bulk_id, job.job_id)

    def on_stored_batch(self, stored: Sequence[StoredJob]) -> list[TransientError | None]:
        """The batch's jobs of bulk runs counted in one pipeline (each still one stored.lua: once per job); the rest cost nothing."""
        failures: list[TransientError | None] = [None] * len(stored)
        bulk = [(index, item) for index, item in enumerate(stored) if item.job.bulk_id is not None]
        if not bulk:
            return failures
        runs: dict[str, Completions] = {}
        for _, item in bulk:
            bulk_id = str(item.job.bulk_id)
            if bulk_id not in runs:
                runs[bulk_id] = self._completions(bulk_id)
        counted = Completions.record_many([(runs[str(item.job.bulk_id)], item.record) for _, item in bulk])
        for (index, item), outcome in zip(bulk, counted, strict=True):
            if isinstance(outcome, BackendUnavailable):
                failures[index] = outcome
            elif outcome.ended:
                log.info("bulk run %s ended with job %s", item.job.bulk_id, item.job.job_id)
        return failures
