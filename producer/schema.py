"""The job and the result record: the typed contract both producer and worker import."""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, ValidationError, field_validator, model_serializer

from producer.errors import CorruptRecord, InvalidJob
from producer.image_grid import grid_text, parse_grid

MAX_URL_LENGTH = 2048
MAX_QUESTION_LENGTH = 2000
MAX_IDEMPOTENCY_KEY_LENGTH = 256
MAX_NEW_TOKENS_LIMIT = 1024
ALLOWED_SCHEMES = ("http", "https", "s3")
WEBHOOK_SCHEMES = ("http", "https")
JOB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$"
# Bulk run ids become part of S3 keys ({prefix}bulk/{bulk_id}/...) and Redis keys.
BULK_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
MAX_BULK_ID_LENGTH = 128
MAX_CUSTOM_ID_LENGTH = 1024  # an S3 key is at most 1024 bytes, and a prefix source uses keys as ids

# The job message's fields in its first format (v1). Every field added since is optional and
# left out of a message when unset (Job's serializer), so older workers keep reading messages.
V1_JOB_FIELDS = frozenset({"job_id", "image_url", "question", "model", "generation", "idempotency_key", "submitted_at"})

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
    # Not started by then: the job ends as an "expired" record without running (the Celery
    # ``expires`` header of its message, when earlier, counts too).
    deadline: datetime | None = None
    # Set when the job belongs to a bulk run (its id) and names its manifest line (custom_id).
    bulk_id: str | None = Field(default=None, min_length=1, max_length=MAX_BULK_ID_LENGTH, pattern=BULK_ID_PATTERN)
    custom_id: str | None = Field(default=None, min_length=1, max_length=MAX_CUSTOM_ID_LENGTH)
    # Called (signed, by `vqa webhooks`, never by the GPU worker) once the job's record is stored.
    webhook_url: str | None = Field(default=None, max_length=MAX_URL_LENGTH)
    # Less image detail than the worker's VQA_IMAGE_GRID (producer/image_grid.py): `full` or RxC.
    # The worker runs the job with the intersection of the two, never more than its own.
    image_grid: str | None = Field(default=None, max_length=16)

    @field_validator("image_url")
    @classmethod
    def _scheme(cls, value: str) -> str:
        return check_url_shape(value)

    @field_validator("webhook_url")
    @classmethod
    def _webhook_scheme(cls, value: str | None) -> str | None:
        return None if value is None else check_url_shape(value, schemes=WEBHOOK_SCHEMES, what="webhook URL")

    @field_validator("image_grid")
    @classmethod
    def _image_grid(cls, value: str | None) -> str | None:
        return None if value is None else grid_text(parse_grid(value))  # parse_grid raises the readable error

    @model_serializer(mode="wrap")
    def _drop_unset_later_fields(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # An optional field added after the first message format is absent rather than null
        # when unset: a worker of an earlier version (extra="forbid") refuses any key it does not
        # know, even a null one, so it still accepts an upgraded producer's messages that use
        # none of the newer features. A newer worker reads the absence as None.
        data = handler(self)
        for name in [name for name, value in data.items() if value is None and name not in V1_JOB_FIELDS]:
            del data[name]
        return data

    @field_validator("submitted_at", "deadline")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("must carry a time zone (UTC, e.g. 2026-12-01T12:00:00Z)")
        return value

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


class Usage(BaseModel):
    """What a job cost the model, as batch APIs report it: enough to price a run from its first thousand jobs."""

    model_config = ConfigDict(frozen=True)

    prompt_tokens: int = Field(ge=0)  # image tokens included
    image_tokens: int = Field(ge=0)
    generated_tokens: int = Field(ge=0)
    model_ms: float = Field(ge=0)  # this job's share of its batch's generate time


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
    # The anyres grid limit the job ran with (the job's image_grid within the worker's
    # VQA_IMAGE_GRID); None on records written before it was recorded.
    image_grid: str | None = None
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
    usage: Usage | None = None  # None when the model did not run for it
    bulk_id: str | None = None
    custom_id: str | None = None


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str | float | int) -> timedelta:
    """``90``, ``"90s"``, ``"15m"``, ``"24h"``, ``"7d"`` -> a positive timedelta; ValueError otherwise."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        seconds = float(text)
    else:
        match = _DURATION.match(str(text))
        if match is None:
            raise ValueError(f"{text!r} is not a duration (e.g. 90s, 15m, 24h, 7d)")
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if seconds <= 0:
        raise ValueError("a duration must be positive")
    return timedelta(seconds=seconds)


def parse_time(text: str | datetime) -> datetime:
    """An ISO 8601 time with a time zone (``2026-12-01T12:00:00Z``); ValueError otherwise."""
    when = text if isinstance(text, datetime) else datetime.fromisoformat(str(text))
    if when.tzinfo is None:
        raise ValueError(f"{text!s} has no time zone; add Z or an offset")
    return when


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


def check_url_shape(value: str, *, schemes: tuple[str, ...] = ALLOWED_SCHEMES, what: str = "image URL") -> str:
    """Cheap checks that need no network: length, scheme, a host. The worker (or the webhook sender) re-checks everything."""
    if len(value) > MAX_URL_LENGTH:
        raise ValueError(f"{what} longer than {MAX_URL_LENGTH} characters")
    parts = urlsplit(value)
    if parts.scheme.lower() not in schemes:
        raise ValueError(f"{what} scheme must be one of {', '.join(schemes)}, got {parts.scheme!r}")
    if not parts.netloc:
        raise ValueError(f"{what} has no host")
    if "@" in parts.netloc:
        # The fetcher never sends them, and the URL is stored in the record and the result
        # backend, where anyone who may read answers would read the password too.
        raise ValueError(f"{what} must not carry a user name or password (user:password@host); use a presigned URL or s3://")
    return value


def derive_job_id(
    *,
    image_url: str,
    question: str,
    model: str,
    generation: GenerationSettings,
    idempotency_key: str | None = None,
    image_grid: str | None = None,
) -> str:
    """The client's idempotency key if given, else a hash of everything that changes the answer."""
    if idempotency_key is not None:
        name = "key:" + idempotency_key
    else:
        fields: dict[str, Any] = {
            "image_url": image_url,
            "question": question.strip(),
            "model": model,
            "generation": generation.model_dump(mode="json"),
        }
        if image_grid is not None:  # only then: the ids of jobs that ask nothing stay as they were
            fields["image_grid"] = image_grid
        content = json.dumps(
            fields,
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
