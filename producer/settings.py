"""The one settings object. Built once at process start and passed in; nothing reads the environment elsewhere."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from kombu.utils.url import maybe_sanitize_url
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from producer.image_grid import FULL, parse_grid
from producer.schema import MAX_NEW_TOKENS_LIMIT

DEFAULT_MODEL = "llava-hf/llava-v1.6-vicuna-7b-hf"
_DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")
_URL_FIELDS = frozenset({"broker_url", "result_backend"})


class Settings(BaseSettings):
    """Every knob of producers and workers. Environment prefix ``VQA_``; AWS credentials come from the standard AWS sources."""

    model_config = SettingsConfigDict(env_prefix="VQA_", extra="ignore", frozen=True)

    # Transport
    broker_url: str = "redis://localhost:6379/0"
    result_backend: str = "redis://localhost:6379/0"
    queue: str = "vqa"
    # The Sentinel master's name for kombu's ``sentinel://`` URL form (its ``master_name`` transport
    # option); a ``redis+sentinel://hosts/MASTER`` URL names its master itself. See producer/redis_urls.py.
    sentinel_master_name: str | None = Field(default=None, min_length=1)
    # Redis replicates asynchronously: with N > 0 a submission returns only once N replicas have
    # its messages (a WAIT after the publish, producer/replication.py), else it raises BackendUnavailable.
    accept_replicas: int = Field(default=0, ge=0)
    accept_replicas_timeout_ms: int = Field(default=1000, ge=1)
    # Seconds a delivered but unacknowledged message may stay out before Redis hands it to
    # another worker. Must exceed max_batch_delay + the longest batch + the prefetch backlog;
    # see docs/reliability.md.
    visibility_timeout: int = Field(default=1800, ge=5)
    # Recovery by liveness (worker/broker.py, worker/heartbeat.py): every worker beats this often
    # from its own thread; once a worker's last beat is older than the timeout, live workers put
    # its messages back on the queue. The visibility timeout above now only governs messages
    # left in the shared unacked set by workers of before (a rolling upgrade).
    heartbeat_interval_s: float = Field(default=2.0, gt=0)
    heartbeat_timeout_s: float = Field(default=15.0, ge=1)

    # Storage
    s3_endpoint_url: str | None = None
    s3_bucket: str = "vqa-results"
    s3_prefix: str = ""

    # Model
    model: str = DEFAULT_MODEL
    quantization: Literal["nf4", "int8", "none"] = "nf4"
    device: str = "auto"
    attn_implementation: Literal["sdpa", "flash_attention_2", "eager"] = "sdpa"

    # Batching
    max_batch_size: int = Field(default=8, ge=1, le=256)
    max_batch_delay_ms: int = Field(default=100, ge=0)
    # Padding-aware batching: at most this many prompt tokens per batch counted with padding
    # (batch size x longest prompt); jobs of similar image-token counts are batched together.
    # 0 = off (first come, first served). See worker/batching.py.
    max_batch_tokens: int = Field(default=0, ge=0)
    # Jobs of one batch about the same image prefill that image once and continue each question
    # from a copy of its KV cache (worker/prefix.py). Greedy answers equal the solo ones on the
    # tests (tests/worker/test_prefix_sharing.py); docs/benchmarks/README.md has the measured rate
    # on a larger set (nf4 there: 1 answer in 88 differed, a bf16 near-tie).
    share_image_prefix: bool = True
    # Image detail (producer/image_grid.py): `full` = the checkpoint's anyres pinpoints, or RxC
    # (e.g. 2x1, 1x1) = only grids of at most R tiles high and C wide, applied to the processor
    # and the model config together. Fewer image tokens per image; OCR and fine detail suffer first.
    image_grid: str = FULL
    # Decode a photo no larger than the model will use (worker/prescale.py): JPEGs at 1/2, 1/4 or
    # 1/8 scale, then one resize to the processor's target on the job's own grid (its image_grid
    # within this worker's), so it never resizes a 12-megapixel array. Pixels change slightly and
    # so, measured, do some greedy answers: off by default (docs/benchmarks/prescale/). Token
    # counts and tile grids are the full path's.
    image_prescale: bool = False
    # The default answer-length cap for jobs; a job may not ask for more than the schema allows.
    max_new_tokens: int = Field(default=100, ge=1, le=MAX_NEW_TOKENS_LIMIT)

    # Retries
    max_attempts: int = Field(default=3, ge=1)
    max_deliveries: int = Field(default=3, ge=1)
    # How long a cancel is remembered (worker/cancels.py): longer than a job may wait in the queue.
    revoke_ttl_s: int = Field(default=7 * 24 * 3600, ge=60)

    # Input safety: explicit exceptions to the private-network block (host, host:port or CIDR).
    allowed_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    fetch_timeout_s: float = Field(default=10.0, gt=0)
    max_image_bytes: int = Field(default=20 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(default=40_000_000, ge=1)
    fetch_connect_timeout_s: float = Field(default=5.0, gt=0)
    fetch_max_redirects: int = Field(default=5, ge=0, le=20)
    fetch_ca_bundle: str | None = None  # CA bundle for https; unset = system trust store
    # An image host's connection is kept this long unused for the next fetch from it (HTTP
    # keep-alive, worker/fetch/kept.py); 0 = a new connection (and TLS handshake) per image.
    fetch_keepalive_s: float = Field(default=15.0, ge=0)
    image_formats: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["JPEG", "PNG", "GIF", "WEBP", "BMP"])
    image_s3_buckets: Annotated[list[str], NoDecode] = Field(default_factory=list)  # s3:// buckets workers may read

    # Message signing (Celery's "auth" serializer, RSA certificates); see docs/security.md.
    # Producers sign with key + certificate; workers then accept only messages signed by a
    # certificate in cert_store (a directory or glob of PEM files). Unset: plain JSON.
    security_key: str | None = None  # PEM private key file
    security_key_password: SecretStr | None = None
    security_certificate: str | None = None  # PEM certificate file for the key
    security_cert_store: str | None = None
    security_digest: Literal["sha256", "sha384", "sha512"] = "sha256"

    # Worker process
    worker_name: str | None = None  # defaults to host:pid
    fetch_concurrency: int = Field(default=8, ge=1, le=128)
    # Decode and image preprocessing in this many processes instead of on the fetch threads, where
    # they share the GIL with the model thread (worker/preprocess_pool.py); 0 = on the fetch threads.
    preprocess_processes: int = Field(default=0, ge=0, le=64)
    shutdown_grace_s: float = Field(default=60.0, ge=0)
    metrics_port: int | None = None  # Prometheus endpoint; off when unset
    # Celery task and worker events (what `celery worker -E` sends), so Flower and `celery
    # events` show our tasks and workers; off by default, like Celery's. See worker/events.py.
    send_events: bool = False

    # Running a fleet (issue 13): logs, the supervisor of `vqa worker --gpus/--processes`.
    # text: the format of old; json: one JSON object per line with job_id, batch_id, worker
    # (producer/logs.py).
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # A crashed child is restarted after this delay, doubled after each crash in a row up to
    # the cap; a child that ran for the cap's length counts as healthy again (worker/supervisor.py).
    restart_backoff_s: float = Field(default=1.0, gt=0)
    restart_backoff_max_s: float = Field(default=60.0, gt=0)

    # Celery's own tools (worker/control.py): answer `celery inspect` / `celery control`
    # broadcasts (ping, stats, active, revoke, shutdown, ...) over kombu's pidbox mailbox, as
    # `celery worker` does unless started with --without-remote-control.
    remote_control: bool = True
    # Bulk runs (producer/bulk/, worker/bulkruns.py). The default `vqa bulk submit --window`: at
    # most this many jobs of a run published and not finished (0 = no limit).
    bulk_window: int = Field(default=5000, ge=0)
    # Completion-log entries per S3 segment: collecting a run costs one GET per this many jobs.
    bulk_segment_jobs: int = Field(default=1000, ge=1, le=100_000)
    # A run's Redis keys live this long after its last move, and this long once it ended (its
    # status.json, invalid.jsonl and log segments in S3 are the lasting copy).
    bulk_ttl_s: int = Field(default=7 * 24 * 3600, ge=60)
    bulk_finished_ttl_s: int = Field(default=24 * 3600, ge=60)
    # How often a running submitter mirrors the run's status to S3 and refreshes its invalid.jsonl.
    bulk_status_interval_s: float = Field(default=10.0, gt=0)

    # The HTTP job API (`vqa api`, producer/api/). Bearer tokens (comma-separated); with none set
    # every endpoint but /healthz answers 401. Compared in constant time, never logged.
    api_tokens: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    # A request body over this is refused with 413 while it is read (a bulk manifest in the body included).
    api_max_body_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    # An Idempotency-Key is remembered (with a fingerprint of its request) this long.
    api_idempotency_ttl_s: int = Field(default=24 * 3600, ge=60)
    # Bucket notifications into jobs (POST /v1/events/s3): a JSON (or YAML) file of rules
    # {bucket, prefix, suffix, questions, ...}; see producer/ingest/rules.py. Unset: nothing matches.
    ingest_rules: str | None = None

    # Completion events (worker/completions.py): after a job's record is stored, the worker
    # appends an event to this Redis Stream, trimmed approximately to events_maxlen entries.
    events_enabled: bool = True
    events_stream: str = Field(default="vqa:events", min_length=1)
    events_maxlen: int = Field(default=1_000_000, ge=100)
    # How long a job's "event sent" marker lives: a redelivery within it emits no second event.
    events_dedupe_ttl_s: int = Field(default=7 * 24 * 3600, ge=60)

    # Webhooks (`vqa webhooks`, producer/webhooks/): Standard Webhooks secrets (whsec_..., comma-
    # separated; each signs every delivery, so receivers can rotate), the retry schedule in
    # seconds after the first try (the specification's: 5s, 5m, 30m, 2h, 5h, 10h, 10h), deadlines.
    webhook_secrets: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    webhook_retry_schedule: Annotated[list[float], NoDecode] = Field(
        default_factory=lambda: [5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0]
    )
    webhook_timeout_s: float = Field(default=10.0, gt=0)
    webhook_connect_timeout_s: float = Field(default=5.0, gt=0)
    webhook_max_response_bytes: int = Field(default=64 * 1024, ge=0)
    webhook_concurrency: int = Field(default=32, ge=1, le=1024)  # deliveries in flight per dispatcher
    webhook_per_host: int = Field(default=4, ge=1)  # of those, at most this many to one host
    webhook_group: str = Field(default="vqa-webhooks", min_length=1)  # the dispatchers' consumer group
    webhook_dead_stream: str = Field(default="vqa:webhooks:dead", min_length=1)

    # Test-only fault hooks, off by default (tests/reliability uses them; see docs/reliability.md).
    # A batch larger than this raises out-of-memory.
    fault_oom_above_batch: int = Field(default=0, ge=0)
    # A batch holding a job whose question contains this marker kills the worker (os._exit(137)).
    fault_crash_on_question: str | None = Field(default=None, min_length=1)
    # A batch holding a job whose question contains this marker keeps the model thread busy
    # (spinning in Python, holding the GIL as a real generate loop does between kernels) this long.
    fault_slow_on_question: str | None = Field(default=None, min_length=1)
    fault_slow_s: float = Field(default=3.0, ge=0, le=600)

    @property
    def signs_messages(self) -> bool:
        """Producers sign their task messages (Celery's ``auth`` serializer)."""
        return self.security_key is not None

    @property
    def requires_signed_messages(self) -> bool:
        """Workers accept only messages signed by a certificate in ``security_cert_store``."""
        return self.security_cert_store is not None

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        # Redis URLs carry the password; a repr of the settings may end up in a log or a traceback.
        for name, value in super().__repr_args__():
            yield name, maybe_sanitize_url(value) if name in _URL_FIELDS and isinstance(value, str) else value

    @model_validator(mode="after")
    def _heartbeats_fit_the_timeout(self) -> Settings:
        # Three beats per timeout: one lost or late beat never makes a live worker look dead.
        if self.heartbeat_interval_s * 3 > self.heartbeat_timeout_s:
            raise ValueError("heartbeat_interval_s must be at most a third of heartbeat_timeout_s")
        return self

    @model_validator(mode="after")
    def _key_with_certificate(self) -> Settings:
        if (self.security_key is None) != (self.security_certificate is None):
            raise ValueError("security_key and security_certificate must be set together")
        return self

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not _DEVICE.match(value):
            raise ValueError("must be auto, cpu, cuda or cuda:N")
        return value

    @field_validator("image_grid")
    @classmethod
    def _image_grid(cls, value: str) -> str:
        parse_grid(value)  # raises the readable error
        return value.strip().lower()

    @field_validator("allowed_hosts", "image_formats", "image_s3_buckets", "api_tokens", "webhook_secrets", "webhook_retry_schedule", mode="before")
    @classmethod
    def _split_hosts(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("webhook_secrets")
    @classmethod
    def _check_secrets(cls, value: list[SecretStr]) -> list[SecretStr]:
        for secret in value:
            if not secret.get_secret_value().startswith("whsec_"):
                raise ValueError("webhook secrets must be in the whsec_<base64> form")
        return value

    @field_validator("webhook_retry_schedule")
    @classmethod
    def _check_schedule(cls, value: list[float]) -> list[float]:
        if any(delay < 0 for delay in value):
            raise ValueError("retry delays must be >= 0 seconds")
        return value

    @field_validator("allowed_hosts")
    @classmethod
    def _check_hosts(cls, value: list[str]) -> list[str]:
        for entry in value:
            if "/" in entry:
                ipaddress.ip_network(entry, strict=False)  # raises ValueError on nonsense
        return value
