"""Foreign and malformed messages put straight on the queue, around good jobs.

Whoever can write to Redis can put anything on the ``vqa`` list: raw bytes, envelopes of
the wrong shape, other tasks, pickles, compression bombs, jobs that fail the schema. The
worker must drop each one with a logged reason, keep running, and answer the good jobs
submitted before and after them; nothing may be left on the queue or in the unacked set.
"""

from __future__ import annotations

import base64
import json
import re
import uuid
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from kombu import Connection
from typer.testing import CliRunner

from producer import keys
from producer.messages import TaskMessages
from producer.cli import app as cli_app
from producer.client import VQAClient
from tests.security.conftest import wait_all
from tests.support.abusive_http import wait_until
from worker.dev.services import WorkerProcess

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]
FORGED_LOG_LINE = "2026-01-01 00:00:00,000 INFO worker.main: forged"


class _OpensAFile:
    """Unpickling this creates ``path``: proof that a pickle was (or was not) deserialised."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.path), "w"))


def _envelope(client: VQAClient, question: str, **changes: Any) -> dict[str, Any]:
    """A valid queue entry for a fresh job, as a dict to tamper with."""
    job = client.build_job("https://images.example/cat.png", question)
    entry = json.loads(TaskMessages(queue="vqa", reply_to=str(uuid.uuid4())).encode(job))
    entry.update(changes)
    return entry


def _with_body(entry: dict[str, Any], body: bytes, **changes: Any) -> str:
    entry = {**entry, "body": base64.b64encode(body).decode(), **changes}
    return json.dumps(entry)


def _job_dict(entry: dict[str, Any]) -> dict[str, Any]:
    return json.loads(base64.b64decode(entry["body"]))[1]["job"]


def _hostile_entries(client: VQAClient) -> dict[str, tuple[str | bytes, str]]:
    """name -> (raw queue entry, a fragment of the reason the worker must log)."""
    e = lambda name, **changes: _envelope(client, f"hostile {name}", **changes)  # noqa: E731
    job = _job_dict(e("job"))
    protocol = lambda kwargs, *, args=(): json.dumps([list(args), kwargs, {}]).encode()  # noqa: E731
    bad_job = lambda **fields: protocol({"job": {**job, **fields}})  # noqa: E731
    base = e("base")
    entries: dict[str, tuple[str | bytes, str]] = {
        # Not a kombu envelope at all: kombu itself raises; the worker dead-letters it and goes on.
        "garbage": (b"\x00\xffnot json at all", "not JSON"),
        "json-list": ("[1, 2, 3]", "envelope is a list"),
        "empty-object": ("{}", "no headers or properties"),
        "no-delivery-tag": (json.dumps({"body": "", "properties": {}}), "no headers or properties"),
        "headers-not-a-dict": (json.dumps({**base, "headers": "task=vqa.answer"}), "no headers or properties"),
        "bad-base64": (json.dumps({**base, "body": "!!!not base64!!!"}), "not valid base64"),
        "no-delivery-info": (
            json.dumps({**base, "properties": {"delivery_tag": "t", "body_encoding": "base64"}}),
            "no delivery tag or delivery info",
        ),
        # kombu would inflate this 200 MB of zeros before any of our code ran.
        "zlib-bomb": (
            _with_body(base, zlib.compress(bytes(200 * 1024 * 1024), 9), headers={**base["headers"], "compression": "application/x-gzip"}),
            "compressed bodies",
        ),
        "oversized": (_with_body(base, b"[" + b" " * (2 * 1024 * 1024) + b"]"), "over the"),
        # Envelopes fine, the Celery message is not ours.
        "foreign-task": (json.dumps(e("foreign", headers={**base["headers"], "task": "os.system"})), "not a vqa.answer message"),
        "no-task-header": (json.dumps(e("no-task", headers={})), "not a vqa.answer message"),
        "yaml": (_with_body(base, b"- []\n", **{"content-type": "application/x-yaml"}), "content type 'application/x-yaml' refused"),
        # kombu trusts application/data whatever the accept list says; we do not.
        "application-data": (json.dumps({**base, "content-type": "application/data"}), "content type 'application/data' refused"),
        "not-json-body": (_with_body(base, b"{{{{"), "cannot decode"),
        "deeply-nested": (_with_body(base, b"[" * 100_000 + b"]" * 100_000), "cannot decode"),
        "body-is-object": (_with_body(base, json.dumps({"job": job}).encode()), "protocol 2"),
        "positional-args": (_with_body(base, protocol({"job": job}, args=[1])), "exactly one keyword"),
        "extra-kwarg": (_with_body(base, protocol({"job": job, "exec": "rm -rf /"})), "exactly one keyword"),
        "wrong-types": (_with_body(base, bad_job(image_url=5, generation="fast")), "image_url"),
        "huge-extra-field": (_with_body(base, bad_job(padding="x" * 200_000)), "Extra inputs are not permitted"),
        "long-question": (_with_body(base, bad_job(question="q" * 5000)), "question"),
        "file-url": (_with_body(base, bad_job(image_url="file:///etc/passwd")), "scheme"),
        "job-id-path": (_with_body(base, bad_job(job_id="../../results/victim")), "job_id"),
        "id-mismatch": (json.dumps({**base, "headers": {**base["headers"], "id": "someone-elses-job"}}), "does not match"),
        "huge-id-header": (json.dumps({**base, "headers": {**base["headers"], "id": "i" * 100_000}}), "does not match"),
        # An id that would forge a log line if printed as it is.
        "log-injection": (json.dumps({**base, "headers": {**base["headers"], "id": "x\n" + FORGED_LOG_LINE}}), "does not match"),
    }
    return entries


def test_hostile_messages_are_dropped_with_a_reason_and_good_jobs_answered(
    tmp_path: Path,
    stack_env: dict[str, str],
    image_base_url: str,
    client_for: Callable[[dict[str, str]], VQAClient],
    start_worker: Callable[..., WorkerProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client = client_for(stack_env)
    broker = redis.Redis.from_url(stack_env["VQA_BROKER_URL"])
    pickle_canary = tmp_path / "unpickled"
    entries = _hostile_entries(client)
    worker = start_worker(stack_env)

    before = client.submit_many([{"image_url": f"{image_base_url}/small.png", "question": f"Before {i}?"} for i in range(3)])
    for raw, _ in entries.values():
        broker.lpush("vqa", raw)
    # A pickle published the way a Celery producer with pickle enabled would.
    pickled_id = str(uuid.uuid4())
    with Connection(stack_env["VQA_BROKER_URL"]) as conn:
        conn.Producer().publish(
            [[], {"job": _OpensAFile(pickle_canary)}, {}],
            routing_key="vqa",
            serializer="pickle",
            headers={"task": "vqa.answer", "id": pickled_id, "lang": "py"},
        )
    after = client.submit_many([{"image_url": f"{image_base_url}/tall.png", "question": f"After {i}?"} for i in range(3)])

    records = wait_all(client, before + after)
    assert all(record.status == "succeeded" and record.answer for record in records.values())
    expected = len(entries) + 1
    refusals = re.compile(r"rejected a message from 'vqa' \(dead-lettered\)")
    assert wait_until(lambda: len(refusals.findall(worker.log)) >= expected, timeout=20), worker.log[-3000:]

    log = worker.log
    lines = [line for line in log.splitlines() if refusals.search(line)]
    assert len(lines) == expected, "\n".join(lines)
    for name, (_, reason) in entries.items():
        assert any(reason in line for line in lines), f"{name}: no log line with {reason!r}"
    assert any(pickled_id in line and "application/x-python-serialize" in line for line in lines)
    assert not pickle_canary.exists(), "the worker unpickled a message"
    # Log lines name the problem, never dump the input (200 kB fields, 100 kB ids).
    assert max(len(line) for line in lines) < 600
    assert "Traceback" not in log
    assert not any(line.startswith(FORGED_LOG_LINE) for line in log.splitlines())
    assert worker.proc is not None and worker.proc.poll() is None
    # Every message is settled: nothing waits on the queue or in the worker's unacked set.
    assert broker.llen("vqa") == 0
    unacked = keys.unacked_key("vqa")
    assert wait_until(lambda: broker.hlen(unacked) == 0, timeout=10), broker.hkeys(unacked)
    # Nothing vanished: each refused entry is on the dead-letter list with its reason, and the CLI lists them.
    for name, value in stack_env.items():
        monkeypatch.setenv(name, value)
    listed = CliRunner().invoke(cli_app, ["dead-letters", "--limit", "100"])
    assert listed.exit_code == 0, listed.output
    letters = [json.loads(line) for line in listed.stdout.splitlines()]
    assert len(letters) == expected == broker.llen(keys.dead_letters_key("vqa"))
    for name, (_, reason) in entries.items():
        assert any(reason in letter["reason"] for letter in letters), f"{name}: no dead letter with {reason!r}"
