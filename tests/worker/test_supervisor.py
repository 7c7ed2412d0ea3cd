"""``vqa worker --processes N`` / ``--gpus``: the plan of children, then one real supervisor answering every check.

The supervisor under test runs two tiny-model workers with JSON logs and metrics ports, as an
operator starts it; the checks share it (module scope) and run in file order: both children
ready and answering, their probes and metrics, a job followed through the logs by its id, a
crashed child restarted alone, and last a SIGTERM that stops them all warmly.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from producer.client import VQAClient
from producer.settings import Settings
from tests.support.http import get
from tests.support.images import SIZES
from worker.dev.services import RedisServer, S3Server, WorkerProcess, free_port
from worker.supervisor import plan_children

# --------------------------------------------------------------------------- the plan


def _settings(**values: Any) -> Settings:
    return Settings(**values)


def test_processes_get_their_own_names_and_metrics_ports() -> None:
    specs = plan_children(_settings(worker_name="host7", metrics_port=9100), processes=3, environ={})
    assert [spec.name for spec in specs] == ["host7-0", "host7-1", "host7-2"]
    assert [spec.env["VQA_METRICS_PORT"] for spec in specs] == ["9100", "9101", "9102"]
    assert all("CUDA_VISIBLE_DEVICES" not in spec.env for spec in specs)


def test_gpus_all_pins_each_visible_gpu_and_a_list_pins_those() -> None:
    specs = plan_children(_settings(worker_name="h", device="cuda:1"), gpus="all", environ={"CUDA_VISIBLE_DEVICES": "2,3"})
    assert [(spec.name, spec.env["CUDA_VISIBLE_DEVICES"]) for spec in specs] == [("h-gpu2", "2"), ("h-gpu3", "3")]
    assert all(spec.env["VQA_DEVICE"] == "cuda" for spec in specs)  # each child sees its one GPU as cuda:0
    assert "VQA_METRICS_PORT" not in specs[0].env
    specs = plan_children(_settings(worker_name="h"), gpus="0, 1", environ={})
    assert [spec.env["CUDA_VISIBLE_DEVICES"] for spec in specs] == ["0", "1"] and "VQA_DEVICE" not in specs[0].env


@pytest.mark.parametrize(
    ("gpus", "processes", "environ", "message"),
    [
        ("all", None, {"CUDA_VISIBLE_DEVICES": ""}, "no GPUs found"),
        ("0,,1", None, {}, "GPU ids"),
        ("0,0", None, {}, "twice"),
        (None, None, {}, "one of"),
        ("0", 2, {}, "one of"),
    ],
)
def test_impossible_requests_say_why(gpus: str | None, processes: int | None, environ: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        plan_children(_settings(), gpus=gpus, processes=processes, environ=environ)


# --------------------------------------------------------------------------- one real supervisor



def _json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def _scrape(port: int) -> str:
    status, body = get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    return body.decode()


def _value(text: str, sample: str) -> float:
    match = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.MULTILINE)
    assert match, f"{sample} not in the metrics"
    return float(match.group(1))


class Fleet:
    def __init__(self, proc: WorkerProcess, env: dict[str, str], port: int) -> None:
        self.proc, self.env, self.port = proc, env, port
        self.names = ["fleet-0", "fleet-1"]
        self.client = VQAClient(Settings(**{k.removeprefix("VQA_").lower(): v for k, v in env.items() if k.startswith("VQA_")}))

    def pids(self, name: str) -> list[int]:
        return [line["pid"] for line in _json_lines(self.proc.log) if line.get("child") == name and "pid" in line]

    def ready_count(self, name: str) -> int:
        return sum(1 for line in _json_lines(self.proc.log) if line.get("message") == f"worker {name} ready")


@pytest.fixture(scope="module")
def fleet(redis_server: RedisServer, s3_server: S3Server, tiny_model_dir: Path, image_base_url: str,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    bucket = f"vqa-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server.url).create_bucket(Bucket=bucket)
    port = free_port()
    while True:  # the children take port and port + 1
        try:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", port + 1))
            break
        except OSError:
            port = free_port()
    queue = f"fleet-{uuid.uuid4().hex[:8]}"  # other tests flush Redis; a queue of its own keeps them apart anyway
    env = {
        "VQA_BROKER_URL": redis_server.url, "VQA_RESULT_BACKEND": redis_server.url, "VQA_QUEUE": queue,
        "VQA_S3_ENDPOINT_URL": s3_server.url, "VQA_S3_BUCKET": bucket, "VQA_MODEL": str(tiny_model_dir),
        "VQA_QUANTIZATION": "none", "VQA_DEVICE": "cpu", "VQA_MAX_BATCH_SIZE": "4", "VQA_MAX_BATCH_DELAY_MS": "100",
        "VQA_MAX_NEW_TOKENS": "4", "VQA_ALLOWED_HOSTS": image_base_url.removeprefix("http://"),
        "VQA_VISIBILITY_TIMEOUT": "60", "VQA_SHUTDOWN_GRACE_S": "20", "VQA_METRICS_PORT": str(port),
        "VQA_WORKER_NAME": "fleet", "VQA_LOG_FORMAT": "json", "OMP_NUM_THREADS": "1",
    }
    log_path = tmp_path_factory.mktemp("fleet") / "supervisor.log"
    proc = WorkerProcess(env=env, log_path=log_path, args=("--processes", "2"), ready_workers=2).start(ready_timeout=180)
    fleet = Fleet(proc, env, port)
    yield fleet
    fleet.client.close()
    proc.stop(timeout=60)


@pytest.mark.slow
def test_both_children_are_ready_under_their_names_and_answer_jobs(fleet: Fleet, image_base_url: str) -> None:
    assert fleet.proc.ready_names() == set(fleet.names)
    for offset in (0, 1):
        status, body = get(f"http://127.0.0.1:{fleet.port + offset}/readyz")
        report = json.loads(body)
        assert status == 200 and report["status"] == "ready" and report["model_load_s"] > 0 and "warmup_s" in report, report
        assert get(f"http://127.0.0.1:{fleet.port + offset}/healthz")[0] == 200
    images = sorted(SIZES)
    ids = [fleet.client.submit(f"{image_base_url}/{images[n % len(images)]}", f"Question {n}?") for n in range(8)]
    records = [fleet.client.wait(job_id, timeout=90) for job_id in ids]
    assert all(record.status == "succeeded" for record in records)
    assert {record.worker for record in records} <= set(fleet.names)


@pytest.mark.slow
def test_each_child_serves_the_stage_and_batch_metrics(fleet: Fleet) -> None:
    texts = {name: _scrape(fleet.port + offset) for offset, name in enumerate(fleet.names)}
    total = lambda sample: sum(_value(text, sample.format(w=name)) for name, text in texts.items())  # noqa: E731
    jobs = total('vqa_jobs_total{{status="succeeded",worker="{w}"}}')
    assert jobs >= 8
    assert total('vqa_queue_wait_seconds_count{{worker="{w}"}}') >= 8
    assert total('vqa_fetch_seconds_count{{worker="{w}"}}') == jobs
    assert total('vqa_preprocess_seconds_count{{worker="{w}"}}') == jobs
    assert total('vqa_store_seconds_count{{worker="{w}"}}') == jobs
    batches = total('vqa_batch_inference_seconds_count{{worker="{w}"}}')
    assert batches == total('vqa_batch_size_count{{worker="{w}"}}') == total('vqa_batches_total{{worker="{w}"}}') > 0
    assert total('vqa_batch_size_sum{{worker="{w}"}}') == jobs  # every job ran once, in some batch
    assert total('vqa_prompt_tokens_total{{worker="{w}"}}') <= total('vqa_padded_prompt_tokens_total{{worker="{w}"}}')
    for name, text in texts.items():
        assert _value(text, f'vqa_model_load_seconds{{worker="{name}"}}') > 0
        assert f'vqa_messages_restored_total{{worker="{name}"}} 0.0' in text
        assert "vqa_gpu_memory_allocated_bytes" not in text  # no CUDA here


@pytest.mark.slow
def test_a_job_is_followed_through_the_json_logs_by_its_id(fleet: Fleet, image_base_url: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="producer.client")
    job_id = fleet.client.submit(f"{image_base_url}/{sorted(SIZES)[1]}", "Follow me?", idempotency_key=f"follow-{uuid.uuid4().hex}")
    assert [getattr(entry, "job_id", None) for entry in caplog.records if entry.getMessage().startswith("submitted")] == [job_id]
    record = fleet.client.wait(job_id, timeout=60)
    deadline = time.monotonic() + 10
    while True:  # the result is published just before the on_stored hooks write the last line
        lines = _json_lines(fleet.proc.log)
        mine = [line for line in lines if line["logger"] == "vqa.jobs" and (line.get("job_id") == job_id or job_id in line.get("job_ids", []))]
        if len(mine) >= 3 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert all({"ts", "level", "logger", "message", "worker"} <= set(line) for line in lines)
    assert [line["message"].split()[0] for line in mine] == ["received", "batch", "stored"], mine
    received, batch, stored = mine
    assert received["worker"] == batch["worker"] == stored["worker"] == record.worker
    assert stored["batch_id"] == batch["batch_id"] and batch["batch_id"].startswith(record.worker)
    assert stored["status"] == "succeeded" and received["queue_wait_s"] >= 0


@pytest.mark.slow
def test_a_crashed_child_is_restarted_alone(fleet: Fleet, image_base_url: str) -> None:
    victim, bystander = fleet.names
    [victim_pid], [bystander_pid] = fleet.pids(victim), fleet.pids(bystander)
    os.kill(victim_pid, signal.SIGKILL)
    deadline = time.monotonic() + 120
    while fleet.ready_count(victim) < 2:
        assert time.monotonic() < deadline, fleet.proc.log[-3000:]
        time.sleep(0.2)
    pids = fleet.pids(victim)
    assert len(pids) == 2 and pids[1] != victim_pid
    assert fleet.pids(bystander) == [bystander_pid] and fleet.ready_count(bystander) == 1
    os.kill(bystander_pid, 0)  # still the same process, untouched
    crash = [line for line in _json_lines(fleet.proc.log) if line.get("child") == victim and line.get("exit_code") is not None]
    assert crash and crash[0]["exit_code"] == -signal.SIGKILL and crash[0]["restart_in_s"] == 1.0
    assert fleet.client.wait(fleet.client.submit(f"{image_base_url}/{sorted(SIZES)[2]}", "After the crash?"), timeout=60).status == "succeeded"


@pytest.mark.slow
def test_sigterm_stops_every_child_warmly(fleet: Fleet) -> None:
    fleet.proc.signal(signal.SIGTERM)
    assert fleet.proc.wait(timeout=60) == 0
    lines = _json_lines(fleet.proc.log)
    stopped = {line["worker"] for line in lines if line["message"].startswith("worker ") and " stopped: " in line["message"]}
    assert stopped == set(fleet.names)
    for pid in fleet.pids(fleet.names[0])[-1:] + fleet.pids(fleet.names[1]):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
