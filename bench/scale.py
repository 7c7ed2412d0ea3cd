"""The queue at scale, by simulation: one Redis, 8 to 64 worker processes. It MEASURES THE QUEUE, NOT A MODEL.

``python -m bench.scale [--workers 8,16,32,64]`` (under the CPU lock). Each worker process
runs the real worker (worker/main.py ``run_worker``: consumer, broker, ledger, counters,
cancels, storage, runner, hooks) with two bench-only stand-ins, so that only the queue's own
cost is left to measure:

* :class:`QueueOnlyEngine`, an Engine (worker/engine.py) that sleeps a fixed time per batch
  (``--batch-ms``) instead of running a model;
* :class:`MemoryS3`, an in-process S3 client: records go nowhere but the process's memory, and
  every image is the same tiny PNG. The result backend (Redis) is real: it is part of the
  queue's cost.

Per number of workers it reports: Redis CPU and commands per second per idle worker (the
polling, the restore scan and, once workers keep heartbeats, those), with the breakdown by
Redis command; jobs/s and Redis CPU per job while a burst drains; and the recovery after a
worker holding messages is SIGKILLed. A producer-only phase first gives the enqueue's share.
Output: JSON (``--out``) and a table on stdout. docs/operations.md turns the figures into how
many GPU workers one Redis serves.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil
import redis
from botocore.exceptions import ClientError
from PIL import Image

from bench.stack import CompletionListener
from producer import keys
from producer.client import VQAClient
from producer.schema import GenerationSettings
from producer.settings import Settings
from worker.dev.services import RedisServer
from worker.engine import Answer

IMAGE_BUCKET = "images"
IMAGE_URL = f"s3://{IMAGE_BUCKET}/one.png"
QUEUE = "vqa-scale"


# --------------------------------------------------------------------------- bench-only stand-ins (child side)


class QueueOnlyEngine:
    """A stand-in Engine: a fixed sleep per batch and a fixed answer. Measures the queue, not a model."""

    name = "queue-only-stand-in"
    quantization = "none"

    def __init__(self, *, batch_s: float) -> None:
        self.batch_s = batch_s

    def prepare(self, image: Any, question: str, *, image_grid: str | None = None) -> Any:
        return len(question)

    def cost(self, inputs: Any) -> int:
        return 64

    def generate_batch(self, inputs: Sequence[Any], generation: GenerationSettings) -> list[Answer]:
        time.sleep(self.batch_s)
        return [Answer(text="stand-in", prompt_tokens=64, image_tokens=0, generated_tokens=1) for _ in inputs]


class MemoryS3:
    """An in-process S3 client with the calls the worker makes: get, conditional put, delete. Bench only."""

    def __init__(self) -> None:
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8), (10, 120, 200)).save(buffer, format="PNG")
        self._objects: dict[tuple[str, str], bytes] = {(IMAGE_BUCKET, "one.png"): buffer.getvalue()}
        self._lock = threading.Lock()

    def get_object(self, *, Bucket: str, Key: str) -> dict[str, Any]:  # noqa: N803 - boto3's names
        with self._lock:
            data = self._objects.get((Bucket, Key))
        if data is None:
            raise ClientError({"Error": {"Code": "NoSuchKey", "Message": "missing"}, "ResponseMetadata": {"HTTPStatusCode": 404}}, "GetObject")
        return {"Body": io.BytesIO(data), "ContentLength": len(data)}

    def put_object(self, *, Bucket: str, Key: str, Body: bytes, IfNoneMatch: str | None = None, **_: Any) -> dict[str, Any]:  # noqa: N803
        with self._lock:
            if IfNoneMatch == "*" and (Bucket, Key) in self._objects:
                raise ClientError({"Error": {"Code": "PreconditionFailed"}, "ResponseMetadata": {"HTTPStatusCode": 412}}, "PutObject")
            self._objects[(Bucket, Key)] = bytes(Body)
        return {}

    def delete_object(self, *, Bucket: str, Key: str) -> dict[str, Any]:  # noqa: N803
        with self._lock:
            self._objects.pop((Bucket, Key), None)
        return {}


def _child() -> None:
    from producer.logs import configure_logging
    from worker.main import default_worker_name, run_worker

    settings = Settings()
    configure_logging(settings, worker=default_worker_name(settings))
    run_worker(settings, engine=QueueOnlyEngine(batch_s=float(os.environ["BENCH_BATCH_S"])), s3_client=MemoryS3())


# --------------------------------------------------------------------------- the run (parent side)


def _redis_cpu(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def _commands(client: redis.Redis) -> dict[str, tuple[int, int]]:
    return {name.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"])) for name, v in client.info("commandstats").items()}


class _Window:
    """Redis CPU, commands and the workers' CPU over a stretch of time."""

    def __init__(self, client: redis.Redis, pids: list[int]) -> None:
        self.client, self.pids = client, pids
        self.t0, self.cpu0, self.cmd0, self.workers0 = time.monotonic(), _redis_cpu(client), _commands(client), self._workers_cpu()

    def _workers_cpu(self) -> float:
        total = 0.0
        for pid in self.pids:
            try:
                times = psutil.Process(pid).cpu_times()
                total += times.user + times.system
            except psutil.Error:
                pass
        return total

    def close(self) -> dict[str, Any]:
        seconds = time.monotonic() - self.t0
        after = _commands(self.client)
        per_command = {}
        for name, (calls, usec) in after.items():
            calls0, usec0 = self.cmd0.get(name, (0, 0))
            if calls > calls0:
                per_command[name] = {"calls": calls - calls0, "usec": usec - usec0}
        return {
            "seconds": round(seconds, 3),
            "redis_cpu_s": round(_redis_cpu(self.client) - self.cpu0, 4),
            "workers_cpu_s": round(self._workers_cpu() - self.workers0, 3),
            "commands": dict(sorted(per_command.items(), key=lambda item: -item[1]["usec"])),
        }


