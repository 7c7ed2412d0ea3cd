"""The producer API: submit jobs, wait for them, read their records."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import boto3
import redis
from botocore.exceptions import BotoCoreError, ClientError
from celery import Celery
from kombu.exceptions import OperationalError

from producer import keys, messages
from producer.celery_app import make_celery
from producer.connections import redis_client
from producer.replication import wait_for_replicas
from producer.errors import BackendUnavailable, CorruptRecord, InvalidJob, JobFailed, StorageUnavailable
from producer.revokes import write_revokes
from producer.schema import GenerationSettings, Job, Record, derive_job_id, parse_duration, parse_record, parse_time, utcnow
from producer.settings import Settings

if TYPE_CHECKING:
    from producer.bulk.run import BulkRun

log = logging.getLogger(__name__)

# A queued-but-unfinished job is not enqueued again for this long.
_SUBMITTED_TTL_FLOOR_S = 3600
# A submission claim says "publishing" until the publish returned, then "queued" (see _publish_unqueued).
_PUBLISHING = b"publishing"
_QUEUED = b"queued"
# A "publishing" claim left behind by a failed publish stops blocking resubmissions after this.
_PUBLISHING_TTL_S = 15
# wait() reads the result backend every poll and S3 (one or two GETs) this often: a record the backend lost is found.
_WAIT_S3_EVERY_S = 5.0


class VQAClient:
    """Submit visual questions and collect answers.

    >>> client = VQAClient(Settings())
    >>> job_id = client.submit("https://example.com/cat.jpg", "What animal is this?")
    >>> record = client.wait(job_id, timeout=60)
    """

    def __init__(self, settings: Settings | None = None, *, app: Celery | None = None) -> None:
        self.settings = settings or Settings()
        self.app = app or make_celery(self.settings)
        self._redis = redis_client(self.settings.broker_url, master_name=self.settings.sentinel_master_name)
        self._s3: Any = None
        self._messages: messages.TaskMessages | None = None
        # This client's "publishing" claims carry its own token: a retry after a failed publish
        # takes its own leftover claim over at once instead of waiting for it to expire.
        self._claim_token = _PUBLISHING + b":" + uuid.uuid4().hex.encode()

    # -- building ---------------------------------------------------------------------------

    def build_job(
        self,
        image_url: str,
        question: str,
        *,
        idempotency_key: str | None = None,
        max_new_tokens: int | None = None,
        generation: GenerationSettings | Mapping[str, Any] | None = None,
        deadline: datetime | str | None = None,
        expires_in: float | timedelta | str | None = None,
        webhook_url: str | None = None,
        bulk_id: str | None = None,
        custom_id: str | None = None,
        image_grid: str | None = None,
    ) -> Job:
        """Validate one job with the shared model; raise :class:`InvalidJob` before anything is sent.

        ``deadline`` (an aware datetime) or ``expires_in`` (seconds or a timedelta from now): a
        job not started by then ends as an ``expired`` record without running; with both, the
        earlier counts. ``webhook_url`` is called once its record is stored (``vqa webhooks``).
        ``image_grid`` (``full`` or ``RxC``, e.g. ``1x1``) asks for less image detail than the
        workers' ``VQA_IMAGE_GRID``: fewer image tokens, faster; never more than the worker's.
        """
        try:
            gen = _generation(generation, max_new_tokens, self.settings.max_new_tokens)
        except ValueError as exc:  # pydantic's ValidationError is a ValueError
            raise InvalidJob(f"generation: {exc}") from exc
        now = utcnow()
        try:
            if deadline is not None:
                deadline = parse_time(deadline)
            if expires_in is not None:
                expiry = now + (expires_in if isinstance(expires_in, timedelta) else parse_duration(expires_in))
                deadline = expiry if deadline is None or expiry < deadline else deadline
        except (ValueError, TypeError, OverflowError) as exc:  # OverflowError: an expiry past year 9999
            raise InvalidJob(f"deadline: {exc}") from exc
        payload = {
            "image_url": image_url,
            "question": question,
            "model": self.settings.model,
            "generation": gen,
            "idempotency_key": idempotency_key,
            "submitted_at": now,
            "deadline": deadline,
            "webhook_url": webhook_url,
            "bulk_id": bulk_id,
            "custom_id": custom_id,
            "image_grid": image_grid,
            "job_id": "pending",
        }
        job = Job.decode(payload)  # validates URL, question, lengths
        job_id = derive_job_id(
            image_url=job.image_url,
            question=job.question,
            model=job.model,
            generation=job.generation,
            idempotency_key=idempotency_key,
            image_grid=job.image_grid,
        )
        return job.model_copy(update={"job_id": job_id})

    # -- submitting -------------------------------------------------------------------------

    def submit(self, image_url: str, question: str, *, priority: str = "default", **options: Any) -> str:
        """Enqueue one job and return its id at once. Re-submitting the same job returns the same id.

        ``priority`` is the job's lane: ``"high"``, ``"default"`` or ``"low"`` (Celery priorities
        0, 3 and 6 on the Redis transport; see the README's operations section). ``options`` are
        :meth:`build_job`'s.
        """
        return self.submit_jobs([self.build_job(image_url, question, **options)], priority=priority)[0]

    def submit_many(self, requests: Iterable[Mapping[str, Any]], *, priority: str = "default") -> list[str]:
        """Validate every request first; enqueue only if all are valid.

        Each request is a mapping with ``image_url``, ``question`` and optionally
        ``idempotency_key``, ``max_new_tokens``, ``generation``, ``deadline``, ``expires_in``,
        ``webhook_url``, ``image_grid``. On any invalid one,
        :class:`InvalidJob` lists every bad line (1-based) and nothing is enqueued.
        On a Redis broker the whole list costs a few round trips, not one per job
        (see :mod:`producer.messages`).
        """
        jobs: list[Job] = []
        problems: list[str] = []
        for line, request in enumerate(requests, start=1):
            try:
                jobs.append(self.build_request(request))
            except InvalidJob as exc:
                problems.append(f"line {line}: {exc}")
        if problems:
            raise InvalidJob("; ".join(problems))
        return self.submit_jobs(jobs, priority=priority)

    def build_request(self, request: Mapping[str, Any]) -> Job:
        """Validate one request mapping as :meth:`submit_many` takes them; raise :class:`InvalidJob`."""
        try:
            return self.build_job(**_request_kwargs(request))
        except TypeError as exc:  # e.g. "generation" that is no mapping
            raise InvalidJob(str(exc)) from exc

    def submit_jobs(self, jobs: list[Job], *, priority: str = "default") -> list[str]:
        """Enqueue already-built jobs in the ``priority`` lane, skipping those that are finished or already queued.

        A job already queued keeps the lane it was queued in.
        """
        celery_priority = _celery_priority(priority)
        if not jobs:
            return []
        self._publish_unqueued(jobs, celery_priority)
        return [job.job_id for job in jobs]

    def _publish_unqueued(self, jobs: list[Job], priority: int) -> None:
        """Publish the jobs that have no success record and are not queued yet, claimed for publishing by us.

        Only a "queued" claim (set once the publish returned) makes a resubmission a no-op. A
        "publishing" claim is another producer publishing the job right now: we publish what we
        claimed first, then wait for the others, so two producers submitting the same jobs at
        once publish them once. (Waiting first deadlocked two producers that had each claimed
        part of the same jobs until the claims expired; then both published everything.) A
        claim may also be left by a publish that failed while Redis went away: this client's
        own is taken over at once, another's expires after ``_PUBLISHING_TTL_S`` and we publish
        the job then, so a retried submission is never swallowed.
        """
        unique = list({job.job_id: job for job in jobs}.values())
        try:
            done = self._succeeded_ids([job.job_id for job in unique])
        except redis.RedisError:
            done = set()  # a shortcut only: workers answer a finished job from its S3 record
        contested = [job for job in unique if job.job_id not in done]
        deadline = time.monotonic() + _PUBLISHING_TTL_S + 1
        while contested:
            try:
                mine, contested = self._try_claims(contested)
            except redis.RedisError as exc:
                raise BackendUnavailable(f"cannot reach Redis to submit jobs: {type(exc).__name__}") from exc
            if time.monotonic() >= deadline:
                mine, contested = mine + contested, []  # still contested after a claim's lifetime: publish anyway
            if mine:
                self._forget_earlier_outcome(mine)
                self._publish(mine, priority)
                # Not "queued" until on enough replicas: a failed WAIT leaves the claims ours, so a retry republishes.
                wait_for_replicas(self._redis, self.settings.accept_replicas, self.settings.accept_replicas_timeout_ms)
                self._mark_queued(mine)
                if log.isEnabledFor(logging.INFO):  # where a job's trail in the logs starts (producer/logs.py)
                    for job in mine:
                        log.info("submitted job %s", job.job_id, extra={"job_id": job.job_id, "bulk_id": job.bulk_id})
            if contested:
                time.sleep(0.05)

    def _try_claims(self, jobs: list[Job]) -> tuple[list[Job], list[Job]]:
        """Claim each job (SET NX); return (claimed now, being published by someone else). Queued ones drop out."""
        pipe = self._redis.pipeline(transaction=False)
        for job in jobs:
            pipe.set(keys.submitted_key(job.job_id), self._claim_token, nx=True, ex=_PUBLISHING_TTL_S)
            pipe.get(keys.submitted_key(job.job_id))
        replies = pipe.execute()
        mine, contested = [], []
        for job, claimed, value in zip(jobs, replies[::2], replies[1::2], strict=True):
            if claimed or value == self._claim_token:
                mine.append(job)
            elif value is not None and value.startswith(_PUBLISHING):
                contested.append(job)
        return mine, contested

    def _forget_earlier_outcome(self, jobs: list[Job]) -> None:
        """Submitting a job again (it failed, or was cancelled) means "run it now".

        Its old cancel must not stop the new message, and its old failed state must not answer
        ``wait`` for the new run. Only jobs without a success that are claimed here get this
        far, so a job still queued (and perhaps cancelled) is never touched by a duplicate
        submission. The failed record in S3 stays until the new run's record replaces it.
        """
        backend = self.app.backend
        try:
            self._redis.delete(*(keys.revoked_key(job.job_id) for job in jobs))
            backend.client.delete(*(backend.get_key_for_task(job.job_id) for job in jobs))
        except redis.RedisError as exc:
            raise BackendUnavailable(f"cannot reach Redis to submit jobs: {type(exc).__name__}") from exc

    def _mark_queued(self, jobs: list[Job]) -> None:
        ttl = max(_SUBMITTED_TTL_FLOOR_S, 2 * self.settings.visibility_timeout)
        try:
            pipe = self._redis.pipeline(transaction=False)
            for job in jobs:
                pipe.set(keys.submitted_key(job.job_id), _QUEUED, ex=ttl)
            pipe.execute()
        except redis.RedisError:
            # Published all the same. The "publishing" claim expires, and a resubmission then
            # publishes again: a duplicate message the workers answer from the first record.
            pass

    def _succeeded_ids(self, job_ids: list[str]) -> set[str]:
        backend = self.app.backend
        raw = backend.client.mget([backend.get_key_for_task(job_id) for job_id in job_ids])
        done = set()
        for job_id, value in zip(job_ids, raw, strict=True):
            if value and json.loads(value).get("status") == "SUCCESS":
                done.add(job_id)
        return done

    def _publish(self, jobs: list[Job], priority: int) -> None:
        # Signed messages go through Celery's own publishing, which signs each one.
        if self.pushes_messages():
            self._publish_pushed(jobs, priority)
        else:
            self._publish_one_by_one(jobs, priority)

    def pushes_messages(self) -> bool:
        """True when jobs are published as ready-made messages (a Redis broker, unsigned messages)."""
        return self.settings.broker_url.startswith(messages.REDIS_SCHEMES) and not self.settings.signs_messages

    def task_messages(self) -> messages.TaskMessages:
        """The encoder of this client's task messages (its queue, reply-to and key prefix)."""
        if self._messages is None:
            prefix = (self.app.conf.broker_transport_options or {}).get("global_keyprefix", "")
            self._messages = messages.TaskMessages(queue=self.settings.queue, reply_to=self.app.thread_oid, key_prefix=prefix)
        return self._messages

    def _publish_pushed(self, jobs: list[Job], priority: int) -> None:
        """LPUSH ready-made task messages, :data:`messages.CHUNK` per command (see producer/messages.py)."""
        encoder = self.task_messages()
        published = 0
        try:
            for start in range(0, len(jobs), messages.CHUNK):
                chunk = jobs[start : start + messages.CHUNK]
                # One LPUSH of many values is one atomic command, and keeps FIFO order (BRPOP takes the first pushed first).
                self._redis.lpush(encoder.key_for(priority), *(encoder.encode(job, priority=priority) for job in chunk))
                published += len(chunk)
        except redis.RedisError as exc:
            # Not enqueued: free the claims so a retry of the submission goes through.
            self._release_claims(jobs[published:])
            raise BackendUnavailable(f"cannot publish to the broker: {type(exc).__name__}: {exc}") from exc

    def _release_claims(self, jobs: list[Job]) -> None:
        if not jobs:
            return
        try:
            self._redis.delete(*(keys.submitted_key(job.job_id) for job in jobs))
        except redis.RedisError:
            pass  # they expire with their TTL

    def _publish_one_by_one(self, jobs: list[Job], priority: int) -> None:
        """Any other broker: Celery's own publishing, one message per call."""
        try:
            with self.app.producer_or_acquire() as producer:
                for job in jobs:
                    self.app.send_task(
                        keys.TASK_NAME,
                        kwargs={"job": job.model_dump(mode="json")},
                        task_id=job.job_id,
                        queue=self.settings.queue,
                        producer=producer,
                        expires=job.deadline,
                        priority=priority,
                    )
        except OperationalError as exc:
            self._release_claims(jobs)
            raise BackendUnavailable(f"cannot publish to the broker: {exc}") from exc

    # -- cancelling -------------------------------------------------------------------------

    def cancel(self, job_ids: str | Iterable[str]) -> None:
        """Cancel jobs: each one that has not reached a model yet ends as a ``cancelled`` record (state REVOKED).

        Wherever the job is (queued, buffered in a worker, waiting for a retry), every worker
        drops it before the model; one already in the model finishes, and a finished job keeps
        its record. The cancel is kept in Redis for ``VQA_REVOKE_TTL_S``, so it holds while no
        worker runs and reaches workers started later (worker/cancels.py).
        """
        ids = [job_ids] if isinstance(job_ids, str) else list(job_ids)
        try:
            write_revokes(self._redis, ids, ttl_s=self.settings.revoke_ttl_s, by="VQAClient.cancel")
        except redis.RedisError as exc:
            raise BackendUnavailable(f"cannot reach Redis to cancel jobs: {type(exc).__name__}") from exc

    # -- bulk runs --------------------------------------------------------------------------

    def bulk(self, source: str | None = None, *, name: str | None = None, **options: Any) -> BulkRun:
        """Start (or resume) a bulk run over a manifest and return its handle; publishing goes on in the background.

        ``source`` is a JSON Lines, CSV or Parquet file or ``s3://bucket/prefix/``; ``options`` are
        those of :class:`producer.bulk.BulkOptions` (``questions``, ``window``, ``expires_in``, ...).
        Without ``source``, the handle of the existing run ``name``. See producer/bulk/.
        """
        from producer.bulk.run import attach, start

        if source is None:
            if name is None:
                raise InvalidJob("bulk(): give a manifest, or the name of an existing run")
            return attach(self, name)
        return start(self, str(source), name=name, **options)

    def s3_client(self) -> Any:
        """The client's S3 client (made on first use; credentials from the standard AWS sources)."""
        return self._s3_client()

    # -- reading ----------------------------------------------------------------------------

    def status(self, job_id: str) -> str:
        """Celery state: PENDING (unknown or queued), STARTED, SUCCESS, FAILURE, or REVOKED (cancelled or expired)."""
        try:
            return str(self.app.AsyncResult(job_id).state)
        except redis.RedisError as exc:
            raise BackendUnavailable(f"cannot reach the result backend: {type(exc).__name__}") from exc

    def result(self, job_id: str) -> Record | None:
        """The job's record: from S3 (authoritative), else from the result backend; None if not finished."""
        record = self._record_from_s3(job_id)
        return record if record is not None else self._record_from_backend(job_id)

    def wait(self, job_id: str, *, timeout: float | None = None, poll_s: float = 0.2) -> Record:
        """Block until the job has a record. A failed job returns its failed record (status ``failed``)."""
        # Poll the backend key rather than AsyncResult.get(): get() subscribes to Redis pub/sub
        # and leaves a subscription behind that unsubscribes in __del__, long after close().
        deadline = None if timeout is None else time.monotonic() + timeout
        look_in_s3_at = time.monotonic() + _WAIT_S3_EVERY_S
        while True:
            record = self._record_from_backend(job_id)
            if record is not None:
                return record
            now = time.monotonic()
            timed_out = deadline is not None and now > deadline
            if timed_out or now >= look_in_s3_at:
                # The backend may have missed it: S3 is authoritative. A Redis failover loses the
                # writes its replica had not received, so a finished job's state can be gone for good
                # there while its record stands in S3; without this look a wait would never end.
                record = self._record_from_s3(job_id)
                if record is not None:
                    return record
                if timed_out:
                    raise TimeoutError(f"job {job_id} did not finish within {timeout} s")
                look_in_s3_at = now + _WAIT_S3_EVERY_S
            time.sleep(poll_s)

    def _record_from_backend(self, job_id: str) -> Record | None:
        try:
            meta = self.app.backend.get_task_meta(job_id)
        except redis.RedisError as exc:
            raise BackendUnavailable(f"cannot reach the result backend: {type(exc).__name__}") from exc
        value = meta.get("result")
        if meta.get("status") == "SUCCESS" and isinstance(value, dict):
            return Record.model_validate(value)
        if meta.get("status") in ("FAILURE", "REVOKED") and isinstance(value, JobFailed):
            return Record.model_validate(value.record)
        return None

    def _record_from_s3(self, job_id: str) -> Record | None:
        """The success record, else the failed one. An unreadable success object is skipped for the failed
        record the worker writes about it; CorruptRecord only when no readable record stands beside it."""
        s3 = self._s3_client()
        corrupt: CorruptRecord | None = None
        for key in (keys.result_key(self.settings.s3_prefix, job_id), keys.failed_key(self.settings.s3_prefix, job_id)):
            try:
                body = s3.get_object(Bucket=self.settings.s3_bucket, Key=key)["Body"].read()
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in {"NoSuchKey", "404"}:
                    continue
                raise StorageUnavailable(f"S3 read of {key} failed: {exc.response['Error'].get('Code')}") from exc
            except BotoCoreError as exc:
                raise StorageUnavailable(f"S3 read of {key} failed: {type(exc).__name__}") from exc
            try:
                return parse_record(body, key=key)
            except CorruptRecord as exc:
                corrupt = corrupt or exc
        if corrupt is not None:
            raise corrupt
        return None

    def _s3_client(self) -> Any:
        if self._s3 is None:
            self._s3 = boto3.client("s3", endpoint_url=self.settings.s3_endpoint_url)
        return self._s3

    def close(self) -> None:
        self._redis.close()
        self.app.close()

    def __enter__(self) -> VQAClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _generation(
    generation: GenerationSettings | Mapping[str, Any] | None, max_new_tokens: int | None, default_max_new_tokens: int
) -> GenerationSettings:
    if isinstance(generation, GenerationSettings):
        values = generation.model_dump()
    else:
        values = dict(generation or {})
        values.setdefault("max_new_tokens", default_max_new_tokens)
    if max_new_tokens is not None:
        values["max_new_tokens"] = max_new_tokens
    return GenerationSettings.model_validate(values)


def _celery_priority(priority: str) -> int:
    """The Celery priority of a lane name (producer/keys.py PRIORITIES); InvalidJob for anything else."""
    try:
        return keys.PRIORITIES[priority]
    except (KeyError, TypeError):
        raise InvalidJob(f"priority must be one of {', '.join(keys.PRIORITIES)}, not {str(priority)[:40]!r}") from None


def _request_kwargs(request: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(request, Mapping):
        raise InvalidJob("each request must be an object with image_url and question")
    allowed = {"image_url", "question", "idempotency_key", "max_new_tokens", "generation", "deadline", "expires_in", "webhook_url", "image_grid"}
    unknown = set(request) - allowed
    if unknown:
        raise InvalidJob(f"unknown fields: {', '.join(sorted(unknown))}")
    missing = {"image_url", "question"} - set(request)
    if missing:
        raise InvalidJob(f"missing fields: {', '.join(sorted(missing))}")
    return dict(request)
