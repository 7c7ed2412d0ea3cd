"""The fetch stage: one received job in, one :class:`worker.jobs.Prepared` out, on the fetch pool.

For each job, off the consumer and model threads:

1. Cancelled, or past its deadline (worker/cancels.py)? Then it ends so, without fetching.
2. How often did it reach a model before, and how often did it come back (worker/counters.py)?
   If it ran before, is there a success record already (a redelivery, a duplicate)? Then
   nothing runs. A job that never ran cannot have one, so the common first delivery makes no
   S3 request here: its one request is the conditional create of its record. Steps 1 and 2
   read Redis in one round trip.
3. Fetch and decode the image under the SSRF guard and the caps (worker/fetch/).
4. Preprocess it for the engine (tiles, prompt tokens), so the model thread only pads and runs.
   With ``pool`` (``VQA_PREPROCESS_PROCESSES``, worker/preprocess_pool.py) the decode and the
   image's part run in a process of their own; the download and the question's part stay here.

With ``images`` (worker/imageshare.py, on with ``VQA_SHARE_IMAGE_PREFIX``) steps 3 and 4's
image part run once for the jobs in the worker that ask about one URL: one job loads the image,
the others wait for it (or find it), then each adds its own question.

Any failure is kept on the result (``Prepared.error``) for the runner to retry or record; the
preparer itself never raises.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import redis

from producer import keys
from producer.errors import CorruptRecord, PermanentError, StorageUnavailable, VQAError
from producer.image_grid import FULL, effective_grid
from producer.schema import Job
from worker.cancels import CancelCheck
from worker.counters import JobCounters, JobHistory
from worker.cputime import CpuAccount
from worker.engine import Engine, ImageFirstEngine
from worker.fetch.images import FetchPolicy, decode_image, fetch_bytes
from worker.imageshare import SharedImages
from worker.jobs import Prepared
from worker.storage import RecordStore

if TYPE_CHECKING:
    from worker.preprocess_pool import PreprocessPool  # imports torch: the worker's start builds it

log = logging.getLogger(__name__)


class JobPreparer:
    """Callable run on the fetch pool: ``preparer(job) -> Prepared``."""

    def __init__(
        self, *, engine: Engine, store: RecordStore, counters: JobCounters, cancels: CancelCheck, policy: FetchPolicy, s3_client: Any,
        images: SharedImages | None = None, cpu: CpuAccount | None = None, image_grid: str = FULL, pool: PreprocessPool | None = None,
    ) -> None:
        self.engine = engine
        # VQA_PREPROCESS_PROCESSES: each image decoded and prepared in a process (an ImageFirstEngine's image part).
        if pool is not None and not isinstance(engine, ImageFirstEngine):
            raise ValueError("a preprocessing pool needs an engine that prepares an image apart from its question")
        self.pool = pool
        self.image_grid = image_grid  # the worker's VQA_IMAGE_GRID: a job's grid is taken within it
        self.cancels = cancels
        self.store = store
        self.counters = counters
        self.policy = policy
        self.s3_client = s3_client
        self.images = images
        self.cpu = cpu or CpuAccount()

    def __call__(self, job: Job) -> Prepared:
        try:
            return self._prepare(job)
        except VQAError as exc:
            return Prepared(error=exc)
        except Exception as exc:  # noqa: BLE001 - one bad image must not escape into the loop
            log.exception("unexpected error preparing job %s", job.job_id, extra={"job_id": job.job_id})
            return Prepared(error=PermanentError(f"could not prepare the job: {type(exc).__name__}", code="internal_error"))

    def _prepare(self, job: Job) -> Prepared:
        stopped, history = self._look_up(job)
        if stopped is not None:
            return Prepared(error=stopped)
        if history.executions == 0:
            # Never counted as run: no success record can exist (unless Redis lost the count, when
            # the conditional create still keeps the first record and the answer comes from it).
            return self._fetch_and_prepare(job, earlier=history.earlier_deliveries)
        try:
            existing = self.store.existing(job.job_id)
        except StorageUnavailable as exc:
            # The lookup is a shortcut: an S3 outage must not use up the job's attempts. The
            # conditional create still keeps the first record; storing waits for S3 to return.
            log.warning("job %s: cannot check for an existing record (%s); running it", job.job_id, exc, extra={"job_id": job.job_id})
            existing = None
        except CorruptRecord as exc:
            # Running it again could not store an answer there: fail it, saying why (the object is kept).
            log.error("job %s: %s", job.job_id, exc, extra={"job_id": job.job_id})
            return Prepared(error=exc)
        if existing is not None:
            return Prepared(existing=existing)
        return self._fetch_and_prepare(job, earlier=history.earlier_deliveries)

    def _look_up(self, job: Job) -> tuple[VQAError | None, JobHistory]:
        """Steps 1 and 2's reads in one Redis round trip (a round trip costs ~0.15 ms of CPU, issue 14): its revoke marker and counts."""
        read_at = self.cancels.revoked.now()
        try:
            revoked, *counts = self.counters.client.mget([keys.revoked_key(job.job_id), *JobCounters.history_keys(job.job_id)])
        except redis.RedisError as exc:
            # What each read does when Redis is away: this worker's revokes and the deadline, and
            # the counts of a first delivery (worker/cancels.py, worker/counters.py).
            log.warning("job %s: cannot read its cancel and counts (%s); checked against this worker's revokes only",
                        job.job_id, type(exc).__name__, extra={"job_id": job.job_id})
            return self.cancels.local_reasons([job]).get(job.job_id), JobHistory(earlier_deliveries=0, executions=0)
        markers = {job.job_id: revoked} if revoked is not None else {}
        stopped = self.cancels.reasons([job], markers=markers, read_at=read_at).get(job.job_id)
        return stopped, JobCounters.history_from(counts)

    def _fetch_and_prepare(self, job: Job, *, earlier: int) -> Prepared:
        if self.images is not None:
            return self._prepare_shared(job, earlier=earlier)
        timings: dict[str, float] = {}
        part = self._load(job, timings)
        got = time.perf_counter()
        inputs = self._add_question(part, job)
        return Prepared(
            inputs=inputs,
            cost=self.engine.cost(inputs),
            fetch_ms=timings["fetch"] * 1000,
            preprocess_ms=(timings.get("image", 0.0) + time.perf_counter() - got) * 1000,
            earlier_deliveries=earlier,
            image_key=getattr(inputs, "image_key", None),
        )

    def _load(self, job: Job, timings: dict[str, float]) -> Any:
        """What the job's question is added to: the engine's image part, or the decoded image for an engine that does not split.

        The download's seconds go to ``timings["fetch"]`` (with the decode, on the fetch thread),
        the image part's to ``timings["image"]``. The decode's and the image part's CPU are
        accounted; the download's is the pipeline's. With VQA_PREPROCESS_PROCESSES the decode and
        the image part run in a process, whose CPU is added to the same totals.
        """
        start = time.perf_counter()
        data = fetch_bytes(job.image_url, self.policy, s3_client=self.s3_client)
        if self.pool is not None:
            fetched = time.perf_counter()
            part, decode_s, preprocess_s = self.pool.prepare_image(data, image_grid=job.image_grid)
            self.cpu.add("decode", decode_s)
            self.cpu.add("preprocess", preprocess_s)
            timings["fetch"], timings["image"] = fetched - start, time.perf_counter() - fetched
            return part
        with self.cpu.measure("decode"):
            image = decode_image(data, self.policy, image_grid=job.image_grid)
        fetched = time.perf_counter()
        timings["fetch"] = fetched - start
        if not isinstance(self.engine, ImageFirstEngine):
            return image
        with self.cpu.measure("preprocess"):
            part = self.engine.prepare_image(image, image_grid=job.image_grid, source=data)
        timings["image"] = time.perf_counter() - fetched
        return part

    def _add_question(self, part: Any, job: Job) -> Any:
        """The job's inputs from what :meth:`_load` gave."""
        with self.cpu.measure("preprocess"):
            if isinstance(self.engine, ImageFirstEngine):
                return self.engine.prepare_question(part, job.question)
            return self.engine.prepare(part, job.question, image_grid=job.image_grid)

    def _prepare_shared(self, job: Job, *, earlier: int) -> Prepared:
        assert self.images is not None
        split = isinstance(self.engine, ImageFirstEngine)
        timings: dict[str, float] = {}
        start = time.perf_counter()
        # Preprocessed tiles, and a prescaled decode (VQA_IMAGE_PRESCALE), depend on the grid the
        # job runs with: only jobs of one effective grid share them (None, "full" and "2x1" on a
        # 2x1 worker are one image).
        grid = effective_grid(job.image_grid, self.image_grid)
        key = (job.image_url, grid) if split or self.policy.prescale is not None else job.image_url
        shared, loaded = self.images.get(key, lambda: self._load(job, timings))
        # A job that shared the image reports its wait as its fetch, and no image preprocessing.
        got = time.perf_counter()
        fetch_s = timings["fetch"] if loaded else got - start
        image_s = timings.get("image", 0.0) if loaded else 0.0
        inputs = self._add_question(shared.value, job)
        return Prepared(
            inputs=inputs,
            cost=self.engine.cost(inputs),
            fetch_ms=fetch_s * 1000,
            preprocess_ms=(image_s + time.perf_counter() - got) * 1000,
            earlier_deliveries=earlier,
            image_key=getattr(inputs, "image_key", None),
            shared_image=shared,
        )