def _jobs(client: VQAClient, count: int, tag: str) -> list[Any]:
    return [client.build_job(IMAGE_URL, f"{tag} question {n}?", idempotency_key=f"{tag}-{n}") for n in range(count)]


def _settings(redis_url: str, **extra: str) -> dict[str, str]:
    return {"VQA_BROKER_URL": redis_url, "VQA_RESULT_BACKEND": redis_url, "VQA_QUEUE": QUEUE, "VQA_S3_BUCKET": "records", **extra}


def run(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="vqa-scale-"))
    server = RedisServer().start()
    admin = redis.Redis.from_url(server.url)
    env_base = _settings(server.url, VQA_IMAGE_S3_BUCKETS=IMAGE_BUCKET, VQA_MAX_BATCH_SIZE=str(args.batch),
                         VQA_MAX_BATCH_DELAY_MS=str(args.delay_ms), VQA_VISIBILITY_TIMEOUT=str(args.visibility_timeout),
                         VQA_HEARTBEAT_TIMEOUT_S=str(args.heartbeat_timeout),
                         VQA_SHUTDOWN_GRACE_S="10", VQA_LOG_LEVEL="WARNING", VQA_FETCH_CONCURRENCY="4")
    producer = VQAClient(Settings(**{k.removeprefix("VQA_").lower(): v for k, v in env_base.items()}))
    result: dict[str, Any] = {
        "what": "the queue's own cost: real worker code, a stand-in engine sleeping a fixed time per batch, no model",
        "host": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                 "redis": admin.info("server")["redis_version"]},
        "settings": {"batch": args.batch, "batch_ms": args.batch_ms, "delay_ms": args.delay_ms, "jobs_per_worker": args.jobs_per_worker,
                     "idle_s": args.idle_s, "visibility_timeout_s": args.visibility_timeout, "heartbeat_timeout_s": args.heartbeat_timeout, "appendfsync": "always"},
        "runs": [],
    }
    try:
        # The producer's share alone: enqueue with no worker listening.
        jobs = _jobs(producer, args.enqueue_jobs, "enqueue")
        window = _Window(admin, [])
        producer.submit_jobs(jobs)
        enqueue = window.close()
        result["enqueue"] = {"jobs": len(jobs), **enqueue, "redis_cpu_us_per_job": round(enqueue["redis_cpu_s"] / len(jobs) * 1e6, 1)}
        _say(f"enqueue: {len(jobs)} jobs, Redis {result['enqueue']['redis_cpu_us_per_job']} us CPU per job")
        for workers in args.workers:
            admin.flushall()
            result["runs"].append(_one_size(admin, producer, env_base, workers, args, workdir))
    finally:
        producer.close()
        admin.close()
        server.cleanup()
    return result


