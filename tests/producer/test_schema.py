from __future__ import annotations

from datetime import UTC, datetime

import pytest

from producer import keys
from producer.errors import InvalidJob
from producer.schema import GenerationSettings, Job, derive_job_id

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
