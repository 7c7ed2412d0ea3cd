"""The four bulk-run measurements of ``python -m bench.bulk``; each returns its figures as a dict.

    memory    a manifest with no worker: publishing stops at the window, producer RSS and Redis
              used_memory stay flat; then the window off, for Redis' cost per queued job
    publish   jobs/s of a bulk run vs. a plain send_task loop, in the same run
    collect   N finished outcomes (the real worker hook, no model) into a results file: outcomes/s
              and S3 requests per job, on the workers' side and on the collector's
    kill      a run on the tiny model with ``vqa bulk submit`` SIGKILLed K times: lost, computed
              twice, results complete
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from bench.stack import Stack, rss_kib
from producer import keys
from producer.bulk.results import read_results
from producer.client import VQAClient
from producer.settings import Settings
from worker.bulkruns import BulkRuns
from worker.dev.outcomes import finish, take_jobs

# Bulk runs publish in the low lane by default (producer/bulk/submit.py BulkOptions.priority).
BULK_LANE = keys.priority_queue_key("vqa", keys.PRIORITIES["low"])

QUESTION = "What is shown?"


def write_manifest(path: Path, lines: int, *, base_url: str = "https://images.example", images: list[str] | None = None) -> Path:
    with path.open("w") as out:
        for i in range(lines):
            name = images[i % len(images)] if images else f"{i}.jpg"
            out.write(json.dumps({"custom_id": f"img-{i:07d}", "image_url": f"{base_url}/{name}"}) + "\n")
    return path


def _mb(value: float) -> float:
    return round(value / 1e6, 1)


def _used_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def _submit(env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "producer.cli", "bulk", "submit", *args], env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)


def _sample(proc: subprocess.Popen[bytes], client: redis.Redis, *, until: Callable[[], bool], every_s: float = 0.5) -> list[dict[str, Any]]:
    samples: list[dict[str, Any]] = []
    start = time.monotonic()
    while proc.poll() is None and not until():
        try:
            rss = rss_kib(proc.pid) * 1024
        except (OSError, RuntimeError):
            break
        samples.append({"t_s": round(time.monotonic() - start, 1), "rss_mb": _mb(rss), "redis_used_mb": _mb(_used_memory(client)),
                        "queued": client.llen(BULK_LANE)})
        time.sleep(every_s)
    return samples


def memory(stack: Stack, work: Path, *, lines: int, window: int, hold_s: float) -> dict[str, Any]:
    env = stack.env(model="unused")
    manifest = write_manifest(work / "memory.jsonl", lines)
    client = redis.Redis.from_url(stack.redis.url)
    result: dict[str, Any] = {"lines": lines, "manifest_mb": _mb(manifest.stat().st_size), "window": window}

    stack.flush()
    before = _used_memory(client)
    proc = _submit(env, str(manifest), "--question", QUESTION, "--name", "memory-window", "--window", str(window), "--interval", "3600")
    reached: list[float] = []

    def held() -> bool:
        if not reached and client.llen(BULK_LANE) >= window:
            reached.append(time.monotonic())
        return bool(reached) and time.monotonic() - reached[0] > hold_s

    started = time.monotonic()
    samples = _sample(proc, client, until=held)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    at_window = [sample for sample in samples if sample["queued"] >= window]
    result["window_on"] = {
        "seconds_to_window": round(reached[0] - started, 2) if reached else None,
        "queued": client.llen(BULK_LANE),
        "published_lines": int(client.hget(keys.bulk_meta_key("memory-window"), "lines_done") or 0),
        "producer_peak_rss_mb": max(sample["rss_mb"] for sample in samples),
        "producer_rss_mb_first_last_at_window": [at_window[0]["rss_mb"], at_window[-1]["rss_mb"]] if at_window else None,
        "redis_used_mb_before": _mb(before),
        "redis_used_mb_first_last_at_window": [at_window[0]["redis_used_mb"], at_window[-1]["redis_used_mb"]] if at_window else None,
        "held_s": hold_s,
        "samples": samples,
    }

    stack.flush()
    before = _used_memory(client)
    proc = _submit(env, str(manifest), "--question", QUESTION, "--name", "memory-nowindow", "--window", "0", "--interval", "3600")
    started = time.monotonic()
    samples = _sample(proc, client, until=lambda: False, every_s=1.0)
    proc.wait()
    seconds = time.monotonic() - started
    after = _used_memory(client)
    queued = client.llen(BULK_LANE)
    result["window_off"] = {
        "seconds": round(seconds, 1),
        "jobs_per_s": round(queued / seconds, 1),
        "queued": queued,
        "producer_peak_rss_mb": max(sample["rss_mb"] for sample in samples),
        "redis_used_mb_before": _mb(before),
        "redis_used_mb_after": _mb(after),
        "redis_bytes_per_queued_job": round((after - before) / max(queued, 1)),
        "samples": samples[:: max(1, len(samples) // 60)],
    }
    stack.flush()
    client.close()
    return result


def publish(stack: Stack, work: Path, *, jobs: int) -> dict[str, Any]:
    """Same manifest, same process: a bulk run (read, validate, encode, publish.lua) vs. send_task per line."""
    env = stack.env(model="unused")
    settings = Settings(**{name.removeprefix("VQA_").lower(): value for name, value in env.items()})
    manifest = write_manifest(work / "publish.jsonl", jobs)
    client = redis.Redis.from_url(stack.redis.url)
    result: dict[str, Any] = {"jobs": jobs}

    stack.flush()
    with VQAClient(settings) as vqa:
        start = time.perf_counter()
        run = vqa.bulk(str(manifest), questions=[QUESTION], window=0, background=False)
        assert run.submitter is not None
        run.submitter.publish()
        seconds = time.perf_counter() - start
        run.close()
    assert client.llen(BULK_LANE) == jobs, client.llen(BULK_LANE)
    result["bulk_run"] = {"seconds": round(seconds, 3), "jobs_per_s": round(jobs / seconds, 1)}

    stack.flush()
    with VQAClient(settings) as vqa:
        start = time.perf_counter()
        with manifest.open() as lines:
            for line in lines:  # what a script without bulk runs does: one send_task per line
                fields = json.loads(line)
                job = vqa.build_job(fields["image_url"], QUESTION, idempotency_key=fields["custom_id"])
                vqa.app.send_task(keys.TASK_NAME, kwargs={"job": job.model_dump(mode="json")}, task_id=job.job_id, queue=settings.queue,
                                  priority=keys.PRIORITIES["low"])  # the bulk run's lane, so both fill the same list
        seconds = time.perf_counter() - start
    assert client.llen(BULK_LANE) == jobs
    result["send_task_loop"] = {"seconds": round(seconds, 3), "jobs_per_s": round(jobs / seconds, 1)}
    result["bulk_vs_send_task_loop"] = round(result["bulk_run"]["jobs_per_s"] / result["send_task_loop"]["jobs_per_s"], 2)
    stack.flush()
    client.close()
    return result


class S3Counter:
    """Counts the S3 requests a boto3 client makes, by operation."""

    def __init__(self, s3: Any) -> None:
        self.counts: dict[str, int] = {}
        s3.meta.events.register("before-call.s3.*", self._count)

    def _count(self, model: Any, **_: Any) -> None:
        self.counts[model.name] = self.counts.get(model.name, 0) + 1

    def take(self) -> dict[str, int]:
        counts, self.counts = self.counts, {}
        return counts


def collect(stack: Stack, work: Path, *, jobs: int) -> dict[str, Any]:
    """Publish a run, finish every job through the worker's bulk hook (no model), then collect the results file."""
    env = stack.env(model="unused")
    settings = Settings(**{name.removeprefix("VQA_").lower(): value for name, value in env.items()})
    manifest = write_manifest(work / "collect.jsonl", jobs)
    stack.flush()
    broker = redis.Redis.from_url(stack.redis.url)
    result: dict[str, Any] = {"jobs": jobs, "segment_jobs": settings.bulk_segment_jobs}
    with VQAClient(settings) as vqa:
        counter = S3Counter(vqa.s3_client())
        run = vqa.bulk(str(manifest), questions=[QUESTION], window=0)
        run.join()
        counter.take()
        hook = BulkRuns(client=broker, s3_client=vqa.s3_client(), settings=settings)
        start = time.perf_counter()
        while True:
            batch = take_jobs(broker, BULK_LANE, 500)
            if not batch:
                break
            finish(hook, batch)
        worker_s = time.perf_counter() - start
        worker_requests = counter.take()
        status = run.status()
        assert status.state == "completed" and status.counts.succeeded == jobs, status
        start = time.perf_counter()
        lines = run.results(work / "collect-results.jsonl")
        collect_s = time.perf_counter() - start
        collect_requests = counter.take()
        run.close()
    assert lines == jobs
    result["workers"] = {
        "outcomes_per_s": round(jobs / worker_s, 1),
        "s3_requests": worker_requests,
        "s3_requests_per_job": round(sum(worker_requests.values()) / jobs, 5),
        "note": "the bulk hook only (count, log, segments, status.json); each job's own record PUT is not part of it",
    }
    result["collect"] = {
        "seconds": round(collect_s, 2),
        "outcomes_per_s": round(jobs / collect_s, 1),
        "s3_requests": collect_requests,
        "s3_requests_per_job": round(sum(collect_requests.values()) / jobs, 5),
        "redis_keys_left": len(broker.keys("vqa:bulk:*")),
    }
    stack.flush()
    broker.close()
    return result