def _one_size(admin: redis.Redis, producer: VQAClient, env_base: dict[str, str], workers: int, args: argparse.Namespace,
              workdir: Path) -> dict[str, Any]:
    procs = _start_workers(env_base, workers, args, workdir)
    pids = [proc.pid for proc in procs]
    try:
        time.sleep(2.0)  # past start-up's own Redis traffic
        window = _Window(admin, pids)
        time.sleep(args.idle_s)
        idle = window.close()
        idle_cpu_rate = idle["redis_cpu_s"] / idle["seconds"]
        per_worker = {
            "redis_cpu_ms_per_s": round(idle_cpu_rate / workers * 1000, 4),
            "redis_commands_per_s": round(sum(c["calls"] for c in idle["commands"].values()) / idle["seconds"] / workers, 2),
            "worker_cpu_ms_per_s": round(idle["workers_cpu_s"] / idle["seconds"] / workers * 1000, 2),
        }
        listener = CompletionListener(env_base["VQA_BROKER_URL"])
        try:
            jobs = _jobs(producer, workers * args.jobs_per_worker, f"drain{workers}")
            window = _Window(admin, pids)
            started = time.monotonic()
            producer.submit_jobs(jobs)
            done = listener.wait_for([job.job_id for job in jobs], timeout=600)
            drain = window.close()
            _all_succeeded(done)
            last = max(item.at for item in done.values())
            jobs_per_s = len(jobs) / (last - started)
            net_cpu = drain["redis_cpu_s"] - idle_cpu_rate * drain["seconds"]
            burst = {
                "jobs": len(jobs), "jobs_per_s": round(jobs_per_s, 1),
                "stand_in_ceiling_jobs_per_s": round(workers * args.batch / (args.batch_ms / 1000), 1),
                "redis_cpu_us_per_job": round(drain["redis_cpu_s"] / len(jobs) * 1e6, 1),
                "redis_cpu_us_per_job_net_of_idle": round(net_cpu / len(jobs) * 1e6, 1),
                "redis_commands_per_job": round(sum(c["calls"] for c in drain["commands"].values()) / len(jobs), 1),
                "workers_cpu_ms_per_job": round(drain["workers_cpu_s"] / len(jobs) * 1000, 2),
                "redis_busy_fraction": round(drain["redis_cpu_s"] / drain["seconds"], 3),
                "window": drain,
            }
            recovery = _kill_one(admin, producer, listener, procs, workers, args)
        finally:
            listener.close()
    finally:
        _stop(procs)
    run = {"workers": workers, "idle": {"per_worker": per_worker, "window": idle}, "burst": burst, "recovery": recovery}
    _say(f"{workers:3d} workers: idle {per_worker['redis_commands_per_s']} cmd/s and {per_worker['redis_cpu_ms_per_s']} ms Redis CPU/s "
         f"per worker; burst {burst['jobs_per_s']} jobs/s, {burst['redis_cpu_us_per_job']} us Redis CPU/job, "
         f"Redis busy {burst['redis_busy_fraction']:.0%}; SIGKILL recovered in {recovery['recovered_after_kill_s']} s")
    return run


