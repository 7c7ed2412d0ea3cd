"""The benchmark's private stack: redis-server, moto S3, image servers, `vqa worker` processes, and a completion listener.

Completions are observed, not polled: the Celery Redis result backend PUBLISHes every state
it stores on ``celery-task-meta-<id>``, and the runner stores a job's record there right after
writing it to S3. One pattern subscription therefore timestamps every finished job (with its
record: batch size, fetch and inference times) at no cost to the worker.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
import redis

from producer.client import VQAClient
from producer.settings import Settings
from worker.cputime import STAGES
from worker.dev.services import RedisServer, S3Server, WorkerProcess, free_port, image_server

_META_PATTERN = "celery-task-meta-*"


@dataclass
class Done:
    """One finished job as the listener saw it."""

    at: float  # time.monotonic() when the record was published
    status: str
    record: dict[str, Any]


class CompletionListener:
    """Timestamps every job record published to the result backend (SUCCESS or FAILURE)."""

    def __init__(self, url: str) -> None:
        self._client = redis.Redis.from_url(url)
        self._pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        self._pubsub.psubscribe(_META_PATTERN)
        self._lock = threading.Condition()
        self.done: dict[str, Done] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-listener", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            message = self._pubsub.get_message(timeout=0.2)
            if message is None:
                continue
            now = time.monotonic()
            meta = json.loads(message["data"])
            if meta.get("status") not in ("SUCCESS", "FAILURE"):
                continue
            result = meta.get("result")
            record = result if isinstance(result, dict) else {}
            if meta.get("status") == "FAILURE" and isinstance(result, dict):
                # JobFailed travels as {exc_type, exc_message: [message, record]}.
                args = result.get("exc_message") or []
                record = args[1] if len(args) > 1 and isinstance(args[1], dict) else {}
            with self._lock:
                self.done.setdefault(meta["task_id"], Done(at=now, status=meta["status"], record=record))
                self._lock.notify_all()

    def wait_for(self, job_ids: list[str], *, timeout: float) -> dict[str, Done]:
        """Block until every job has a record; raise TimeoutError naming how many are missing."""
        deadline = time.monotonic() + timeout
        wanted = set(job_ids)
        with self._lock:
            while True:
                missing = wanted - self.done.keys()
                if not missing:
                    return {job_id: self.done[job_id] for job_id in job_ids}
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{len(missing)} of {len(wanted)} jobs unfinished after {timeout:.0f} s")
                self._lock.wait(min(left, 1.0))

    def count(self) -> int:
        with self._lock:
            return len(self.done)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._pubsub.close()
        self._client.close()


@dataclass
class Stack:
    """Everything one benchmark run talks to. Use :func:`stack` to build and tear it down."""

    redis: RedisServer
    s3: S3Server
    image_dir: Path
    image_urls: dict[float, str]  # delay_s -> base URL of an image server adding that latency
    image_requests: dict[float, list[str]]  # delay_s -> every path that server was asked for, in order
    workdir: Path
    listener: CompletionListener
    bucket: str = "vqa-bench"
    worker: WorkerProcess | None = None
    worker_env: dict[str, str] = field(default_factory=dict)
    # The worker's /metrics: its CPU in the model, decoding and preprocessing (worker/cputime.py).
    metrics_port: int = field(default_factory=free_port)
    _workers_started: int = 0

    def env(self, *, model: str, quantization: str = "none", **overrides: str) -> dict[str, str]:
        """VQA_* settings for a worker (and client) on this stack."""
        hosts = ",".join(url.removeprefix("http://") for url in self.image_urls.values())
        base = {
            "VQA_BROKER_URL": self.redis.url,
            "VQA_RESULT_BACKEND": self.redis.url,
            "VQA_S3_ENDPOINT_URL": self.s3.url,
            "VQA_S3_BUCKET": self.bucket,
            "VQA_MODEL": model,
            "VQA_QUANTIZATION": quantization,
            "VQA_DEVICE": os.environ.get("VQA_DEVICE", "cpu"),
            "VQA_ALLOWED_HOSTS": hosts,
            "VQA_VISIBILITY_TIMEOUT": "600",
            "VQA_SHUTDOWN_GRACE_S": "60",
            "VQA_METRICS_PORT": str(self.metrics_port),
        }
        return {**base, **overrides}

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far of every process on the stack; the bench's own covers its client, listener and image servers."""
        pids = {"worker": self.worker.proc.pid if self.worker and self.worker.proc else None,
                "s3_server": self.s3.proc.pid if self.s3.proc else None,
                "redis": self.redis.proc.pid if self.redis.proc else None, "bench": os.getpid()}
        return {name: cpu_seconds(pid) for name, pid in pids.items() if pid is not None}

    def worker_stage_cpu(self) -> dict[str, float]:
        """The running worker's CPU seconds so far in each accounted stage (model, decode, preprocess), from its /metrics."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as response:
            text = response.read().decode()
        return stage_cpu_seconds(text)

    def redis_commands(self) -> Counter[str]:
        """Commands the Redis server has run so far, by name, from every client (its ``INFO commandstats``; this call not counted)."""
        client = redis.Redis.from_url(self.redis.url)
        try:
            stats = client.info("commandstats")
        finally:
            client.close()
        counts = Counter({name.removeprefix("cmdstat_"): int(entry["calls"]) for name, entry in stats.items()})
        counts["info"] -= 1
        return counts

    def s3_requests(self) -> int:
        """Requests the S3 server has answered so far (its access log: one line per request)."""
        log = self.s3.access_log
        if log is None or not log.exists():
            return 0
        return sum(1 for line in log.read_text(errors="replace").splitlines() if ' HTTP/1.1" ' in line)

    def start_worker(self, env: dict[str, str]) -> WorkerProcess:
        """A worker with exactly these settings (the running one is reused when they match)."""
        if self.worker is not None and env == self.worker_env:
            return self.worker
        self.stop_worker()
        self._workers_started += 1
        name = f"bench-w{self._workers_started}"
        self.worker = WorkerProcess(env={**env, "VQA_WORKER_NAME": name}, log_path=self.workdir / f"{name}.log").start(ready_timeout=300)
        self.worker_env = dict(env)
        return self.worker

    def stop_worker(self) -> str:
        """Stop the worker (warm shutdown) and return its log."""
        if self.worker is None:
            return ""
        self.worker.stop(timeout=120)
        log = self.worker.log
        self.worker = None
        self.worker_env = {}
        return log

    def client(self, env: dict[str, str]) -> VQAClient:
        return VQAClient(Settings(**{name.removeprefix("VQA_").lower(): value for name, value in env.items()}))

    def flush(self) -> None:
        client = redis.Redis.from_url(self.redis.url)
        client.flushall()
        client.close()


def use_bench_credentials() -> None:
    """AWS credentials for the bench's S3 server (moto takes any), where the environment has none."""
    for name, value in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        os.environ.setdefault(name, value)


