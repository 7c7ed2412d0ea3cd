"""A real Sentinel failover: master + replica + three sentinels; kill the master, clients follow the promoted replica.

Sentinels run as ``redis-sentinel`` where installed, else ``redis-server --sentinel`` (the same binary).
The worker's follow-through (a ``vqa worker`` across the failover) is not covered here yet.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from producer.connections import redis_client
from producer.errors import BackendUnavailable
from producer.replication import wait_for_replicas
from worker.dev.services import RedisServer, free_port, wait_for_port

MASTER = "vqa-master"


def _sentinel(tmp: Path, master_port: int) -> subprocess.Popen[bytes]:
    port = free_port()
    conf = tmp / f"sentinel-{port}.conf"  # sentinels rewrite their config: a file of their own
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {tmp}\n"
        f"sentinel monitor {MASTER} 127.0.0.1 {master_port} 2\n"
        f"sentinel down-after-milliseconds {MASTER} 500\nsentinel failover-timeout {MASTER} 3000\n"
    )
    binary = shutil.which("redis-sentinel")
    command = [binary, str(conf)] if binary else [shutil.which("redis-server") or "redis-server", str(conf), "--sentinel"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(port, proc=proc)
    proc.port = port  # type: ignore[attr-defined]
    return proc


@pytest.fixture()
def sentinel_group(tmp_path: Path) -> Iterator[tuple[RedisServer, RedisServer, list[int]]]:
    for name in ("master", "replica"):
        (tmp_path / name).mkdir()
    master = RedisServer(data_dir=tmp_path / "master").start()
    replica = RedisServer(data_dir=tmp_path / "replica", extra_args=("--replicaof", "127.0.0.1", str(master.port))).start()
    sentinels = [_sentinel(tmp_path, master.port) for _ in range(3)]
    try:
        yield master, replica, [s.port for s in sentinels]  # type: ignore[attr-defined]
    finally:
        for proc in sentinels:
            proc.terminate()
            proc.wait(timeout=10)
        replica.stop()
        master.stop(kill=True)


def _until(condition, timeout_s: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_clients_follow_the_promoted_replica(sentinel_group: tuple[RedisServer, RedisServer, list[int]]) -> None:
    master, replica, ports = sentinel_group
    url = "redis+sentinel://" + ",".join(f"127.0.0.1:{port}" for port in ports) + f"/{MASTER}/0"
    _until(lambda: redis.Redis(port=replica.port).info("replication").get("master_link_status") == "up", 20, "replica never synced")
    client = redis_client(url)
    client.lpush("vqa:failover-test", "before")
    assert wait_for_replicas(client, 1, 2000) == 1  # accepted = on the replica, so the failover cannot lose it

    master.stop(kill=True)  # SIGKILL: no handover, the sentinels must notice and promote

    def promoted_and_followed() -> bool:
        try:
            client.lpush("vqa:failover-test", "after")
            return True
        except (redis.ConnectionError, redis.ReadOnlyError, redis.TimeoutError):
            return False

    _until(promoted_and_followed, 30, "the client never reached a promoted master")
    assert redis.Redis(port=replica.port).info("replication")["role"] == "master"
    assert client.lrange("vqa:failover-test", 0, -1) == [b"after", b"before"]
    with pytest.raises(BackendUnavailable):  # the new master has no replica left
        wait_for_replicas(client, 1, 100)