def _kill_one(admin: redis.Redis, producer: VQAClient, listener: CompletionListener, procs: list[subprocess.Popen[bytes]],
              workers: int, args: argparse.Namespace) -> dict[str, Any]:
    """SIGKILL a worker that holds messages; how long until the last of its jobs is done by the others.

    The others are paused (SIGSTOP) while the victim takes its prefetch off the queue, so the
    victim is sure to die holding messages; they resume right after the kill.
    """
    victim, others = procs[0], procs[1:]
    for proc in others:
        proc.send_signal(signal.SIGSTOP)
    jobs = _jobs(producer, max(workers, 2) * args.batch * 2, f"kill{workers}")
    window = _Window(admin, [proc.pid for proc in others])
    producer.submit_jobs(jobs)
    lane = keys.priority_queue_key(QUEUE, keys.DEFAULT_PRIORITY)  # where submit_jobs queues them
    deadline = time.monotonic() + 10
    while admin.llen(lane) > len(jobs) - args.batch and time.monotonic() < deadline:
        time.sleep(0.01)  # the victim takes up to its prefetch
    taken = len(jobs) - admin.llen(lane)
    victim.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    for proc in others:
        proc.send_signal(signal.SIGCONT)
    done = listener.wait_for([job.job_id for job in jobs], timeout=args.heartbeat_timeout + 120)
    stats = window.close()
    _all_succeeded(done)
    return {
        "jobs": len(jobs),
        "held_by_the_killed_worker": taken,
        "recovered_after_kill_s": round(max(item.at for item in done.values()) - killed_at, 2),
        "redis_cpu_s": stats["redis_cpu_s"],
        "window": stats,
    }


def _all_succeeded(done: dict[str, Any]) -> None:
    """A figure over failed jobs would measure the wrong path: every job must have gone through the stand-in engine."""
    failed = [item.record.get("error") for item in done.values() if item.status != "SUCCESS"]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(done)} jobs failed, e.g. {failed[0]}")


def _start_workers(env_base: dict[str, str], count: int, args: argparse.Namespace, workdir: Path) -> list[subprocess.Popen[bytes]]:
    procs = []
    for n in range(count):
        env = {**os.environ, **env_base, "VQA_WORKER_NAME": f"scale-{n}", "BENCH_BATCH_S": str(args.batch_ms / 1000),
               "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        log = open(workdir / f"w{count}-{n}.log", "wb")  # noqa: SIM115 - the child holds it
        procs.append(subprocess.Popen([sys.executable, "-m", "bench.scale", "--child"], env=env, stdout=log, stderr=subprocess.STDOUT))
        log.close()
    deadline = time.monotonic() + 60 + 3 * count
    for n, proc in enumerate(procs):
        path = workdir / f"w{count}-{n}.log"
        while "ready" not in path.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker {n} did not start:\n{path.read_text(errors='replace')[-3000:]}")
            time.sleep(0.2)
    return procs


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _say(text: str) -> None:
    print(text, flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.splitlines()[0])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workers", default="8,16,32,64", help="worker counts to run, comma-separated")
    parser.add_argument("--batch", type=int, default=8, help="VQA_MAX_BATCH_SIZE")
    parser.add_argument("--batch-ms", type=float, default=50.0, help="the stand-in engine's fixed time per batch")
    parser.add_argument("--delay-ms", type=int, default=20, help="VQA_MAX_BATCH_DELAY_MS")
    parser.add_argument("--jobs-per-worker", type=int, default=40)
    parser.add_argument("--enqueue-jobs", type=int, default=2000)
    parser.add_argument("--idle-s", type=float, default=10.0)
    parser.add_argument("--visibility-timeout", type=int, default=10, help="VQA_VISIBILITY_TIMEOUT (only for messages in the old shared unacked set)")
    parser.add_argument("--heartbeat-timeout", type=int, default=15, help="VQA_HEARTBEAT_TIMEOUT_S: a dead worker's messages come back after this")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/scale/results.json"))
    args = parser.parse_args(argv)
    if args.child:
        _child()
        return
    args.workers = [int(part) for part in args.workers.split(",")]
    _say("bench.scale: measures the queue (Redis, consumer, broker, storage), NOT a model: the engine is a stand-in")
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    _say(f"wrote {args.out}")


if __name__ == "__main__":
    main()