def kill(stack: Stack, work: Path, *, model: str, jobs: int, kills: int, window: int, worker_env: dict[str, str]) -> dict[str, Any]:
    """A run on the tiny model whose submitter is SIGKILLed ``kills`` times, then run again to the end."""
    stack.flush()
    env = stack.env(model=model, **worker_env)
    images = sorted(path.name for path in stack.image_dir.iterdir())
    manifest = write_manifest(work / "kill.jsonl", jobs, base_url=stack.image_urls[0.0], images=images)
    stack.start_worker(env)
    broker = redis.Redis.from_url(stack.redis.url)
    command = [str(manifest), "--question", QUESTION, "--name", "kill-run", "--window", str(window), "--interval", "3600"]
    killed_at: list[int] = []
    start = time.monotonic()
    for number in range(1, kills + 1):
        proc = _submit(env, *command)
        target = jobs * number // (kills + 1)
        while proc.poll() is None and int(broker.hget(keys.bulk_meta_key("kill-run"), "total") or 0) < target:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed_at.append(int(broker.hget(keys.bulk_meta_key("kill-run"), "total") or 0))
    out = work / "kill-results.jsonl"
    last = subprocess.run([sys.executable, "-m", "producer.cli", "bulk", "submit", *command, "--wait", "--out", str(out)],
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=3600)
    seconds = time.monotonic() - start
    if last.returncode != 0:
        raise RuntimeError(f"the last submit failed: {last.stderr[-2000:]}")
    results = read_results(out)
    ids = [line["job_id"] for line in results]
    executions = broker.mget([keys.executions_key(job_id) for job_id in ids])
    runs = [int(value or 0) for value in executions]
    custom_ids = {line["custom_id"] for line in results}
    status = json.loads(subprocess.run([sys.executable, "-m", "producer.cli", "bulk", "status", "kill-run", "--json"],
                                       env={**os.environ, **env}, capture_output=True, text=True, timeout=60).stdout)
    broker.close()
    return {
        "jobs": jobs,
        "kills": kills,
        "window": window,
        "published_when_killed": killed_at,
        "seconds": round(seconds, 1),
        "jobs_per_s": round(jobs / seconds, 1),
        "results_lines": len(results),
        "results_complete": custom_ids == {f"img-{i:07d}" for i in range(jobs)} and len(results) == jobs,
        "lost": jobs - len(custom_ids),
        "computed_twice": sum(1 for count in runs if count > 1),
        "never_computed": sum(1 for count in runs if count == 0),
        "succeeded": status["counts"]["succeeded"],
        "state": status["state"],
    }
