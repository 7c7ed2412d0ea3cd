"""Reading back what happened: every accepted job's records in S3 and the result backend, and its executions.

The test bucket has versioning on, so a record written twice shows as two versions even if the
second write carried the same bytes: "exactly once" is checked on the writes, not only on the
final state.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import redis

from producer import keys
from worker.broker import held_messages

_FINAL = {"SUCCESS", "FAILURE"}


@dataclass
class Audit:
    """The history of a set of accepted jobs, as the stores tell it."""

    jobs: int
    lost: list[str] = field(default_factory=list)  # no record in S3, or no final state in the backend
    duplicate_records: int = 0  # extra writes of a job's record, or a success and a failure both standing
    disagreements: list[str] = field(default_factory=list)  # backend state or record differs from S3
    duplicate_executions: int = 0  # model runs beyond the first, summed over jobs
    executions: dict[str, int] = field(default_factory=dict)
    records: dict[str, dict[str, Any]] = field(default_factory=dict)  # job id -> the S3 record

    @property
    def failed(self) -> dict[str, str]:
        return {job_id: r["error"]["code"] for job_id, r in self.records.items() if r["status"] == "failed"}

    def finished_at(self, job_ids: Iterable[str]) -> float:
        """Latest finish time (epoch seconds) among ``job_ids``."""
        return max(datetime.fromisoformat(self.records[job_id]["finished_at"]).timestamp() for job_id in job_ids)

    def summary(self) -> dict[str, Any]:
        return {
            "jobs": self.jobs,
            "lost": len(self.lost),
            "duplicate_records": self.duplicate_records,
            "duplicate_executions": self.duplicate_executions,
            "backend_disagreements": len(self.disagreements),
            "failed_records": len(self.failed),
        }


class History:
    """Reads S3 (the authority), the result backend and the execution counters for one test's jobs."""

    def __init__(self, *, s3: Any, bucket: str, backend_url: str, broker_url: str, prefix: str = "") -> None:
        self.s3 = s3
        self.bucket = bucket
        self.prefix = prefix
        self.backend = redis.Redis.from_url(backend_url)
        self.broker = redis.Redis.from_url(broker_url)

    def close(self) -> None:
        self.backend.close()
        self.broker.close()

    def finished(self, job_ids: Iterable[str]) -> set[str]:
        """Jobs with a final state in the backend and a record in S3.

        The backend is read first (cheap); S3 is listed only once every job looks final there.
        """
        ids = sorted(set(job_ids))
        states = self._backend_states(ids)
        final = {job_id for job_id in ids if (states.get(job_id) or {}).get("status") in _FINAL}
        if len(final) < len(ids):
            return final
        current = self._current_keys()
        return {job_id for job_id in final if self._result(job_id) in current or self._failed(job_id) in current}

    def wait(self, job_ids: Iterable[str], *, timeout: float, poll_s: float = 0.1) -> float:
        """Block until every job is finished; return the wall-clock time (epoch s) that happened. AssertionError on timeout."""
        ids = set(job_ids)
        deadline = time.monotonic() + timeout
        while True:
            missing = ids - self.finished(ids)
            if not missing:
                return time.time()
            if time.monotonic() > deadline:
                traces = [self.trace(job_id) for job_id in sorted(missing)[:3]]
                raise AssertionError(f"{len(missing)} of {len(ids)} jobs unfinished after {timeout} s: {traces}")
            time.sleep(poll_s)

    def trace(self, job_id: str, *, queue: str = "vqa") -> dict[str, Any]:
        """Where a job is: its submission claim, counters, message (queued or unacked) and backend state."""
        queued = sum(1 for raw in self.broker.lrange(queue, 0, -1) if json.loads(raw)["headers"]["id"] == job_id)
        unacked = sum(1 for raw in held_messages(self.broker, queue) if json.loads(raw)["headers"]["id"] == job_id)
        return {
            "job_id": job_id,
            "claim": self.broker.get(keys.submitted_key(job_id)),
            "deliveries": self.broker.get(keys.deliveries_key(job_id)),
            "executions": self.broker.get(keys.executions_key(job_id)),
            "queued_messages": queued,
            "unacked_messages": unacked,
            "backend": self._backend_states([job_id]).get(job_id, {}).get("status"),
        }

    def audit(self, job_ids: Iterable[str]) -> Audit:
        ids = sorted(set(job_ids))
        result = Audit(jobs=len(ids))
        versions = self._versions()
        states = self._backend_states(ids)
        raw_counts = self.broker.mget([keys.executions_key(job_id) for job_id in ids]) if ids else []
        for job_id, raw in zip(ids, raw_counts, strict=True):
            result.executions[job_id] = int(raw or 0)
            result.duplicate_executions += max(0, int(raw or 0) - 1)
        for job_id in ids:
            ok, failed = versions[self._result(job_id)], versions[self._failed(job_id)]
            result.duplicate_records += max(0, ok - 1) + max(0, failed - 1) + (1 if ok and failed and self._both_current(job_id) else 0)
            record = self._read_record(job_id, has_result=ok > 0)
            state = states.get(job_id)
            if record is None or state is None or state.get("status") not in _FINAL:
                result.lost.append(job_id)
                continue
            result.records[job_id] = record
            if not _agrees(record, state):
                result.disagreements.append(job_id)
        return result

    # -- S3 ---------------------------------------------------------------------------------

    def _result(self, job_id: str) -> str:
        return keys.result_key(self.prefix, job_id)

    def _failed(self, job_id: str) -> str:
        return keys.failed_key(self.prefix, job_id)

    def _current_keys(self) -> set[str]:
        found = set()
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix):
            found.update(item["Key"] for item in page.get("Contents", []))
        return found

    def _versions(self) -> Counter[str]:
        """How many times each key was written (delete markers aside)."""
        counts: Counter[str] = Counter()
        for page in self.s3.get_paginator("list_object_versions").paginate(Bucket=self.bucket, Prefix=self.prefix):
            counts.update(item["Key"] for item in page.get("Versions", []))
        return counts

    def _both_current(self, job_id: str) -> bool:
        current = self._current_keys()
        return self._result(job_id) in current and self._failed(job_id) in current

    def _read_record(self, job_id: str, *, has_result: bool) -> dict[str, Any] | None:
        for key in (self._result(job_id), self._failed(job_id)) if has_result else (self._failed(job_id),):
            try:
                return json.loads(self.s3.get_object(Bucket=self.bucket, Key=key)["Body"].read())
            except self.s3.exceptions.NoSuchKey:
                continue
        return None

    # -- result backend ---------------------------------------------------------------------

    def _backend_states(self, job_ids: list[str]) -> dict[str, dict[str, Any]]:
        if not job_ids:
            return {}
        raw = self.backend.mget([f"celery-task-meta-{job_id}" for job_id in job_ids])
        return {job_id: json.loads(value) for job_id, value in zip(job_ids, raw, strict=True) if value}


def _agrees(record: dict[str, Any], state: dict[str, Any]) -> bool:
    """The backend holds the same outcome as S3: SUCCESS with the same record, or FAILURE carrying it."""
    if record["status"] == "succeeded":
        return state["status"] == "SUCCESS" and state.get("result") == record
    if state["status"] != "FAILURE":
        return False
    result = state.get("result") or {}
    message = result.get("exc_message") if isinstance(result, dict) else None
    carried = message[1] if isinstance(message, list | tuple) and len(message) > 1 else None
    return carried == record