@contextlib.contextmanager
def stack(image_dir: Path, *, delays: tuple[float, ...] = (0.0, 0.1)) -> Iterator[Stack]:
    """Start redis, S3 and one image server per delay; yield the :class:`Stack`; stop everything."""
    use_bench_credentials()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    workdir = Path(tempfile.mkdtemp(prefix="vqa-bench-"))
    redis_server = RedisServer().start()
    s3_server = S3Server(access_log=workdir / "s3-access.log").start()
    listener: CompletionListener | None = None
    current: Stack | None = None
    try:
        with contextlib.ExitStack() as servers:
            requests: dict[float, list[str]] = {delay: [] for delay in delays}
            urls = {delay: servers.enter_context(image_server(image_dir, delay_s=delay, requests=requests[delay])) for delay in delays}
            boto3.client("s3", endpoint_url=s3_server.url).create_bucket(Bucket="vqa-bench")
            listener = CompletionListener(redis_server.url)
            current = Stack(redis=redis_server, s3=s3_server, image_dir=image_dir, image_urls=urls, image_requests=requests,
                            workdir=workdir, listener=listener)
            yield current
    finally:
        if current is not None:
            current.stop_worker()
        if listener is not None:
            listener.close()
        s3_server.stop()
        redis_server.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)



def write_report(out: Path, name: str, result: dict[str, Any], markdown: Callable[[dict[str, Any]], str]) -> None:
    """Write ``out/name.json`` and ``out/name.md``, print the Markdown and where both went."""
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(result)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{name}.md").write_text(text)
    print(text)
    print(f"wrote {out}/{name}.json, {name}.md")


def run_meta(profile: str, command: str) -> dict[str, Any]:
    """What every benchmark's output starts with: how it was run, when, and on what."""
    return {"profile": profile, "command": command, "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs", "python": platform.python_version()}


@contextlib.contextmanager
def sample_workdir(prefix: str) -> Iterator[tuple[Path, Path]]:
    """A temporary work directory and, inside it, the sample images the image server serves."""
    from tests.support.images import write_sample_images

    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        work = Path(tmp)
        images = work / "images"
        images.mkdir()
        write_sample_images(images)
        yield work, images

def stage_cpu_seconds(metrics_text: str) -> dict[str, float]:
    """``{stage: seconds}`` from a worker's Prometheus text (``vqa_<stage>_cpu_seconds_total``, one worker's series)."""
    found: dict[str, float] = {}
    for line in metrics_text.splitlines():
        for stage in STAGES:
            if line.startswith(f"vqa_{stage}_cpu_seconds_total{{"):
                found[stage] = found.get(stage, 0.0) + float(line.rsplit(" ", 1)[1])
    missing = set(STAGES) - found.keys()
    if missing:
        raise RuntimeError(f"the worker's /metrics has no CPU counters for {', '.join(sorted(missing))}")
    return found


def rss_kib(pid: int) -> int:
    """Resident set size of a process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_counts(pid: int) -> dict[str, int]:
    """Threads and open file descriptors: a leak of either shows up next to RSS."""
    threads = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            threads = int(line.split()[1])
    return {"threads": threads, "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def gpu_memory_mib(pid: int) -> int | None:
    """GPU memory the process holds according to nvidia-smi; None without a GPU."""
    if shutil.which("nvidia-smi") is None:
        return None
    import subprocess

    out = subprocess.run(
        ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
        capture_output=True, text=True, timeout=10, check=False,
    ).stdout
    for line in out.splitlines():
        parts = [part.strip() for part in line.split(",")]
        if len(parts) == 2 and parts[0] == str(pid):
            return int(parts[1])
    return 0
