"""Validation before enqueue: an invalid job gets a clear error and nothing reaches Redis.

The producer validates with the same pydantic model the worker uses (``producer.schema.Job``).
"Nothing" is checked literally: the Redis database stays empty (no queue entry, no
"already submitted" claim), for the Python API, ``vqa submit`` and ``vqa submit-many``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from pydantic import ValidationError
from typer.testing import CliRunner

from producer import keys
from producer.cli import app
from producer.client import VQAClient
from producer.errors import InvalidJob
from producer.schema import MAX_NEW_TOKENS_LIMIT, MAX_QUESTION_LENGTH, MAX_URL_LENGTH, Job
from producer.settings import Settings

# Where a job submitted without a priority is queued (producer/keys.py PRIORITIES).
DEFAULT_LANE = keys.priority_queue_key("vqa", keys.DEFAULT_PRIORITY)

pytestmark = pytest.mark.timeout(60)

GOOD_URL = "https://images.example/cat.png"

# (image_url, question, options, a fragment the error must contain)
INVALID: list[tuple[Any, Any, dict[str, Any], str]] = [
    ("file:///etc/passwd", "q", {}, "scheme"),
    ("gopher://127.0.0.1:6379/_FLUSHALL", "q", {}, "scheme"),
    ("javascript:alert(1)", "q", {}, "scheme"),
    ("ftp://images.example/cat.png", "q", {}, "scheme"),
    ("//images.example/cat.png", "q", {}, "scheme"),
    ("images.example/cat.png", "q", {}, "scheme"),
    ("http:///cat.png", "q", {}, "no host"),
    ("s3://", "q", {}, "no host"),
    ("https://alice:s3cret@images.example/cat.png", "q", {}, "password"),
    ("https://token@images.example/cat.png", "q", {}, "user name"),
    ("https://images.example/" + "a" * MAX_URL_LENGTH, "q", {}, str(MAX_URL_LENGTH)),
    ("", "q", {}, "image_url"),
    (12345, "q", {}, "image_url"),
    (GOOD_URL, "", {}, "question"),
    (GOOD_URL, " \n\t ", {}, "blank"),
    (GOOD_URL, "x" * (MAX_QUESTION_LENGTH + 1), {}, str(MAX_QUESTION_LENGTH)),
    (GOOD_URL, ["a", "list"], {}, "question"),
    (GOOD_URL, "q", {"max_new_tokens": 0}, "max_new_tokens"),
    (GOOD_URL, "q", {"max_new_tokens": -1}, "max_new_tokens"),
    (GOOD_URL, "q", {"max_new_tokens": MAX_NEW_TOKENS_LIMIT + 1}, "max_new_tokens"),
    (GOOD_URL, "q", {"max_new_tokens": 10**12}, "max_new_tokens"),
    (GOOD_URL, "q", {"generation": {"max_new_tokens": 5, "sneaky": 1}}, "sneaky"),
    (GOOD_URL, "q", {"generation": {"temperature": 0}}, "temperature"),
    (GOOD_URL, "q", {"generation": {"top_p": 1.5}}, "top_p"),
    (GOOD_URL, "q", {"generation": {"min_new_tokens": 50, "max_new_tokens": 10}}, "min_new_tokens"),
    (GOOD_URL, "q", {"generation": ["not", "a", "mapping"]}, "generation"),
    (GOOD_URL, "q", {"idempotency_key": "k" * 257}, "idempotency_key"),
    (GOOD_URL, "q", {"image_grid": "huge"}, "image_grid: Value error, image grid must be 'full' or RxC"),
    (GOOD_URL, "q", {"image_grid": "0x2"}, "image grid must be 'full' or RxC"),
    (GOOD_URL, "q", {"image_grid": 2}, "image_grid"),
]


@pytest.fixture()
def broker(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture()
def env(redis_url: str) -> dict[str, str]:
    return {"VQA_BROKER_URL": redis_url, "VQA_RESULT_BACKEND": redis_url, "VQA_MAX_NEW_TOKENS": "8"}


def assert_nothing_enqueued(broker: redis.Redis) -> None:
    assert broker.llen(DEFAULT_LANE) == 0
    assert broker.dbsize() == 0, broker.keys("*")


@pytest.mark.parametrize(("image_url", "question", "options", "fragment"), INVALID)
def test_invalid_job_raises_invalid_job_and_enqueues_nothing(
    image_url: Any,
    question: Any,
    options: dict[str, Any],
    fragment: str,
    env: dict[str, str],
    broker: redis.Redis,
    client_for: Callable[[dict[str, str]], VQAClient],
) -> None:
    client = client_for(env)
    with pytest.raises(InvalidJob) as caught:
        client.submit(image_url, question, **options)
    assert fragment in str(caught.value)
    assert caught.value.code == "invalid_job"
    # The message names the field, not a dump of the input (which may be megabytes).
    assert len(str(caught.value)) < 500
    assert "s3cret" not in str(caught.value)  # a refused URL's password is not echoed either
    assert_nothing_enqueued(broker)


def test_one_bad_request_in_a_batch_enqueues_none_and_names_every_bad_line(
    env: dict[str, str], broker: redis.Redis, client_for: Callable[[dict[str, str]], VQAClient]
) -> None:
    client = client_for(env)
    requests: list[Any] = [
        {"image_url": GOOD_URL, "question": "fine"},
        {"image_url": "file:///etc/shadow", "question": "q"},
        {"image_url": GOOD_URL, "question": "fine too"},
        ["not", "an", "object"],
        {"image_url": GOOD_URL, "question": "q", "priority": "urgent"},
        {"question": "no url"},
        {"image_url": GOOD_URL, "question": "q", "max_new_tokens": 5000},
    ]
    with pytest.raises(InvalidJob) as caught:
        client.submit_many(requests)
    message = str(caught.value)
    for line in (2, 4, 5, 6, 7):
        assert f"line {line}:" in message
    assert "line 1:" not in message and "line 3:" not in message
    assert_nothing_enqueued(broker)


def test_worker_and_producer_share_the_bounds() -> None:
    """A default answer length the jobs could never carry is refused when settings load."""
    with pytest.raises(ValidationError):
        Settings(max_new_tokens=MAX_NEW_TOKENS_LIMIT + 1)
    # job_id becomes part of S3 and Redis keys: a forged one cannot climb out of its prefix.
    base = {
        "image_url": GOOD_URL,
        "question": "q",
        "model": "m",
        "generation": {},
        "submitted_at": "2026-01-01T00:00:00Z",
    }
    for job_id in ("../../results/victim", "a/b", ".hidden", "x" * 65, "id with space"):
        with pytest.raises(InvalidJob):
            Job.decode({**base, "job_id": job_id})
    assert Job.decode({**base, "job_id": "3f1c2a52-8d3b-4c36-9a51-5b8c1e0d7a11"}).job_id


# --------------------------------------------------------------------------- the CLI


@pytest.fixture()
def cli(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Callable[..., Any]:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    runner = CliRunner()

    def invoke(*args: str, stdin: str | None = None) -> Any:
        return runner.invoke(app, list(args), input=stdin)

    return invoke


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--image", "file:///etc/passwd", "--question", "x"], "scheme"),
        (["--image", GOOD_URL, "--question", "x", "--max-new-tokens", "5000"], "max_new_tokens"),
        (["--image", GOOD_URL, "--question", "   "], "blank"),
        (["--image", GOOD_URL, "--question", "x", "--image-grid", "2by1"], "image grid must be 'full' or RxC"),
        (["--image", "http://" + "a" * 3000 + ".example/x.png", "--question", "x"], str(MAX_URL_LENGTH)),
    ],
)
def test_cli_submit_refuses_with_a_message_and_exit_2(
    args: list[str], fragment: str, cli: Callable[..., Any], broker: redis.Redis
) -> None:
    result = cli("submit", *args)
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and fragment in result.stderr
    assert result.stdout == ""
    assert_nothing_enqueued(broker)


def test_cli_submit_many_reports_every_bad_line_by_file_line_number(
    tmp_path: Path, cli: Callable[..., Any], broker: redis.Redis
) -> None:
    lines = [
        json.dumps({"image_url": GOOD_URL, "question": "fine"}),
        "",  # blank lines are skipped but still counted
        json.dumps({"image_url": "gopher://127.0.0.1:6379/_INFO", "question": "q"}),
        "{not json",
        json.dumps({"image_url": GOOD_URL, "question": "q", "max_new_tokens": 0}),
        json.dumps({"image_url": GOOD_URL, "question": "fine too"}),
        "42",
    ]
    path = tmp_path / "jobs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    result = cli("submit-many", str(path))
    assert result.exit_code == 2
    assert result.stdout == ""
    for number, fragment in ((3, "scheme"), (4, "not JSON"), (5, "max_new_tokens"), (7, "object")):
        assert f"line {number}:" in result.stderr and fragment in result.stderr, result.stderr
    assert "line 1:" not in result.stderr and "line 6:" not in result.stderr
    assert_nothing_enqueued(broker)

    # The same file from stdin, fixed: every line enqueued, one id printed per job.
    good = "\n".join(line for line in lines if '"fine' in line)
    result = cli("submit-many", "-", stdin=good)
    assert result.exit_code == 0, result.stderr
    assert len(result.stdout.split()) == 2 == broker.llen(DEFAULT_LANE)


def test_cli_submit_many_on_a_missing_file_is_a_clear_error(tmp_path: Path, cli: Callable[..., Any], broker: redis.Redis) -> None:
    result = cli("submit-many", str(tmp_path / "nowhere.jsonl"))
    assert result.exit_code == 2 and result.stderr.startswith("error: cannot read ") and "No such file" in result.stderr
    assert "Traceback" not in result.output
    assert_nothing_enqueued(broker)


def test_cli_settings_errors_do_not_echo_values(cli: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VQA_VISIBILITY_TIMEOUT", "s3cr3t-looking-value")
    result = cli("status", "some-id")
    assert result.exit_code == 2
    assert "VQA_VISIBILITY_TIMEOUT" in result.stderr
    assert "s3cr3t-looking-value" not in result.stderr
