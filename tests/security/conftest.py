"""Fixtures for the security tests: hostile HTTP servers on loopback and worker-process probes.

The pipeline fixtures (``stack_env``, ``start_worker``, ``client_for``, ``image_base_url``)
come from ``tests/conftest.py``; these add servers the worker must never reach (canaries,
which count every TCP connection) and an allowed server that misbehaves on purpose.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import boto3
import psutil
import pytest

from producer.client import VQAClient
from producer.schema import Record
from tests.support.abusive_http import AbusiveServer, ipv6_loopback_available
from worker.dev.services import WorkerProcess

MIB = 1024 * 1024


@pytest.fixture(autouse=True)
def _collect_celery_results() -> Iterator[None]:
    """Collect the clients' AsyncResults while their Redis is still up.

    Celery's result backend keeps every waited-on AsyncResult; when the closed client is
    finally garbage-collected, each one unsubscribes from Redis in ``__del__``. Run that
    after the test (this fixture tears down after ``client_for``), not at a random later
    moment when the Redis it talks to is gone and the failure becomes an unraisable warning.
    """
    yield
    gc.collect()


@pytest.fixture()
def origin() -> Iterator[AbusiveServer]:
    """An abusive server the operator allowed (tests add ``127.0.0.1:<port>`` to VQA_ALLOWED_HOSTS)."""
    with AbusiveServer() as server:
        yield server


@pytest.fixture()
def canary() -> Iterator[AbusiveServer]:
    """A loopback server nobody allowed: it must see no connection at all."""
    with AbusiveServer() as server:
        yield server
    assert server.connections == 0, f"the canary was reached: {server.requests}"


@pytest.fixture()
def canary6() -> Iterator[AbusiveServer | None]:
    """The IPv6 loopback canary, or None where this host has no IPv6 loopback."""
    if not ipv6_loopback_available():
        yield None
        return
    with AbusiveServer("::1") as server:
        yield server
    assert server.connections == 0, f"the IPv6 canary was reached: {server.requests}"


def allowed_hosts(env: dict[str, str], *servers: AbusiveServer) -> str:
    """VQA_ALLOWED_HOSTS: the test image server plus these servers, each pinned to its port."""
    return ",".join([env["VQA_ALLOWED_HOSTS"], *(f"127.0.0.1:{server.port}" for server in servers)])


def wait_all(client: VQAClient, job_ids: list[str], *, timeout: float = 120) -> dict[str, Record]:
    return {job_id: client.wait(job_id, timeout=timeout) for job_id in job_ids}


def s3_record(env: dict[str, str], key: str) -> bytes:
    s3 = boto3.client("s3", endpoint_url=env["VQA_S3_ENDPOINT_URL"])
    return s3.get_object(Bucket=env["VQA_S3_BUCKET"], Key=key)["Body"].read()


class RssProbe:
    """Peak resident memory of a worker process over a window, from two independent sources.

    ``VmHWM`` (the kernel's high-water mark, reset through ``/proc/<pid>/clear_refs``) sees
    every allocation however short; a 20 ms sampler is the fallback where the reset is refused.
    """

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.baseline = 0
        self.sampled_peak = 0
        self._hwm_reset = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> RssProbe:
        try:
            Path(f"/proc/{self.process.pid}/clear_refs").write_text("5")
            self._hwm_reset = True
        except OSError:
            self._hwm_reset = False
        self.baseline = self.process.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            try:
                self.sampled_peak = max(self.sampled_peak, self.process.memory_info().rss)
            except psutil.Error:
                return

    @property
    def peak(self) -> int:
        peak = self.sampled_peak
        if self._hwm_reset:
            for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]) * 1024)
        return peak

    @property
    def growth_mib(self) -> float:
        return (self.peak - self.baseline) / MIB


@pytest.fixture()
def rss_probe() -> Callable[[WorkerProcess], RssProbe]:
    def build(worker: WorkerProcess) -> RssProbe:
        assert worker.proc is not None
        return RssProbe(worker.proc.pid)

    return build
