"""Message intake: a queue entry becomes a job only through worker/intake.py, and every refusal is one MessageRejected."""

from __future__ import annotations

import base64
import json
import uuid

import pytest

from producer.messages import TaskMessages
from producer.errors import MessageRejected, PermanentError
from producer.schema import GenerationSettings, Job, utcnow
from worker.intake import MAX_MESSAGE_BYTES, parse_envelope, read_message


def _job(i: int = 7) -> Job:
    return Job(
        job_id=f"job-{i}",
        image_url="https://images.example/a.png",
        question=f"question {i}?",
        model="m",
        generation=GenerationSettings(max_new_tokens=4),
        submitted_at=utcnow(),
    )


def _raw(job: Job) -> bytes:
    return TaskMessages(queue="vqa", reply_to=str(uuid.uuid4())).encode(job).encode()


def _with(raw: bytes, **changes: object) -> bytes:
    envelope = json.loads(raw)
    for path, value in changes.items():
        where = envelope
        *parents, last = path.split("__")
        for part in parents:
            where = where[part]
        where[last] = value
    return json.dumps(envelope).encode()


def test_a_producers_message_becomes_its_job() -> None:
    message, job = read_message("tag-1", _raw(_job(7)))
    assert job.job_id == "job-7" and message.delivery_tag == "tag-1" and message.content_type == "application/json"
    assert message.task_id == "job-7"


@pytest.mark.parametrize(
    "raw",
    [b"\x00\xff not json", b"[1, 2]", b"{}", json.dumps({"body": "", "properties": {}}).encode()],
)
def test_malformed_entries_are_rejected_with_a_reason(raw: bytes) -> None:
    with pytest.raises(MessageRejected) as caught:
        parse_envelope("tag", raw)
    assert caught.value.message and caught.value.code == "message_rejected"
    assert isinstance(caught.value, PermanentError)


def test_one_size_limit_on_the_raw_entry() -> None:
    raw = _raw(_job())
    padded = _with(raw, headers__padding="x" * (MAX_MESSAGE_BYTES - len(raw) + 1))
    with pytest.raises(MessageRejected, match="over the"):
        read_message("tag", padded)
    just_fits = _with(raw, headers__padding="x" * (MAX_MESSAGE_BYTES - len(raw) - 200))
    assert read_message("tag", just_fits)[1].job_id == "job-7"


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"headers__compression": "application/x-gzip"}, "compressed"),
        ({"headers__task": "other.task"}, "not a vqa.answer message"),
        ({"content-type": "application/x-python-serialize"}, "content type"),
        ({"headers__id": "someone-else"}, "does not match the job id"),
        ({"properties__body_encoding": "base64", "body": "***"}, "base64"),
    ],
)
def test_each_refusal_names_its_reason(changes: dict[str, object], reason: str) -> None:
    with pytest.raises(MessageRejected, match=reason):
        read_message("tag", _with(_raw(_job()), **changes))


def test_an_invalid_job_is_rejected_naming_the_message() -> None:
    raw = _raw(_job())
    body = json.loads(base64.b64decode(json.loads(raw)["body"]))
    body[1]["job"]["image_url"] = "file:///etc/passwd"
    bad = _with(raw, body=base64.b64encode(json.dumps(body).encode()).decode())
    with pytest.raises(MessageRejected, match=r"message job-7: image_url: .*scheme"):
        read_message("tag", bad)
