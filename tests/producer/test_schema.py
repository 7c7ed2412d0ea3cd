from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict

from producer import keys
from producer.errors import InvalidJob
from producer.messages import TaskMessages
from producer.schema import V1_JOB_FIELDS, GenerationSettings, Job, derive_job_id
from worker.intake import read_message

GEN = GenerationSettings(max_new_tokens=32)


def _id(**overrides: object) -> str:
    values: dict = {"image_url": "https://img.example/cat.jpg", "question": "What is it?", "model": "m", "generation": GEN}
    values.update(overrides)
    return derive_job_id(**values)


def test_same_content_same_id_and_each_field_matters() -> None:
    base = _id()
    assert base == _id()
    assert base == _id(question="  What is it?  ")  # surrounding blanks do not make a new job
    assert base != _id(image_url="https://img.example/dog.jpg")
    assert base != _id(question="What colour is it?")
    assert base != _id(model="other")
    assert base != _id(generation=GenerationSettings(max_new_tokens=33))


def test_idempotency_key_wins_over_content() -> None:
    assert _id(idempotency_key="k1") == _id(image_url="https://other/x.png", idempotency_key="k1")
    assert _id(idempotency_key="k1") != _id(idempotency_key="k2") != _id()


def _job(**overrides: object) -> dict:
    values: dict = {
        "job_id": "abc",
        "image_url": "https://img.example/cat.jpg",
        "question": "What is it?",
        "model": "m",
        "generation": {"max_new_tokens": 10},
        "submitted_at": datetime.now(UTC).isoformat(),
    }
    values.update(overrides)
    return values


@pytest.mark.parametrize(
    "overrides",
    [
        {"image_url": "file:///etc/passwd"},
        {"image_url": "gopher://x/"},
        {"image_url": "https://" + "a" * 3000},
        {"image_url": "http:///nohost"},
        {"question": "   "},
        {"question": "q" * 2001},
        {"generation": {"max_new_tokens": 0}},
        {"generation": {"max_new_tokens": 100000}},
        {"generation": {"max_new_tokens": 5, "min_new_tokens": 6}},
        {"generation": {"max_new_tokens": 5, "beams": 4}},
        {"extra": "field"},
        {"job_id": 5},
    ],
)
def test_invalid_jobs_raise_our_error(overrides: dict) -> None:
    with pytest.raises(InvalidJob):
        Job.decode(_job(**overrides))


def test_valid_job_round_trips_through_json() -> None:
    job = Job.decode(_job())
    assert Job.decode(job.model_dump(mode="json")) == job


def test_key_layout() -> None:
    assert keys.result_key("", "j1") == "results/j1.json"
    assert keys.result_key("tenant-a/", "j1") == "tenant-a/results/j1.json"
    assert keys.failed_key("p/", "j1") == "p/failed/j1.json"
    assert keys.submitted_key("j1") == "vqa:submitted:j1"


# The first message format's keys, spelled out: the wire format, not whatever the schema says today.
V1_KEYS = {"job_id", "image_url", "question", "model", "generation", "idempotency_key", "submitted_at"}
LATER_FIELDS = {"deadline": "2026-12-02T12:00:00Z", "bulk_id": "run-1", "custom_id": "line-1",
                "webhook_url": "https://hooks.example.com/vqa", "image_grid": "1x1"}


class _V1WorkersJob(BaseModel):
    """What a worker of the first version validates a message's job with: its keys, nothing else."""

    model_config = ConfigDict(extra="forbid")

    job_id: str
    image_url: str
    question: str
    model: str
    generation: dict[str, Any]
    idempotency_key: str | None = None
    submitted_at: datetime


def test_a_job_using_no_later_field_serializes_without_their_keys() -> None:
    job = Job.decode(_job())
    for message in (job.model_dump(mode="json"), json.loads(job.model_dump_json())):
        assert set(message) == V1_KEYS  # no webhook_url, image_grid, deadline... as null
        _V1WorkersJob.model_validate(message)  # so a worker of the first version still takes it
        assert Job.decode(message) == job


def test_a_message_without_the_later_fields_parses_as_them_unset() -> None:
    job = Job.decode({key: value for key, value in _job().items() if key in V1_KEYS})
    assert all(getattr(job, name) is None for name in LATER_FIELDS)
    # Through the whole message path: what a producer enqueues is what a worker reads back.
    raw = TaskMessages(queue="vqa", reply_to="r").encode(job)
    assert set(json.loads(base64.b64decode(json.loads(raw)["body"]))[1]["job"]) == V1_KEYS
    assert read_message("tag", raw.encode())[1] == job


@pytest.mark.parametrize("name", sorted(LATER_FIELDS))
def test_a_later_field_travels_only_when_set(name: str) -> None:
    job = Job.decode(_job(**{name: LATER_FIELDS[name]}))
    message = job.model_dump(mode="json")
    assert set(message) == V1_KEYS | {name} and Job.decode(message) == job


def test_every_field_after_the_first_format_is_optional() -> None:
    # Left out when unset only works for fields whose absence means None: a new field must be one.
    later = {name: field for name, field in Job.model_fields.items() if name not in V1_JOB_FIELDS}
    assert set(later) == set(LATER_FIELDS) and V1_JOB_FIELDS == V1_KEYS
    assert all(not field.is_required() and field.default is None for field in later.values())
