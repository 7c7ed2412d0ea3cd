"""What a manifest line must hold, the jobs it gives, and the duplicate check."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest

from producer.bulk.ids import check_bulk_id, derive_bulk_id, job_key
from producer.bulk.lines import LineJobs, SeenIds
from producer.bulk.manifest import Row
from producer.client import VQAClient
from producer.errors import InvalidJob
from producer.schema import derive_job_id, utcnow
from producer.settings import Settings


@pytest.fixture()
def builder() -> Iterator[LineJobs]:
    client = VQAClient(Settings(broker_url="redis://127.0.0.1:1/0", result_backend="redis://127.0.0.1:1/0"))  # never reached
    yield LineJobs(client, bulk_id="run-1", questions=("What is shown?",), webhook_url="https://hooks.example/done")
    client.close()


@pytest.fixture()
def seen() -> Iterator[SeenIds]:
    ids = SeenIds()
    yield ids
    ids.close()


def test_a_line_gives_one_job_per_question_with_idempotent_ids(builder: LineJobs, seen: SeenIds) -> None:
    row = Row(3, {"custom_id": "cat", "image_url": "https://x/cat.jpg", "questions": ["What?", " Who? ", "What?"], "max_new_tokens": 7})
    jobs = builder.build(row, seen)
    assert [job.question for job in jobs] == ["What?", "Who?"]  # a repeated question is one job
    assert {job.bulk_id for job in jobs} == {"run-1"} and {job.custom_id for job in jobs} == {"cat"}
    assert all(job.generation.max_new_tokens == 7 and job.webhook_url == "https://hooks.example/done" for job in jobs)
    expected = derive_job_id(image_url="", question="", model="", generation=jobs[0].generation, idempotency_key=job_key("run-1", "cat", "What?"))
    assert jobs[0].job_id == expected
    # Another run, or another question, is another job.
    other = LineJobs(builder.client, bulk_id="run-2").build(Row(1, {"custom_id": "cat", "image_url": "https://x/cat.jpg", "question": "What?"}), SeenIds())
    assert other[0].job_id != jobs[0].job_id


def test_defaults_apply_to_lines_without_questions(builder: LineJobs, seen: SeenIds) -> None:
    jobs = builder.build(Row(1, {"custom_id": 17, "image_url": "https://x/a.jpg"}), seen)
    assert [(job.custom_id, job.question) for job in jobs] == [("17", "What is shown?")]


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"image_url": "https://x/a.jpg"}, "missing field: custom_id"),
        ({"custom_id": "a"}, "missing field: image_url"),
        ({"custom_id": "a", "image_url": "file:///etc/passwd"}, "scheme must be one of"),
        ({"custom_id": "a", "image_url": "https://x/a.jpg", "qestion": "typo?"}, "unknown fields: qestion"),
        ({"custom_id": "a", "image_url": "https://x/a.jpg", "question": "x", "questions": ["y"]}, "not both"),
        ({"custom_id": "a", "image_url": "https://x/a.jpg", "questions": []}, "non-empty list"),
        ({"custom_id": "a", "image_url": "https://x/a.jpg", "questions": [f"q{i}?" for i in range(17)]}, "at most 16"),
        ({"custom_id": "a", "image_url": "https://x/a.jpg", "max_new_tokens": 0}, "max_new_tokens"),
        ({"custom_id": True, "image_url": "https://x/a.jpg"}, "custom_id: must be"),
        ({"custom_id": "a", "image_url": 5}, "image_url: must be a string"),
    ],
)
def test_invalid_lines_say_why(builder: LineJobs, seen: SeenIds, fields: dict, reason: str) -> None:
    with pytest.raises(InvalidJob, match=reason):
        builder.build(Row(1, fields), seen)


def test_without_defaults_a_line_needs_a_question(builder: LineJobs, seen: SeenIds) -> None:
    bare = LineJobs(builder.client, bulk_id="run-1")
    with pytest.raises(InvalidJob, match="missing field: question"):
        bare.build(Row(1, {"custom_id": "a", "image_url": "https://x/a.jpg"}), seen)


def test_the_first_valid_line_holds_a_custom_id(builder: LineJobs, seen: SeenIds) -> None:
    with pytest.raises(InvalidJob):
        builder.build(Row(1, {"custom_id": "a", "image_url": "ftp://x/a.jpg"}), seen)  # invalid: holds nothing
    assert builder.build(Row(2, {"custom_id": "a", "image_url": "https://x/a.jpg"}), seen)
    with pytest.raises(InvalidJob, match=r"duplicate custom_id 'a' \(first on line 2\)"):
        builder.build(Row(3, {"custom_id": "a", "image_url": "https://x/b.jpg"}), seen)


def test_seen_ids_hold_many_ids_exactly() -> None:
    ids = SeenIds()
    try:
        assert all(ids.first_line(f"id-{i}", i) is None for i in range(25_000))
        assert ids.first_line("id-12345", 99_999) == 12345
        assert ids.first_line("id-25000", 25_001) is None
    finally:
        ids.close()


def test_run_ids_come_from_content_and_options() -> None:
    first = derive_bulk_id("abc", {"questions": ["q"]})
    assert first == derive_bulk_id("abc", {"questions": ["q"]}) and first.startswith("bulk-")
    assert first != derive_bulk_id("abd", {"questions": ["q"]}) != derive_bulk_id("abc", {"questions": ["r"]})
    assert check_bulk_id(first) == first
    for bad in ["", "../x", "a/b", "x" * 200, "-lead"]:
        with pytest.raises(InvalidJob):
            check_bulk_id(bad)


def test_a_runs_deadline_goes_on_every_job(builder: LineJobs, seen: SeenIds) -> None:
    deadline = utcnow() + timedelta(hours=1)
    timed = LineJobs(builder.client, bulk_id="run-1", questions=("q?",), deadline=deadline)
    (job,) = timed.build(Row(1, {"custom_id": "a", "image_url": "https://x/a.jpg"}), seen)
    assert job.deadline == deadline


def test_a_line_may_ask_for_less_image_detail(builder: LineJobs, seen: SeenIds) -> None:
    [job] = builder.build(Row(1, {"custom_id": "a", "image_url": "https://x/a.jpg", "image_grid": "2X1"}), seen)
    assert job.image_grid == "2x1"
    with pytest.raises(InvalidJob, match="image grid must be 'full' or RxC"):
        builder.build(Row(2, {"custom_id": "b", "image_url": "https://x/b.jpg", "image_grid": "tiny"}), seen)
    with pytest.raises(InvalidJob, match="image_grid: must be a string"):
        builder.build(Row(3, {"custom_id": "c", "image_url": "https://x/c.jpg", "image_grid": 2}), seen)
