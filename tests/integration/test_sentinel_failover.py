"""A real Sentinel failover: master + replica + three sentinels (worker/dev/sentinel.py); kill the master, clients follow the promoted replica.

Sentinels run as ``redis-sentinel`` where installed, else ``redis-server --sentinel`` (the same binary).
tests/integration/test_worker_failover.py takes a ``vqa worker`` and a producer across the same failover.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from producer.connections import redis_client
from producer.errors import BackendUnavailable
from producer.replication import wait_for_replicas
from worker.dev.sentinel import SentinelGroup


@pytest.fixture()
def sentinel_group(tmp_path: Path) -> Iterator[SentinelGroup]:
    group = SentinelGroup(data_dir=tmp_path)
    try:
        yield group.start()
    finally:
        group.stop()


def test_clients_follow_the_promoted_replica(sentinel_group: SentinelGroup) -> None:
    group = sentinel_group
    assert group.replica is not None
    client = redis_client(group.url)
    client.lpush("vqa:failover-test", "before")
    assert wait_for_replicas(client, 1, 2000) == 1  # accepted = on the replica, so the failover cannot lose it

    group.kill_master()

    def promoted_and_followed() -> bool:
        try:
            client.lpush("vqa:failover-test", "after")
            return True
        except (redis.ConnectionError, redis.ReadOnlyError, redis.TimeoutError):
            return False

    group.wait(promoted_and_followed, 30, "the client never reached a promoted master")
    assert group.promoted()
    assert client.lrange("vqa:failover-test", 0, -1) == [b"after", b"before"]
    with pytest.raises(BackendUnavailable):  # the new master has no replica left
        wait_for_replicas(client, 1, 100)
