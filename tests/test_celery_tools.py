"""Celery's own tools against a running `vqa worker`: the `celery` CLI, `app.control`, Flower; cancels, expiry, priorities.

One Redis, one `vqa worker` (Celery events on, batches of 2, a marker that keeps the model busy
for a few seconds), a stock `celery worker` on another queue to compare reply shapes with, and
Flower, all started once for the module. One scenario runs once (``scenario``) while the model
is busy, and each test asserts one part of it:

    S        in the model when revoked (it finishes), its deadline passing while it runs
    F1 F2 F3 held behind it (reserved): F1 revoked with `celery control revoke`, F2's deadline
             passes before it reaches the model, F3 runs
    Q        queued in Redis (the prefetch is full): revoked through Flower's REST API
    D1..D6   default jobs queued behind Q, then H, a high-priority job: H overtakes them
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest
import redis

from producer import keys
from producer.client import VQAClient
from producer.schema import Record
from producer.settings import Settings
from worker.dev.services import RedisServer, S3Server, WorkerProcess, free_port, wait_for_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

WORKER = "vqa-w1"
STOCK = "stock@localhost"
SLOW = "[slow]"
# Long enough for four `celery` CLI calls (about a second each to start) while S is still in the model.
SLOW_S = 8.0
CELERY = [sys.executable, "-m", "celery", "-A", "producer.celery_app"]


def _wait_for(condition: Callable[[], Any], what: str, *, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


@dataclass
class Stack:
    env: dict[str, str]
    client: VQAClient
    flower_url: str
    worker: WorkerProcess
    image_base_url: str

    def celery(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """The real `celery` command line, as a user types it (with -j: JSON replies)."""
        return subprocess.run([*CELERY, *args], env={**os.environ, **self.env}, capture_output=True, text=True, timeout=timeout)

    def celery_json(self, *args: str) -> Any:
        done = self.celery(*args, "-j", "-t", "2")
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    def flower(self, path: str, *, method: str = "GET") -> Any:
        request = urllib.request.Request(self.flower_url + path, method=method, data=b"" if method == "POST" else None)
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 - a loopback URL of ours
            return json.loads(response.read())


@pytest.fixture(scope="module")
def stack(
    s3_server: S3Server, tiny_model_dir: Path, image_base_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    # A Redis of its own: the per-test flush of the shared one would wipe this module's worker.
    redis_server = RedisServer().start()
    bucket = f"vqa-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server.url).create_bucket(Bucket=bucket)
    logs = tmp_path_factory.mktemp("celery-tools")
    env = {
        "VQA_BROKER_URL": redis_server.url,
        "VQA_RESULT_BACKEND": redis_server.url,
        "VQA_S3_ENDPOINT_URL": s3_server.url,
        "VQA_S3_BUCKET": bucket,
        "VQA_MODEL": str(tiny_model_dir),
        "VQA_QUANTIZATION": "none",
        "VQA_DEVICE": "cpu",
        "VQA_MAX_BATCH_SIZE": "2",  # prefetch 4: the slow job and three more fill it
        "VQA_MAX_BATCH_DELAY_MS": "100",
        "VQA_MAX_NEW_TOKENS": "4",
        "VQA_ALLOWED_HOSTS": image_base_url.removeprefix("http://"),
        "VQA_SEND_EVENTS": "true",
        "VQA_FAULT_SLOW_ON_QUESTION": SLOW,
        "VQA_FAULT_SLOW_S": str(SLOW_S),
        "VQA_SHUTDOWN_GRACE_S": "10",
    }
    full_env = {**os.environ, **env}
    flower_port = free_port()
    stock_log, flower_log = open(logs / "stock.log", "wb"), open(logs / "flower.log", "wb")  # noqa: SIM115 - closed below
    # Started side by side: the stock worker on a queue of its own (it must not take our jobs).
    stock = subprocess.Popen(
        [*CELERY, "worker", "-P", "solo", "-n", STOCK, "-Q", "stock-only", "-l", "warning"],
        env=full_env, stdout=stock_log, stderr=subprocess.STDOUT,
    )
    flower = subprocess.Popen(
        [*CELERY, "flower", f"--port={flower_port}", "--address=127.0.0.1"],
        env={**full_env, "FLOWER_UNAUTHENTICATED_API": "true"}, stdout=flower_log, stderr=subprocess.STDOUT,
    )
    worker = WorkerProcess(env={**env, "VQA_WORKER_NAME": WORKER}, log_path=logs / "worker.log")
    client = VQAClient(Settings(
        broker_url=redis_server.url, result_backend=redis_server.url, s3_endpoint_url=s3_server.url, s3_bucket=bucket,
        model=str(tiny_model_dir), max_new_tokens=4,
    ))
    try:
        worker.start()
        wait_for_port(flower_port, timeout=60, proc=flower)  # type: ignore[arg-type]
        _wait_for(lambda: STOCK in _pong(client), "the stock celery worker", timeout=60)
        yield Stack(env=env, client=client, flower_url=f"http://127.0.0.1:{flower_port}", worker=worker,
                    image_base_url=image_base_url)
    finally:
        for proc in (stock, flower):
            proc.terminate()
        worker.stop(timeout=30)
        for proc in (stock, flower):
            proc.wait(timeout=30)
        stock_log.close()
        flower_log.close()
        client.close()
        redis_server.cleanup()


def _pong(client: VQAClient) -> dict[str, Any]:
    replies: dict[str, Any] = {}
    for reply in client.app.control.ping(timeout=0.5):
        replies.update(reply)
    return replies


# ------------------------------------------------------------------------------ inspect, control


def test_celery_cli_inspect_and_control_reply_as_a_stock_worker_does(stack: Stack) -> None:
    pings = stack.celery_json("inspect", "ping")
    assert pings == {WORKER: {"ok": "pong"}, STOCK: {"ok": "pong"}}

    stats = stack.celery_json("inspect", "stats")
    ours, theirs = stats[WORKER], stats[STOCK]
    assert set(theirs) <= set(ours)
    for key in ("pool", "broker", "rusage"):
        assert set(theirs[key]) <= set(ours[key]), key
    assert ours["pid"] == stack.worker.proc.pid and ours["prefetch_count"] == 4  # type: ignore[union-attr]
    assert "password" not in ours["broker"]

    queues = stack.celery_json("inspect", "active_queues")
    assert [queue["name"] for queue in queues[WORKER]] == ["vqa"] and [queue["name"] for queue in queues[STOCK]] == ["stock-only"]
    assert set(queues[WORKER][0]) == set(queues[STOCK][0])
    assert stack.celery_json("inspect", "registered")[WORKER] == [keys.TASK_NAME]
    idle = stack.celery_json("inspect", "active")
    assert idle == {WORKER: [], STOCK: []}

    conf = stack.celery_json("inspect", "conf", "-d", WORKER)[WORKER]
    assert conf["task_default_queue"] == "vqa" and conf["vqa"]["VQA_QUEUE"] == "vqa"
    assert conf["vqa"]["VQA_SECURITY_KEY_PASSWORD"] is None and conf["vqa"]["VQA_FAULT_SLOW_S"] == SLOW_S

    revoked = stack.celery_json("control", "revoke", "never-queued")
    assert {node: reply for one in revoked for node, reply in one.items()} == {
        node: {"ok": "tasks {'never-queued'} flagged as revoked"} for node in (WORKER, STOCK)
    }
    # Persisted: a worker started later, or this one restarted, still drops the job.
    broker = redis.Redis.from_url(stack.env["VQA_BROKER_URL"])
    assert broker.ttl(keys.revoked_key("never-queued")) > 3600
    broker.close()

    [unsupported] = stack.celery_json("control", "add_consumer", "other", "-d", WORKER)
    assert "not supported" in unsupported[WORKER]["error"]
    [unknown] = stack.celery_json("control", "pool_grow", "-d", WORKER)
    assert unknown == {WORKER: {"error": "pool_grow is not supported by vqa worker"}}


# ------------------------------------------------------------------------------ the busy scenario


@dataclass
class Scenario:
    ids: dict[str, str]
    records: dict[str, Record]
    ping_s: list[float] = field(default_factory=list)
    active: Any = None
    reserved: Any = None
    revoke_in_model: Any = None
    revoke_buffered: Any = None
    flower_revoke: Any = None
    flower_worker: Any = None
    flower_tasks: Any = None


@pytest.fixture(scope="module")
def scenario(stack: Stack) -> Scenario:
    client, url = stack.client, stack.image_base_url
    ids: dict[str, str] = {}
    result = Scenario(ids=ids, records={})
    # S: in the model for SLOW_S; its deadline passes while it runs.
    ids["S"] = client.submit(f"{url}/small.png", f"{SLOW} what is this?", expires_in=2.0)
    _wait_for(lambda: _ids(client.app.control.inspect(destination=[WORKER], timeout=1).active()) == {ids["S"]}, "S in the model")
    ids["F1"] = client.submit(f"{url}/wide.jpg", "F1?")
    ids["F2"] = client.submit(f"{url}/tall.png", "F2?", expires_in=1.0)
    ids["F3"] = client.submit(f"{url}/square.jpg", "F3?")
    held = {ids["F1"], ids["F2"], ids["F3"]}
    _wait_for(lambda: _ids(client.app.control.inspect(destination=[WORKER], timeout=1).reserved()) == held, "F1-F3 reserved")
    # The prefetch is full: these stay in Redis, Q first, then the defaults, then H.
    ids["Q"] = client.submit(f"{url}/small.png", "Q?")
    for i in range(1, 7):
        ids[f"D{i}"] = client.submit(f"{url}/wide.jpg", f"D{i}?")
    ids["H"] = client.submit(f"{url}/tall.png", "H?", priority="high")

    # While the model is busy: replies come at once, from the CLI and from app.control.
    for _ in range(5):
        started = time.perf_counter()
        assert client.app.control.ping(destination=[WORKER], timeout=2)
        result.ping_s.append(time.perf_counter() - started)
    result.active = stack.celery_json("inspect", "active", "-d", WORKER)
    result.reserved = stack.celery_json("inspect", "reserved", "-d", WORKER)
    result.revoke_buffered = stack.celery_json("control", "revoke", ids["F1"], "-d", WORKER)
    result.revoke_in_model = stack.celery_json("control", "revoke", ids["S"], "-d", WORKER)
    broker = redis.Redis.from_url(stack.env["VQA_BROKER_URL"])
    assert broker.llen(keys.priority_queue_key("vqa", keys.DEFAULT_PRIORITY)) == 7, "Q and D1-D6 still queued"
    broker.close()
    result.flower_revoke = stack.flower(f"/api/task/revoke/{ids['Q']}", method="POST")

    result.records = {name: client.wait(job_id, timeout=120) for name, job_id in ids.items()}
    result.flower_worker = stack.flower(f"/api/workers?refresh=1&workername={WORKER}")
    result.flower_tasks = _wait_for(lambda: _flower_tasks_settled(stack, ids), "Flower to see every task", timeout=30)
    return result


def _ids(replies: dict[str, list[dict[str, Any]]] | None) -> set[str]:
    return {request["id"] for request in (replies or {}).get(WORKER, [])}


def _flower_tasks_settled(stack: Stack, ids: dict[str, str]) -> dict[str, Any] | None:
    tasks = stack.flower("/api/tasks")
    done = {"SUCCESS", "REVOKED"}
    return tasks if all(tasks.get(job_id, {}).get("state") in done for job_id in ids.values()) else None


def test_remote_control_answers_at_once_while_the_model_is_busy(stack: Stack, scenario: Scenario) -> None:
    assert max(scenario.ping_s) < 0.5, scenario.ping_s
    [active] = scenario.active[WORKER]
    assert active["id"] == scenario.ids["S"] and active["name"] == active["type"] == keys.TASK_NAME
    assert active["worker_pid"] == stack.worker.proc.pid and active["time_start"] > 0  # type: ignore[union-attr]
    assert active["kwargs"]["job"]["question"].startswith(SLOW) and active["acknowledged"] is False
    reserved = scenario.reserved[WORKER]
    assert {request["id"] for request in reserved} == {scenario.ids[name] for name in ("F1", "F2", "F3")}
    # Celery's Request.info() fields, as a stock worker lists them.
    assert all(set(request) == set(active) and request["time_start"] is None for request in reserved)
    assert {request["delivery_info"]["priority"] for request in reserved} == {keys.DEFAULT_PRIORITY}


def test_cancel_in_each_state(scenario: Scenario) -> None:
    records = scenario.records
    [[node, reply]] = [item for one in scenario.revoke_buffered for item in one.items()]
    assert node == WORKER and reply == {"ok": f"tasks {{'{scenario.ids['F1']}'}} flagged as revoked"}
    assert scenario.flower_revoke == {"message": f"Revoked '{scenario.ids['Q']}'"}
    for name in ("F1", "Q"):  # buffered behind the model; queued in Redis
        record = records[name]
        assert record.status == "failed" and record.error is not None and record.error.code == "cancelled", name
        assert record.executions == 0 and record.usage is None
    # Already in the model: the reply says so, and it finishes.
    [reply] = scenario.revoke_in_model
    assert "already in the model, these finish" in reply[WORKER]["ok"]
    assert records["S"].status == "succeeded" and records["S"].executions == 1


def test_expiry_before_and_after_start(scenario: Scenario) -> None:
    records = scenario.records
    expired = records["F2"]
    assert expired.status == "failed" and expired.error is not None and expired.error.code == "expired" and expired.executions == 0
    started = records["S"]  # its deadline passed while it ran
    assert started.status == "succeeded" and started.started_at is not None
    assert (started.finished_at - started.submitted_at).total_seconds() > 2.0  # past its deadline
    assert records["F3"].status == "succeeded"


def test_a_high_priority_job_overtakes_queued_default_ones(scenario: Scenario) -> None:
    records = scenario.records
    high = records["H"]
    assert high.status == "succeeded" and high.started_at is not None
    defaults = [records[f"D{i}"] for i in range(1, 7)]
    assert all(record.status == "succeeded" for record in defaults)
    before = [record for record in defaults if record.started_at is not None and record.started_at < high.started_at]
    # In FIFO order all six would run first. A pop that is a lower lane's turn (worker/broker.py)
    # may let one batch of defaults go first; no more.
    assert len(before) <= 2, [record.started_at for record in defaults]


def test_flower_lists_the_worker_and_its_tasks(scenario: Scenario) -> None:
    worker = scenario.flower_worker[WORKER]
    for part in ("stats", "active_queues", "registered", "conf"):
        assert part in worker, part
    assert worker["registered"] == [keys.TASK_NAME] and worker["stats"]["pool"]["max-concurrency"] == 2
    tasks = scenario.flower_tasks
    states = {name: tasks[job_id]["state"] for name, job_id in scenario.ids.items()}
    assert states == {name: "REVOKED" if name in ("F1", "F2", "Q") else "SUCCESS" for name in scenario.ids}
    assert all(tasks[job_id]["worker"] == WORKER for job_id in scenario.ids.values())


def test_shutdown_over_remote_control_is_a_warm_shutdown(stack: Stack, scenario: Scenario) -> None:
    [reply] = stack.celery_json("control", "shutdown", "-d", WORKER)
    assert "warm shutdown" in reply[WORKER]["ok"]
    assert stack.worker.wait(timeout=30) == 0
    assert "worker vqa-w1 stopped" in stack.worker.log
