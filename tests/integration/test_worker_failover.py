"""A ``vqa worker`` and a producer across a real Sentinel failover (worker/dev/sentinel.py).

The replica hears its master through a proxy that can stall (tests/support/tcp_proxy.py). The
master is killed (SIGKILL) mid-run, right after a stall of that link: what the master accepted
during the stall exists nowhere else, which is the window asynchronous replication leaves open
whenever a replica lags. With ``VQA_ACCEPT_REPLICAS=1`` a submission inside that window is
refused (its WAIT cannot be satisfied), so every accepted job survives; with 0 it is accepted and
may be lost. The test does not count on a loss in the 0 case either way: whether the worker took
a stalled job off the master before the kill is timing. It accounts for every accepted job:
finished, or lost with nothing of it left (resubmitting it runs it).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from producer.client import VQAClient
from producer.errors import BackendUnavailable
from tests.reliability.helpers import SLOW_GENERATION, wait_until
from tests.support.tcp_proxy import PartitionProxy
from worker.dev.sentinel import SentinelGroup
from worker.dev.services import WorkerProcess

pytestmark = pytest.mark.slow

BEFORE = 8  # accepted before the stall: on the replica when the master dies
IN_STALL = 3  # offered while the replica link stalls
AFTER = 4  # offered once the master is dead: accepted only by the promoted replica


@pytest.fixture()
def linked_group(tmp_path: Path) -> Iterator[tuple[SentinelGroup, PartitionProxy]]:
    proxies: list[PartitionProxy] = []

    def through_proxy(master_port: int) -> int:
        proxies.append(PartitionProxy(master_port).start())
        return proxies[-1].port

    # A long failover timeout keeps the sentinels from re-pointing the replica past the proxy (worker/dev/sentinel.py).
    group = SentinelGroup(data_dir=tmp_path / "redis", replica_link=through_proxy, failover_timeout_ms=120_000)
    try:
        yield group.start(), proxies[0]
    finally:
        group.stop()
        for proxy in proxies:
            proxy.stop()


def _request(image_base_url: str, tag: str, **options: Any) -> dict[str, Any]:
    return {"image_url": f"{image_base_url}/tiny.png", "question": f"{tag}: what is shown?", **options}


def _submit_until_accepted(client: VQAClient, request: dict[str, Any], *, timeout_s: float) -> tuple[str, float]:
    """Retry one submission through the failover; return its id and when it was accepted."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return client.submit_many([request])[0], time.monotonic()
        except BackendUnavailable:
            assert time.monotonic() < deadline, f"{request['question']}: no submission accepted within {timeout_s} s of the kill"
            time.sleep(0.1)


@pytest.mark.parametrize("accept_replicas", [0, 1])
def test_worker_and_producer_follow_a_failover(
    accept_replicas: int,
    linked_group: tuple[SentinelGroup, PartitionProxy],
    stack_env: dict[str, str],
    image_base_url: str,
    client_for: Callable[[dict[str, str]], VQAClient],
    start_worker: Callable[..., WorkerProcess],
) -> None:
    group, link = linked_group
    env = {
        **stack_env,
        "VQA_BROKER_URL": group.url,
        "VQA_RESULT_BACKEND": group.url,
        "VQA_ACCEPT_REPLICAS": str(accept_replicas),
        "VQA_ACCEPT_REPLICAS_TIMEOUT_MS": "300",
        "VQA_MAX_BATCH_DELAY_MS": "50",
    }
    worker = start_worker(env)
    client = client_for(env)
    requests: dict[str, dict[str, Any]] = {}  # job id -> what was submitted, to resubmit a lost one as it was
    before_requests = [_request(image_base_url, f"before {index}", generation=SLOW_GENERATION) for index in range(BEFORE)]
    before = client.submit_many(before_requests)
    requests.update(zip(before, before_requests, strict=True))
    wait_until(lambda: any(client.result(job_id) for job_id in before), timeout=60, what="a first record")

    assert group.replica_follows() == link.port, "the replica must still hear its master through the proxy"
    link.stall()  # from here the master's writes reach no replica
    in_stall: list[str] = []
    refused = 0
    for index in range(IN_STALL):
        request = _request(image_base_url, f"stall {index}")
        try:
            in_stall += client.submit_many([request])
            requests[in_stall[-1]] = request
        except BackendUnavailable:
            refused += 1
    link.stop()  # the link breaks, its unsent stream with it; then the master dies
    group.kill_master()  # mid-run: the worker holds some of `before`, others are queued
    killed_at = time.monotonic()

    after = [_submit_until_accepted(client, _request(image_base_url, f"after {index}"), timeout_s=30) for index in range(AFTER)]
    assert group.promoted(), "accepted after the kill, so by the promoted replica"
    for job_id, _ in after:  # the worker follows the new master and finishes everything accepted there
        assert client.wait(job_id, timeout=90).status == "succeeded"
    assert worker.proc is not None and worker.proc.poll() is None, "the worker rode the failover out"

    if accept_replicas:
        assert (in_stall, refused) == ([], IN_STALL), "a WAIT no replica can satisfy refuses the submission"
    else:
        assert len(in_stall) == IN_STALL and refused == 0, "without WAIT the master alone accepts"
    accepted_before = before + in_stall
    # Everything that survived is queued behind nothing the worker has not already finished: wait a little for stragglers.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not all(client.result(job_id) for job_id in accepted_before):
        time.sleep(0.2)
    lost = [job_id for job_id in accepted_before if client.result(job_id) is None]
    print(f"VQA_ACCEPT_REPLICAS={accept_replicas}: {len(lost)} of {len(accepted_before)} accepted before the kill lost; "
          f"first after-kill submission accepted {after[0][1] - killed_at:.1f} s after it")
    if accept_replicas:
        assert lost == [], "an accepted (replicated) job was lost"
    # Lost means gone, not stuck: nothing of it is left to make a resubmission a no-op.
    for job_id in lost:
        assert client.submit_many([requests[job_id]]) == [job_id]
    for job_id in accepted_before:
        assert client.wait(job_id, timeout=60).status == "succeeded"
