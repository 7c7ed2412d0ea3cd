"""One error tree for the whole system.

    VQAError                      root: catch this to catch everything of ours
    ├── TransientError            retryable: try the same job again later
    │   ├── FetchTimeout          image host too slow              (timeout)
    │   ├── UpstreamUnavailable   image host 5xx / connection reset (http_status, connection_failed)
    │   ├── StorageUnavailable    S3 5xx, timeouts, refused         (storage_unavailable)
    │   ├── BackendUnavailable    Redis / result backend down       (backend_unavailable)
    │   ├── RunBusy               another process is publishing the bulk run (run_busy)
    │   └── OutOfMemory           CUDA/CPU OOM during generate      (out_of_memory)
    ├── PermanentError            not retryable: a failed record at once
    │   ├── InvalidJob            fails validation                  (invalid_job)
    │   ├── ImageRejected         the image or its URL is refused   (blocked_address, too_large,
    │   │                         not_an_image, unsupported_format, image_too_many_pixels,
    │   │                         corrupt_image, http_status, bad_scheme, bad_url,
    │   │                         unknown_host, tls_error, too_many_redirects)
    │   ├── ModelLoadError        the checkpoint cannot be loaded   (model_load)
    │   ├── PoisonJob             delivered too often without finishing (poison)
    │   ├── JobCancelled          cancelled before it reached the model (cancelled)
    │   ├── JobExpired            its deadline passed before it reached the model (expired)
    │   ├── MessageRejected       a queue entry that is no valid job message (message_rejected);
    │   │                         it goes to the dead-letter list, never to the model
    │   ├── CorruptRecord         a stored record that does not parse as a Record (corrupt_record)
    │   └── WebhookRefused        a webhook URL the SSRF guard refuses (blocked_address, bad_url, ...)
    └── JobFailed                 raised to producers when a job ended in a failed record

The retry decision is one ``isinstance(exc, TransientError)``. Third-party errors
(botocore, redis, the HTTP client, Pillow, torch) are translated where they enter,
with ``raise Ours(...) from exc``.
"""

from __future__ import annotations

from typing import Any


class VQAError(Exception):
    """Root of every error this project raises."""

    code: str = "error"
    retryable: bool = False

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __reduce__(self) -> tuple[Any, ...]:
        # Keep ``code`` when the error crosses a process boundary.
        return (_rebuild, (type(self), self.message, self.code))


def _rebuild(cls: type[VQAError], message: str, code: str) -> VQAError:
    return cls(message, code=code)


class TransientError(VQAError):
    """Worth retrying: the same job may succeed later."""

    retryable = True
    code = "transient"


class FetchTimeout(TransientError):
    code = "timeout"


class UpstreamUnavailable(TransientError):
    code = "connection_failed"


class StorageUnavailable(TransientError):
    code = "storage_unavailable"


class BackendUnavailable(TransientError):
    code = "backend_unavailable"


class RunBusy(TransientError):
    """Another live process holds the bulk run's submitter lease (producer/bulk/submit.py)."""

    code = "run_busy"


class OutOfMemory(TransientError):
    code = "out_of_memory"


class PermanentError(VQAError):
    """Retrying cannot help: the job ends in a failed record at once."""

    code = "permanent"


class InvalidJob(PermanentError):
    code = "invalid_job"


class ImageRejected(PermanentError):
    code = "image_rejected"


class ModelLoadError(PermanentError):
    code = "model_load"


class PoisonJob(PermanentError):
    code = "poison"


class JobCancelled(PermanentError):
    """Cancelled (``vqa cancel``, ``VQAClient.cancel``, a Celery revoke) before it reached the model."""

    code = "cancelled"


class JobExpired(PermanentError):
    """Its deadline (or its message's Celery ``expires``) passed before it reached the model."""

    code = "expired"


# Jobs stopped before they ran: the result backend marks them REVOKED, as Celery does.
STOPPED_CODES = frozenset({JobCancelled.code, JobExpired.code})


class MessageRejected(PermanentError):
    """A queue entry refused at intake (worker/intake.py): malformed, oversized, unsigned, not our task, invalid job."""

    code = "message_rejected"


class CorruptRecord(PermanentError):
    """An object at a record's S3 key does not parse as today's :class:`producer.schema.Record`.

    Corrupt, or written by an older or newer schema. It is kept as it is; the job ends in a
    failed record that names the key.
    """

    code = "corrupt_record"


class WebhookRefused(PermanentError):
    """A webhook URL that may not be called (producer/webhooks/post.py): retrying cannot help."""

    code = "webhook_refused"


class JobFailed(VQAError):
    """The job finished with a failed record; ``record`` holds it as a dict.

    This is what the Celery result backend stores for a failed job (state FAILURE), so
    ``AsyncResult(job_id).get()`` raises it. Its args stay JSON-serialisable for that reason.
    """

    code = "job_failed"

    def __init__(self, message: str, record: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.record = record or {}
        self.args = (message, self.record)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.message, self.record))
