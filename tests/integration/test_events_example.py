"""examples/events_consumer.py runs as documented: it reads in a group, acks, and claims a dead consumer's entries."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import redis

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "events_consumer.py"


def test_example_claims_a_dead_consumers_entries_and_acks(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    for job_id in ("a", "b", "a"):  # "a" twice: at-least-once, the example dedupes
        client.xadd("vqa:events", {"job_id": job_id, "status": "succeeded"})
    client.xgroup_create("vqa:events", "billing", id="0")
    # A consumer that reads two entries and dies without acking them.
    client.xreadgroup("billing", "dead-one", {"vqa:events": ">"}, count=2)
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), "--redis", redis_url, "--group", "billing", "--consumer", "c1", "--stale-ms", "0", "--max", "2"],
        capture_output=True, text=True, timeout=60, check=True,
    )
    assert sorted(json.loads(line)["job_id"] for line in done.stdout.splitlines()) == ["a", "b"]
    assert client.xpending("vqa:events", "billing")["pending"] == 0
