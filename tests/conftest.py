"""Fixtures that start real services: redis-server, an S3 API server over HTTP, an image server, worker processes.

Each is a factory or a session resource that cleans up after itself. Per test, Redis is
flushed and a fresh bucket is used, so tests never see each other's jobs.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import boto3
import pytest
import redis

from producer.client import VQAClient
from producer.settings import Settings
from worker.dev.services import RedisServer, S3Server, WorkerProcess, image_server
from tests.support.images import write_sample_images

# Credentials for the local S3 API server; the code reads them the standard AWS way.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.cleanup()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    server = S3Server().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from worker.dev.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", size="tiny", seed=0)


@pytest.fixture(scope="session")
def sample_images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_sample_images(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="session")
def image_base_url(sample_images: dict[str, Path]) -> Iterator[str]:
    directory = next(iter(sample_images.values())).parent
    with image_server(directory) as url:
        yield url


@pytest.fixture()
def redis_url(redis_server: RedisServer) -> str:
    if redis_server.proc is None or redis_server.proc.poll() is not None:
        redis_server.start()  # a fault-injection test may have left it down
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture()
def bucket(s3_server: S3Server) -> str:
    name = f"vqa-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server.url).create_bucket(Bucket=name)
    return name


@pytest.fixture()
def stack_env(redis_url: str, s3_server: S3Server, bucket: str, tiny_model_dir: Path, image_base_url: str) -> dict[str, str]:
    """VQA_* variables for a worker and a client on this test's Redis, bucket and tiny model."""
    image_host = image_base_url.removeprefix("http://")
    return {
        "VQA_BROKER_URL": redis_url,
        "VQA_RESULT_BACKEND": redis_url,
        "VQA_S3_ENDPOINT_URL": s3_server.url,
        "VQA_S3_BUCKET": bucket,
        "VQA_MODEL": str(tiny_model_dir),
        "VQA_QUANTIZATION": "none",
        "VQA_DEVICE": "cpu",
        "VQA_MAX_BATCH_SIZE": "4",
        "VQA_MAX_BATCH_DELAY_MS": "300",
        "VQA_MAX_NEW_TOKENS": "8",
        "VQA_ALLOWED_HOSTS": image_host,
        "VQA_VISIBILITY_TIMEOUT": "60",
        "VQA_SHUTDOWN_GRACE_S": "30",
    }


@pytest.fixture()
def settings_for(monkeypatch: pytest.MonkeyPatch) -> Callable[[dict[str, str]], Settings]:
    def build(env: dict[str, str]) -> Settings:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        return Settings()

    return build


@pytest.fixture()
def client_for(settings_for: Callable[[dict[str, str]], Settings]) -> Iterator[Callable[[dict[str, str]], VQAClient]]:
    clients: list[VQAClient] = []

    def build(env: dict[str, str]) -> VQAClient:
        client = VQAClient(settings_for(env))
        clients.append(client)
        return client

    yield build
    for client in clients:
        client.close()


@pytest.fixture()
def start_worker(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Factory: start ``vqa worker`` processes with the given env; all are stopped at teardown."""
    workers: list[WorkerProcess] = []

    def start(env: dict[str, str], *, name: str | None = None) -> WorkerProcess:
        name = name or f"w{len(workers)}"
        proc = WorkerProcess(env={**env, "VQA_WORKER_NAME": name}, log_path=tmp_path / f"{name}.log")
        workers.append(proc)
        return proc.start()

    yield start
    # Stopped side by side: each takes a second or two to exit.
    stopping = [threading.Thread(target=proc.stop, kwargs={"timeout": 30}) for proc in workers]
    for thread in stopping:
        thread.start()
    for thread in stopping:
        thread.join()
