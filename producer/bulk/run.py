"""The handle of a bulk run, what ``VQAClient.bulk`` returns: status, results, cancel, wait.

>>> run = client.bulk("manifest.jsonl", questions=["What is shown?"])   # publishing starts in the background
>>> run.status().counts                                                  # moves while the run runs
>>> run.results("results.jsonl")                                         # the finished part, at any time
>>> run.wait(); run.results("results.parquet")                           # every job, once it ended
>>> client.bulk(name="bulk-3f2a...").cancel()                            # any process can cancel
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from producer.bulk.completions import Completions, mirror_status
from producer.bulk.ids import check_bulk_id
from producer.bulk.manifest import open_manifest
from producer.bulk.results import result_line, write_results
from producer.bulk.state import RunState
from producer.bulk.status import BulkStatus
from producer.bulk.store import BulkStore
from producer.bulk.submit import BulkOptions, Progress, Submitter
from producer.connections import redis_client
from producer.errors import InvalidJob, VQAError

if TYPE_CHECKING:
    from producer.client import VQAClient

_CANCEL_BATCH = 1000


class BulkRun:
    """One bulk run. A handle from :func:`start` also publishes the manifest, on a thread of its own."""

    def __init__(self, client: VQAClient, bulk_id: str, *, submitter: Submitter | None = None) -> None:
        settings = client.settings
        self.client = client
        self.bulk_id = bulk_id
        self.submitter = submitter
        if submitter is not None:
            self.state, self.store = submitter.state, submitter.store
        else:
            self.state = RunState(redis_client(settings.broker_url, master_name=settings.sentinel_master_name), bulk_id, settings=settings)
            self.store = BulkStore(client.s3_client(), bucket=settings.s3_bucket, prefix=settings.s3_prefix, bulk_id=bulk_id)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- publishing -------------------------------------------------------------------------

    def start_publishing(self) -> None:
        submitter = self.submitter
        if submitter is None or self._thread is not None:
            return

        def publish() -> None:
            try:
                submitter.publish(self._stop)
            except BaseException:  # noqa: BLE001 - kept on the progress; join() and wait() raise it
                pass

        self._thread = threading.Thread(target=publish, name=f"vqa-bulk-{self.bulk_id}", daemon=True)
        self._thread.start()

    @property
    def progress(self) -> Progress | None:
        """What this handle's submitter published so far (None for a handle that does not publish)."""
        return None if self.submitter is None else self.submitter.progress

    @property
    def publishing(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def join(self, timeout: float | None = None) -> Progress | None:
        """Wait until publishing ended (all published, cancelled or stopped); raise what stopped it, if anything did."""
        if self._thread is not None:
            self._thread.join(timeout)
        progress = self.progress
        if progress is not None and progress.error is not None:
            raise progress.error
        return progress

    def stop(self) -> None:
        """Stop publishing, not the run: what is published finishes, and submitting the same run again resumes it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    # -- the run ----------------------------------------------------------------------------

    def status(self) -> BulkStatus:
        """The run's counts now: from Redis while it runs, from its status.json in S3 once Redis let it go."""
        status = self.state.snapshot()
        if status is None:
            status = self.store.get_status()
        if status is None:
            raise InvalidJob(f"no bulk run {self.bulk_id}")
        return status

    def wait(self, *, timeout: float | None = None, poll_s: float = 1.0, on_status: Callable[[BulkStatus], None] | None = None) -> BulkStatus:
        """Block until the run ended (completed or cancelled); ``on_status`` sees every poll."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = self.status()
            if on_status is not None:
                on_status(status)
            progress = self.progress
            if progress is not None and progress.error is not None:
                raise progress.error
            if status.ended:
                return status
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"bulk run {self.bulk_id} did not end within {timeout} s")
            time.sleep(poll_s)

    def entries(self) -> Iterator[dict[str, Any]]:
        """The results of the jobs finished so far, one dict per job (the results file's lines)."""
        for entry in Completions(self.state, self.store).entries():
            yield result_line(entry)

    def results(self, path: str | Path | None = None) -> Any:
        """Write the results file (JSON Lines, or Parquet for .parquet) and return its line count; without a path, the lines as a list."""
        if path is None:
            return list(self.entries())
        return write_results(self.entries(), Path(path))

    def cancel(self) -> BulkStatus:
        """Cancel the run: nothing more is published; queued jobs end as cancelled records, running ones finish.

        Uses the one cancel of the system (``VQAClient.cancel``: revoke markers every worker checks
        before a job reaches its model, buffered jobs included) for every job in flight.
        """
        before, ended, segment = self.state.cancel()
        if before == "missing":
            return self.status()  # ended and let go by Redis, or no such run (raises)
        batch: list[str] = []
        for job_id in self.state.in_flight():
            batch.append(job_id)
            if len(batch) >= _CANCEL_BATCH:
                self.client.cancel(batch)
                batch = []
        if batch:
            self.client.cancel(batch)
        try:
            if segment:
                Completions(self.state, self.store).drain(segment)
            mirror_status(self.state, self.store, invalid=True)
        except VQAError:
            pass  # the status is in Redis; the next mirror writes it
        return self.status()

    def close(self) -> None:
        self.stop()
        self.state.client.close()

    def __enter__(self) -> BulkRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start(
    client: VQAClient,
    source: str,
    *,
    name: str | None = None,
    questions: Sequence[str] | str = (),
    max_new_tokens: int | None = None,
    expires_in: str | float | None = None,
    webhook_url: str | None = None,
    window: int | None = None,
    strict: bool = False,
    priority: str = "low",
    background: bool = True,
    on_invalid: Callable[[int, str], None] | None = None,
) -> BulkRun:
    """Create or resume the run of ``source`` and return its handle, publishing in the background unless ``background=False``.

    Raises InvalidJob before anything is published for a bad source or options, InvalidManifest
    (``strict``) listing the invalid lines, RunBusy when another live process publishes the run.
    """
    if name is not None:
        check_bulk_id(name)
    manifest = open_manifest(source, s3_client=client.s3_client() if source.startswith("s3://") else None)
    options = BulkOptions(
        questions=(questions,) if isinstance(questions, str) else tuple(questions),
        max_new_tokens=max_new_tokens,
        expires_in=expires_in,
        webhook_url=webhook_url,
        window=window,
        strict=strict,
        priority=priority,
    )
    submitter = Submitter(client, manifest, name=name, options=options, on_invalid=on_invalid)
    submitter.prepare()
    run = BulkRun(client, submitter.bulk_id, submitter=submitter)
    if background:
        run.start_publishing()
    return run


def attach(client: VQAClient, bulk_id: str) -> BulkRun:
    """The handle of an existing run (any process): status, results, cancel, wait."""
    return BulkRun(client, check_bulk_id(bulk_id))
