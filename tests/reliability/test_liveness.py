"""Recovery by liveness (worker/broker.py, worker/heartbeat.py): slowness never causes a second run; a cut-off worker's jobs run elsewhere.

* A worker paused (SIGSTOP) for longer than the old visibility timeout, then resumed: under the
  shared-set rule its messages went to the other worker and ran twice; with heartbeats it keeps
  them (the pause is shorter than the heartbeat timeout) and every job runs once.
* A worker cut off from Redis by a partition (a TCP proxy that stops forwarding) for longer than
  the heartbeat timeout: the other worker restores and runs its jobs; when the network heals,
  its late acks are refused, and no record is lost or stored twice.
"""

from __future__ import annotations

import json
import re
import signal
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis

from producer.client import VQAClient
from tests.reliability.helpers import SLOW_GENERATION, VISIBILITY_TIMEOUT_S, submit, wait_until
from tests.reliability.history import History
from tests.support.tcp_proxy import PartitionProxy
from worker.broker import held_messages
from worker.dev.services import WorkerProcess

pytestmark = pytest.mark.slow

JOBS = 24


def held_by(broker: redis.Redis, worker: str, queue: str = "vqa") -> int:
    """How many messages the worker named ``worker`` holds in its own unacked hash."""
    from producer import keys

    ids = [c.decode() for c in broker.zrange(keys.heartbeats_key(queue), 0, -1) if c.decode().startswith(f"{worker}~")]
    return sum(broker.hlen(keys.worker_unacked_key(queue, consumer_id)) for consumer_id in ids)


def test_a_worker_paused_past_the_old_visibility_timeout_runs_no_job_twice(
    rel_env: dict[str, str],
    image_base_url: str,
    client_for: Callable[[dict[str, str]], VQAClient],
    start_worker: Callable[..., WorkerProcess],
    history_for: Callable[[dict[str, str]], History],
    figures: Callable[..., dict[str, Any]],
) -> None:
    client = client_for(rel_env)
    history = history_for(rel_env)
    paused = start_worker(rel_env, name="paused")
    other = start_worker(rel_env, name="other")  # alive throughout: it runs the restore step every second
    ids = submit(client, image_base_url, 2 * JOBS, tag="pause", generation=SLOW_GENERATION)
    wait_until(lambda: held_by(history.broker, "paused") > 0, timeout=60, poll_s=0.005, what="the first worker holding jobs")
    paused.signal(signal.SIGSTOP)
    pause_s = VISIBILITY_TIMEOUT_S + 3  # past the old rule's timeout, short of the heartbeat timeout (default 15 s)
    held = held_by(history.broker, "paused")
    time.sleep(pause_s)
    still_held = held_by(history.broker, "paused")
    paused.signal(signal.SIGCONT)
    history.wait(ids, timeout=120)
    audit = history.audit(ids)
    figures("10. SIGSTOP past the old visibility timeout", **audit.summary(), pause_s=pause_s, held_when_paused=held)
    assert held > 0 and still_held == held, "the paused worker kept its messages"
    assert audit.lost == [] and audit.failed == {} and audit.duplicate_records == 0
    assert audit.duplicate_executions == 0
    assert "presumed dead" not in paused.log and "presumed dead" not in other.log


def test_a_partitioned_workers_jobs_run_elsewhere_and_its_late_acks_are_refused(
    rel_env: dict[str, str],
    image_base_url: str,
    client_for: Callable[[dict[str, str]], VQAClient],
    start_worker: Callable[..., WorkerProcess],
    history_for: Callable[[dict[str, str]], History],
    figures: Callable[..., dict[str, Any]],
) -> None:
    # Short heartbeats keep the test lean; the partition outlasts the timeout several times over.
    env = {**rel_env, "VQA_HEARTBEAT_INTERVAL_S": "0.5", "VQA_HEARTBEAT_TIMEOUT_S": "3"}
    redis_url = urlsplit(env["VQA_BROKER_URL"])
    proxy = PartitionProxy(redis_url.port or 6379).start()
    try:
        cut_off_env = {**env, "VQA_BROKER_URL": redis_url._replace(netloc=f"127.0.0.1:{proxy.port}").geturl()}
        client = client_for(env)
        history = history_for(env)
        cut_off = start_worker(cut_off_env, name="cutoff")
        ids = submit(client, image_base_url, JOBS, tag="partition", generation=SLOW_GENERATION)
        wait_until(lambda: held_by(history.broker, "cutoff") > 0, timeout=60, what="the worker behind the proxy holding jobs")
        proxy.stall()
        partitioned_at = time.time()
        held = [json.loads(raw)["headers"]["id"] for raw in held_messages(history.broker, "vqa")]
        start_worker(env, name="other")
        history.wait(ids, timeout=120)
        finished_s = time.time() - partitioned_at
        proxy.resume()
        # Healed: the cut-off worker's acks reach Redis and are refused; its next heartbeat learns why.
        late = re.compile(r"(?:ack|requeue) of message \S+ refused")
        wait_until(lambda: late.search(cut_off.log) and "presumed dead" in cut_off.log, timeout=60, poll_s=0.2, what="late acks refused")
        refused = len(late.findall(cut_off.log))
        audit = history.audit(ids)
    finally:
        proxy.stop()
    figures("11. network partition of one worker", **audit.summary(), held_when_cut_off=len(held),
            finished_s=round(finished_s, 1), refused_settles=refused)
    assert held and refused > 0
    assert audit.lost == [] and audit.failed == {} and audit.duplicate_records == 0
