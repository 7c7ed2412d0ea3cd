"""Jobs that break the worker: one that kills it every time (poison), batches that run out of memory."""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest

from producer import keys
from producer.client import VQAClient
from tests.reliability.helpers import submit
from tests.reliability.history import History
from worker.dev.services import WorkerProcess, free_port

pytestmark = pytest.mark.slow

POISON_MARKER = "__crash_the_worker__"


class Supervisor:
    """Keeps ``slots`` workers running, restarting any that dies, as systemd or Kubernetes would."""

    def __init__(self, start_worker: Callable[..., WorkerProcess], env: dict[str, str], *, slots: int) -> None:
        self._start = start_worker
        self._env = env
        self._started = 0
        self.deaths: list[int] = []  # exit codes
        self._stopping = threading.Event()
        self._workers = [self._spawn() for _ in range(slots)]
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _spawn(self) -> WorkerProcess:
        self._started += 1
        return self._start(self._env, name=f"s{self._started}")

    def _watch(self) -> None:
        while not self._stopping.is_set():
            for index, worker in enumerate(self._workers):
                code = worker.proc.poll() if worker.proc is not None else None
                if code is not None and not self._stopping.is_set():
                    self.deaths.append(code)
                    self._workers[index] = self._spawn()
            time.sleep(0.1)

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=60)


def test_poison_job_is_quarantined_and_the_others_finish(
    rel_env: dict[str, str],
    image_base_url: str,
    client_for: Callable[[dict[str, str]], VQAClient],
    start_worker: Callable[..., WorkerProcess],
    history_for: Callable[[dict[str, str]], History],
    figures: Callable[..., dict[str, Any]],
) -> None:
    env = {**rel_env, "VQA_FAULT_CRASH_ON_QUESTION": POISON_MARKER, "VQA_MAX_DELIVERIES": "3"}
    client = client_for(env)
    history = history_for(env)
    broker = history.broker
    ids = submit(client, image_base_url, 20, tag="neighbour")
    poison = client.submit(f"{image_base_url}/tiny.png", f"{POISON_MARKER} what is shown?")
    ids += submit(client, image_base_url, 20, tag="late neighbour")

    started = time.monotonic()
    started_epoch = time.time()
    supervisor = Supervisor(start_worker, env, slots=2)
    try:
        history.wait([*ids, poison], timeout=150)
    finally:
        supervisor.stop()
    wall_s = time.monotonic() - started

    audit = history.audit([*ids, poison])
    deliveries = int(broker.get(keys.deliveries_key(poison)))
    quarantined = audit.records[poison]
    figures(
        "6. poison job",
        **audit.summary(),
        recovery_s=None,
        wall_s=round(wall_s, 1),
        quarantined_after_s=round(audit.finished_at([poison]) - started_epoch, 1),
        worker_crashes=len(supervisor.deaths),
        poison_deliveries=deliveries,
        max_deliveries=3,
    )
    assert audit.lost == [] and audit.disagreements == []
    assert audit.failed == {poison: "poison"}
    assert quarantined["error"]["retryable"] is False and quarantined["answer"] is None
    # Delivered 3 times without finishing (each killed a worker); the 4th delivery quarantines it.
    assert supervisor.deaths == [137, 137, 137]
    assert deliveries == 4
    assert audit.duplicate_records == 0
    # Companions of its first crash ran again, alone; none was charged with its crashes.
    assert all(audit.records[job_id]["status"] == "succeeded" for job_id in ids)


def test_out_of_memory_batches_are_split_and_every_job_finishes(
    rel_env: dict[str, str],
    image_base_url: str,
    client_for: Callable[[dict[str, str]], VQAClient],
    start_worker: Callable[..., WorkerProcess],
    history_for: Callable[[dict[str, str]], History],
    figures: Callable[..., dict[str, Any]],
) -> None:
    metrics_port = free_port()
    env = {**rel_env, "VQA_FAULT_OOM_ABOVE_BATCH": "2", "VQA_METRICS_PORT": str(metrics_port)}
    client = client_for(env)
    history = history_for(env)
    ids = submit(client, image_base_url, 48, tag="oom")
    started = time.monotonic()
    start_worker(env, name="a")
    history.wait(ids, timeout=90)
    wall_s = time.monotonic() - started

    metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    splits = _metric(metrics, "vqa_oom_splits_total")
    audit = history.audit(ids)
    sizes = {record["batch_size"] for record in audit.records.values()}
    figures("7. out of memory", **audit.summary(), recovery_s=None, wall_s=round(wall_s, 1), oom_splits=splits, batch_sizes=sorted(sizes))
    assert audit.lost == [] and audit.disagreements == [] and audit.failed == {}
    assert audit.duplicate_records == 0 and audit.duplicate_executions == 0
    assert splits > 0 and max(sizes) <= 2
    assert _metric(metrics, 'vqa_jobs_total{status="succeeded",worker="a"}') == len(ids)


def _metric(text: str, sample: str) -> float:
    """The value of ``sample`` (``name`` sums all its label sets; ``name{labels}`` is one of them)."""
    values = [
        float(value)
        for line in text.splitlines()
        if not line.startswith("#")
        for name, _, value in [line.rpartition(" ")]
        if name == sample or name.split("{")[0] == sample
    ]
    assert values, f"{sample} not in the metrics:\n{text[-2000:]}"
    return sum(values)
