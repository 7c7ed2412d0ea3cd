"""The job and the result record: the typed contract both producer and worker import."""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from producer.errors import CorruptRecord, InvalidJob

MAX_URL_LENGTH = 2048
MAX_QUESTION_LENGTH = 2000
MAX_IDEMPOTENCY_KEY_LENGTH = 256
MAX_NEW_TOKENS_LIMIT = 1024
ALLOWED_SCHEMES = ("http", "https", "s3")
JOB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$"

# Fixed namespace so the same job gets the same id on every producer, forever.
_JOB_NAMESPACE = uuid.UUID("3f1c2a52-8d3b-4c36-9a51-5b8c1e0d7a11")


def utcnow() -> datetime:
    return datetime.now(UTC)


class GenerationSettings(BaseModel):
    """How to decode. Greedy by default; jobs whose settings differ never share a ``generate`` call."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_new_tokens: int = Field(default=100, ge=1, le=MAX_NEW_TOKENS_LIMIT)
    min_new_tokens: int = Field(default=0, ge=0, le=MAX_NEW_TOKENS_LIMIT)
    do_sample: bool = False
    temperature: float = Field(default=1.0, gt=0.0, le=5.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)

    @field_validator("min_new_tokens")
    @classmethod
    def _min_le_max(cls, value: int, info: Any) -> int:
        if value > info.data.get("max_new_tokens", MAX_NEW_TOKENS_LIMIT):
            raise ValueError("min_new_tokens must not exceed max_new_tokens")
        return value


class Job(BaseModel):
    """One visual question. Travels as the kwargs of a Celery message (JSON)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Becomes part of S3 keys and Redis keys: no "/" or ".." games from a forged message.
    job_id: str = Field(min_length=1, max_length=64, pattern=JOB_ID_PATTERN)
    image_url: str = Field(min_length=1, max_length=MAX_URL_LENGTH)
    question: str = Field(min_length=1, max_length=MAX_QUESTION_LENGTH)
    model: str = Field(min_length=1, max_length=512)
    generation: GenerationSettings
    idempotency_key: str | None = Field(default=None, max_length=MAX_IDEMPOTENCY_KEY_LENGTH)
    submitted_at: datetime

    @field_validator("image_url")
    @classmethod
    def _scheme(cls, value: str) -> str:
        return check_url_shape(value)

    @field_validator("question")
    @classmethod
    def _question(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("question must not be blank")
        return value

    @classmethod
    def decode(cls, payload: object) -> Job:
        """Validate an untrusted payload (a message body); raise :class:`InvalidJob` with the reason."""
        try:
            return cls.model_validate(payload)
        except ValidationError as exc:
            raise InvalidJob(_short_errors(exc)) from exc


class ErrorInfo(BaseModel):
    model_config = ConfigDict(frozen=True)

    code: str
    message: str
    retryable: bool


class Record(BaseModel):
    """The outcome of one job, written to S3 and to the Celery result backend."""

    model_config = ConfigDict(frozen=True)

    job_id: str
    status: Literal["succeeded", "failed"]
    image_url: str
    question: str
    answer: str | None
    model: str
    quantization: str
    generation: GenerationSettings
    attempts: int = Field(ge=0)
    # How many times the model ran for this job (> 1 means redelivery cost a repeat).
    executions: int = Field(default=0, ge=0)
    worker: str
    batch_size: int = Field(ge=0)
    submitted_at: datetime | None
    started_at: datetime | None
    finished_at: datetime
    fetch_ms: float | None = None
    infer_ms: float | None = None
    error: ErrorInfo | None = None


def parse_record(body: bytes, *, key: str) -> Record:
    """A record read back from S3, or CorruptRecord when the object is not one (corrupt, or another schema version)."""
    try:
        return Record.model_validate_json(body)
    except ValidationError as exc:
        problem = exc.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(part) for part in problem["loc"]) or "record"
        raise CorruptRecord(
            f"{key} exists but is not a readable record ({where}: {problem['msg']}); it is kept as it is: "
            "delete it and submit the job again to compute it again"
        ) from exc


def check_url_shape(value: str) -> str:
    """Cheap checks that need no network: length, scheme, a host. The worker re-checks everything."""
    if len(value) > MAX_URL_LENGTH:
        raise ValueError(f"image URL longer than {MAX_URL_LENGTH} characters")
    parts = urlsplit(value)
    if parts.scheme.lower() not in ALLOWED_SCHEMES:
        raise ValueError(f"image URL scheme must be one of {', '.join(ALLOWED_SCHEMES)}, got {parts.scheme!r}")
    if not parts.netloc:
        raise ValueError("image URL has no host")
    if "@" in parts.netloc:
        # The fetcher never sends them, and the URL is stored in the record and the result
        # backend, where anyone who may read answers would read the password too.
        raise ValueError("image URL must not carry a user name or password (user:password@host); use a presigned URL or s3://")
    return value


def derive_job_id(
    *,
    image_url: str,
    question: str,
    model: str,
    generation: GenerationSettings,
    idempotency_key: str | None = None,
) -> str:
    """The client's idempotency key if given, else a hash of everything that changes the answer."""
    if idempotency_key is not None:
        name = "key:" + idempotency_key
    else:
        content = json.dumps(
            {
                "image_url": image_url,
                "question": question.strip(),
                "model": model,
                "generation": generation.model_dump(mode="json"),
            },
            sort_keys=True,
            separators=(",", ":"),
        )
        name = "content:" + hashlib.sha256(content.encode()).hexdigest()
    return str(uuid.uuid5(_JOB_NAMESPACE, name))


def _short_errors(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False, include_input=False):
        where = ".".join(str(p) for p in err["loc"]) or "job"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)
