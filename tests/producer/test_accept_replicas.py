"""VQA_ACCEPT_REPLICAS against a real redis-server master, with and without a real replica."""

from __future__ import annotations

import time

import pytest
import redis

from producer.connections import redis_client
from producer.errors import BackendUnavailable
from producer.replication import wait_for_replicas
from worker.dev.services import RedisServer


def test_wait_fails_without_replicas(redis_server: RedisServer) -> None:
    client = redis_client(redis_server.url)
    with pytest.raises(BackendUnavailable, match="0 of 1 replicas"):
        wait_for_replicas(client, 1, 100)


def test_wait_succeeds_once_a_replica_follows(tmp_path) -> None:
    # A master of its own: a replica of the session's server would stay attached to it (and make
    # WAIT succeed for the other tests) if it outlived this test.
    (tmp_path / "master").mkdir(); (tmp_path / "replica").mkdir()
    master = RedisServer(data_dir=tmp_path / "master").start()
    replica = RedisServer(data_dir=tmp_path / "replica", extra_args=("--replicaof", "127.0.0.1", str(master.port))).start()
    try:
        client = redis_client(master.url)
        deadline = time.monotonic() + 20
        while redis.Redis(port=replica.port).info("replication").get("master_link_status") != "up":
            assert time.monotonic() < deadline, "replica never synced"
            time.sleep(0.1)
        client.lpush("vqa:test-accept", "x")
        assert wait_for_replicas(client, 1, 2000) == 1
        assert redis.Redis(port=replica.port).llen("vqa:test-accept") >= 1
    finally:
        replica.stop(kill=True)  # a replica's SIGTERM shutdown can outwait the 20 s stop timeout under load
        master.stop(kill=True)


def test_client_submission_is_not_accepted_without_its_replicas(redis_server: RedisServer) -> None:
    from producer.client import VQAClient
    from producer.settings import Settings

    settings = Settings(broker_url=redis_server.url, result_backend=redis_server.url, queue="vqa-accept-test",
                        accept_replicas=1, accept_replicas_timeout_ms=100)
    with VQAClient(settings) as client:
        job = client.build_job("https://example.com/cat.jpg", "what is this?")
        with pytest.raises(BackendUnavailable, match="replicas acknowledged"):
            client.submit_jobs([job])
        # Published but not confirmed: not marked queued, so a retry publishes (and WAITs) again, not a no-op.
        with pytest.raises(BackendUnavailable, match="replicas acknowledged"):
            client.submit_jobs([job])
