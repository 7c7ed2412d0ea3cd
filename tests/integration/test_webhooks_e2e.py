"""`vqa worker` and `vqa webhooks` as real processes: every completion reaches its receiver, signed, exactly as it should."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from producer.client import VQAClient
from worker.dev.services import WorkerProcess
from tests.integration.receiver import Receiver, payload_job, webhook_receiver

pytestmark = pytest.mark.slow

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
OLD_SECRET = "whsec_" + "b2xkLXNlY3JldC1vbGQtc2VjcmV0LTEyMzQ1Njc4"


@pytest.fixture()
def receiver() -> Iterator[Receiver]:
    with webhook_receiver(SECRET) as running:
        yield running


def _vqa(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "producer.cli", *args], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=60, check=True)


def _until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_webhooks_deliver_signed_with_retries_gone_and_dead_letters(
    stack_env: dict[str, str], receiver: Receiver, start_worker: Callable[..., WorkerProcess],
    client_for: Callable[[dict[str, str]], VQAClient], image_base_url: str, tmp_path: Path,
) -> None:
    host = receiver.url.removeprefix("http://")
    env = {**stack_env, "VQA_ALLOWED_HOSTS": f"{stack_env['VQA_ALLOWED_HOSTS']},{host}",
           "VQA_WEBHOOK_SECRETS": f"{OLD_SECRET},{SECRET}", "VQA_WEBHOOK_RETRY_SCHEDULE": "0.3,0.3",
           "VQA_WEBHOOK_TIMEOUT_S": "3"}
    receiver.answers = {"/flaky": [503, 500], "/gone": [410], "/down": [500, 500, 500]}
    start_worker(env)
    log = open(tmp_path / "webhooks.log", "wb")  # noqa: SIM115 - closed below
    dispatcher = subprocess.Popen([sys.executable, "-m", "producer.cli", "webhooks"], env={**os.environ, **env},
                                  stdout=log, stderr=subprocess.STDOUT)
    try:
        client = client_for(env)
        image = f"{image_base_url}/wide.jpg"
        jobs = {
            "ok1": client.submit(image, "one?", webhook_url=f"{receiver.url}/ok"),
            "ok2": client.submit(image, "two?", webhook_url=f"{receiver.url}/ok"),
            "flaky": client.submit(image, "three?", webhook_url=f"{receiver.url}/flaky"),
            "gone": client.submit(image, "four?", webhook_url=f"{receiver.url}/gone"),
            "down": client.submit(image, "five?", webhook_url=f"{receiver.url}/down"),
            "none": client.submit(image, "six?"),
            "private": client.submit(image, "seven?", webhook_url="http://10.1.2.3:9/hook"),
        }
        for job in jobs.values():
            client.wait(job, timeout=120)
        _until(lambda: len(receiver.deliveries("/ok")) == 2 and len(receiver.deliveries("/flaky")) == 1, 30, "deliveries")
        dead_cmd = lambda: [json.loads(line) for line in _vqa(env, "webhooks", "dead").stdout.splitlines()]  # noqa: E731
        _until(lambda: len(dead_cmd()) == 3, 30, "three dead letters")
        time.sleep(1.0)  # anything extra (a second delivery, a fourth try) would land by now

        assert sorted(payload_job(call) for call in receiver.deliveries("/ok")) == sorted([jobs["ok1"], jobs["ok2"]])
        flaky = receiver.deliveries("/flaky", ok_only=False)
        assert [call["status"] for call in flaky] == [503, 500, 200]  # retried through the outage
        assert len({call["webhook_id"] for call in flaky}) == 1  # the same webhook-id on every try
        assert len(flaky[0]["signatures"]) == 2  # both secrets sign (rotation)
        assert [call["status"] for call in receiver.deliveries("/gone", ok_only=False)] == [410]  # no try after 410
        assert len(receiver.deliveries("/down", ok_only=False)) == 3  # first try + the two of the schedule
        ok_payload = receiver.deliveries("/ok")[0]["payload"]
        assert ok_payload["type"] == "job.succeeded" and ok_payload["data"]["s3_key"].startswith("results/")

        reasons = {entry["url"]: entry["reason"] for entry in dead_cmd()}
        assert reasons == {f"{receiver.url}/gone": "gone", f"{receiver.url}/down": "exhausted", "http://10.1.2.3:9/hook": "refused"}

        # Replay the one that ran out of tries, now that its receiver answers.
        down = [entry["id"] for entry in dead_cmd() if entry["reason"] == "exhausted"]
        assert _vqa(env, "webhooks", "retry", *down).stdout.strip() == "1"
        _until(lambda: len(receiver.deliveries("/down")) == 1, 30, "the replayed delivery")
        assert len(dead_cmd()) == 2

        # One event per job in the stream, each acked by the dispatchers' group.
        events = _vqa(env, "events", "tail", "--group", "audit", "--count", str(len(jobs))).stdout.splitlines()
        assert sorted(json.loads(line)["job_id"] for line in events) == sorted(jobs.values())
        stream = redis.Redis.from_url(env["VQA_BROKER_URL"])
        assert stream.xlen("vqa:events") == len(jobs)
        assert stream.xpending("vqa:events", "vqa-webhooks")["pending"] == 0
    finally:
        dispatcher.terminate()
        dispatcher.wait(timeout=30)
        log.close()
