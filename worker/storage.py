"""Where records go: S3 (authoritative, write-once per job) and the Celery result backend."""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import boto3
import botocore.handlers
import redis
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from celery import Celery
from kombu.exceptions import OperationalError

from producer import keys
from producer.errors import STOPPED_CODES, BackendUnavailable, CorruptRecord, JobFailed, StorageUnavailable
from producer.schema import Record, parse_record
from producer.settings import Settings

log = logging.getLogger(__name__)

_MISSING = {"NoSuchKey", "404", "NotFound"}
_CONDITION_FAILED = {"PreconditionFailed", "412"}
# AWS answers 409 while a *concurrent* conditional write to the key is still in progress: that
# write may yet fail, so nothing can be concluded; it is retried like any transient error.
_CONDITION_CONFLICT = {"ConditionalRequestConflict", "409"}
_CONDITION_UNSUPPORTED = {"NotImplemented", "501"}


def make_s3_client(settings: Settings) -> Any:
    """One boto3 client; credentials from the standard AWS sources, short timeouts so outages surface."""
    config = Config(
        connect_timeout=5,
        read_timeout=30,
        retries={"mode": "standard", "max_attempts": 3},
        # The queue's own CPU per job (issue 14): the records are small JSON built here, so
        # botocore's per-call parameter validation and body checksums buy nothing.
        parameter_validation=False,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    client = boto3.client("s3", endpoint_url=settings.s3_endpoint_url, config=config)
    # A record is a few hundred bytes: "Expect: 100-continue" makes each PUT wait for the
    # server's go-ahead before sending them, an extra exchange per job for nothing.
    client.meta.events.unregister("before-call.s3", botocore.handlers.add_expect_header)
    return client


class Stored(NamedTuple):
    """What S3 holds for the job after a write, and whether this write created it."""

    record: Record
    created: bool


class RecordStore:
    """Writes each job's record once to S3 and mirrors it into the result backend.

    Success records are created with ``If-None-Match: *`` so a redelivered or duplicate job
    never overwrites the first answer; where the endpoint cannot do conditional writes, a
    checked create (GET, then PUT) is used instead.

    With ``marks`` (the jobs' Redis), a failed record is announced in Redis before it is
    written (:func:`producer.keys.failed_mark_key`), and a success deletes the failed key only
    when a mark says one may exist: the common success costs one S3 request, the create. A
    Redis that cannot be read counts as "may exist" (the DELETE is sent); one that cannot be
    written to stops the failed write (retried), so a mark is never missing beside a failed record.
    """

    def __init__(self, settings: Settings, *, s3_client: Any, app: Celery, marks: redis.Redis | None = None) -> None:
        self.bucket = settings.s3_bucket
        self.prefix = settings.s3_prefix
        self.s3 = s3_client
        self.app = app
        self.marks = marks
        self._conditional_puts = True

    # -- S3 ---------------------------------------------------------------------------------

    def existing(self, job_id: str) -> Record | None:
        """The job's success record if one was already written; CorruptRecord if the object there is unreadable."""
        key = keys.result_key(self.prefix, job_id)
        body = self._get(key)
        return None if body is None else parse_record(body, key=key)

    def write(self, record: Record, *, drop_failed: bool = True) -> Stored:
        """Write the record; return what S3 now holds for the job (the first success wins).

        With ``drop_failed=False`` a created success leaves deleting a failed record of the job
        to the caller (:meth:`drop_failed`, a batch at once), who must do it before the job counts
        as done.

        Raises StorageUnavailable (retry) when S3 is away or a conditional create conflicted
        with no winner readable yet, and CorruptRecord when the success key holds an
        unreadable object (a success cannot be written there; the caller fails the job).
        """
        body = record.model_dump_json().encode()
        if record.status == "failed":
            return self._write_failed(record, body)
        key = keys.result_key(self.prefix, record.job_id)
        if not self._create(key, body):
            winner = self.existing(record.job_id)
            if winner is None:
                # 412, yet nothing there: the competing write is not visible yet (or was undone).
                # Acking now would leave the job with no record at all.
                raise StorageUnavailable(f"S3 refused to create {key} but holds no readable record yet")
            log.info("job %s already had a record; keeping the first", record.job_id, extra={"job_id": record.job_id})
            return Stored(winner, created=False)
        if drop_failed:
            self.drop_failed([record.job_id])
        return Stored(record, created=True)

    def drop_failed(self, job_ids: list[str]) -> None:
        """After successes were created: delete each job's failed record, if one may exist (one Redis round trip for the lot)."""
        if not job_ids:
            return
        may_exist = job_ids
        if self.marks is not None:
            try:
                marks = self.marks.mget([keys.failed_mark_key(job_id) for job_id in job_ids])
                may_exist = [job_id for job_id, mark in zip(job_ids, marks, strict=True) if mark is not None]
            except redis.RedisError:
                pass  # cannot tell: delete, as without marks
        for job_id in may_exist:
            if self._delete_quietly(keys.failed_key(self.prefix, job_id)) and self.marks is not None:
                try:
                    self.marks.delete(keys.failed_mark_key(job_id))
                except redis.RedisError:
                    pass  # a stale mark only costs a later success one DELETE

    def _write_failed(self, record: Record, body: bytes) -> Stored:
        """A failed record never stands next to a success: a redelivered copy that failed loses to one that succeeded.

        Checked before and after the write: a success created meanwhile either deleted our failed
        record already (it deletes after creating) or is seen by the second check. An unreadable
        object at the success key is no success: the failure is recorded beside it.
        """
        if self.marks is not None:
            # Before the first check: a success created after it reads the mark and deletes our record.
            try:
                self.marks.set(keys.failed_mark_key(record.job_id), 1)
            except redis.RedisError as exc:
                raise BackendUnavailable(f"cannot mark job {record.job_id} as failed in Redis: {type(exc).__name__}") from exc
        winner = self._readable_success(record.job_id)
        if winner is None:
            key = keys.failed_key(self.prefix, record.job_id)
            self._put(key, body)
            winner = self._readable_success(record.job_id)
            if winner is None:
                return Stored(record, created=True)
            self._delete_quietly(key)
        log.info("job %s already succeeded elsewhere; its failure here is dropped", record.job_id, extra={"job_id": record.job_id})
        return Stored(winner, created=False)

    def _readable_success(self, job_id: str) -> Record | None:
        try:
            return self.existing(job_id)
        except CorruptRecord:
            return None

    def _create(self, key: str, body: bytes) -> bool:
        """Create ``key`` unless it exists. False when it already existed."""
        if self._conditional_puts:
            try:
                self._call("put_object", Bucket=self.bucket, Key=key, Body=body, ContentType="application/json", IfNoneMatch="*")
                return True
            except _ConditionFailed:
                return False
            except _ConditionUnsupported:
                log.warning("S3 endpoint does not support If-None-Match; falling back to a checked create")
                self._conditional_puts = False
        if self._get(key) is not None:
            return False
        self._put(key, body)
        return True

    def _put(self, key: str, body: bytes) -> None:
        self._call("put_object", Bucket=self.bucket, Key=key, Body=body, ContentType="application/json")

    def _get(self, key: str) -> bytes | None:
        try:
            response = self._call("get_object", Bucket=self.bucket, Key=key)
            return response["Body"].read()
        except _Missing:
            return None

    def _delete_quietly(self, key: str) -> bool:
        try:
            self._call("delete_object", Bucket=self.bucket, Key=key)
            return True
        except StorageUnavailable:
            log.warning("could not delete stale %s; the success record stands", key)
            return False

    def _call(self, operation: str, **params: Any) -> Any:
        """Every S3 call goes through here so botocore errors are translated in one place."""
        try:
            return getattr(self.s3, operation)(**params)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in _MISSING:
                raise _Missing() from exc
            if code in _CONDITION_CONFLICT or status == 409:
                raise StorageUnavailable(f"S3 {operation}: a concurrent conditional write is in progress ({code or status})") from exc
            if code in _CONDITION_FAILED or status == 412:
                raise _ConditionFailed() from exc
            if code in _CONDITION_UNSUPPORTED:
                raise _ConditionUnsupported() from exc
            raise StorageUnavailable(f"S3 {operation} failed: {code or status}") from exc
        except BotoCoreError as exc:
            raise StorageUnavailable(f"S3 {operation} failed: {type(exc).__name__}") from exc

    def ensure_bucket(self) -> None:
        """Create the bucket if it is missing (handy for MinIO and tests; on AWS it usually exists)."""
        try:
            self._call("head_bucket", Bucket=self.bucket)
        except (_Missing, StorageUnavailable):
            try:
                self._call("create_bucket", Bucket=self.bucket)
            except StorageUnavailable as exc:
                if "BucketAlreadyOwnedByYou" not in str(exc):
                    raise

    # -- result backend ---------------------------------------------------------------------

    def publish(self, record: Record) -> None:
        """Mirror the record into the Celery result backend so ``AsyncResult(job_id)`` sees it."""
        self.publish_batch([record])

    def publish_batch(self, records: list[Record]) -> None:
        """Mirror a batch's records into the result backend: its successes in two round trips, a failure as Celery stores it.

        Failures are rare and carry an exception for ``AsyncResult.get()`` to raise, so they go
        through Celery's own store_result, one by one.
        """
        self._write_states([(record.job_id, record.model_dump(mode="json")) for record in records if record.status == "succeeded"], "SUCCESS")
        for record in (record for record in records if record.status != "succeeded"):
            error = record.error
            message = f"{error.code}: {error.message}" if error else "failed"
            # Celery's own state for a revoked task: AsyncResult(...).state is REVOKED, get() raises.
            state = "REVOKED" if error is not None and error.code in STOPPED_CODES else "FAILURE"
            self._backend_call(self.app.backend.store_result, record.job_id, JobFailed(message, record.model_dump(mode="json")), state)

    def mark_started(self, job_ids: list[str]) -> None:
        """A batch's STARTED states in two round trips; as store_result does, a job already in SUCCESS keeps it."""
        self._write_states([(job_id, None) for job_id in job_ids], "STARTED")

    def _write_states(self, results: list[tuple[str, Any]], state: str) -> None:
        """What Celery's store_result writes for each ``(job_id, result)``, in two round trips for the lot, not two per job.

        As store_result does, a job whose backend state is already SUCCESS keeps it (a late
        duplicate never overwrites the first answer), and each write is published for the
        ``AsyncResult`` listeners, with the backend's expiry.
        """
        if not results:
            return
        backend = self.app.backend
        client = getattr(backend, "client", None)
        if client is None:  # not a Redis backend: Celery's own call, job by job
            for job_id, result in results:
                self._backend_call(backend.store_result, job_id, result, state)
            return
        names = [backend.get_key_for_task(job_id) for job_id, _ in results]
        # Celery's meta but the result and the task id is the same for every job of the batch.
        meta = backend._get_result_meta(result=None, state=state, traceback=None, request=None)

        def write() -> None:
            current = client.mget(names)
            pipe = client.pipeline(transaction=False)
            for (job_id, result), name, raw in zip(results, names, current, strict=True):
                if raw is not None and backend.decode_result(raw).get("status") == "SUCCESS":
                    continue
                value = backend.encode({**meta, "result": backend.encode_result(result, state), "task_id": job_id})
                pipe.set(name, value, ex=backend.expires or None)
                pipe.publish(name, value)  # as Celery's set does: AsyncResult listeners hear of it
            pipe.execute()

        self._backend_call(write)

    def _backend_call(self, fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except (redis.RedisError, OperationalError, OSError) as exc:
            raise BackendUnavailable(f"result backend write failed: {type(exc).__name__}") from exc


class _Missing(Exception):
    pass


class _ConditionFailed(Exception):
    pass


class _ConditionUnsupported(Exception):
    pass
