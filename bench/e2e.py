"""End-to-end measurements on the private stack: bursts, open-loop latency, enqueue rate, worker memory."""

from __future__ import annotations

import random
import time
from typing import Any

import redis

from bench.model import QUESTION
from bench.stack import Done, Stack, gpu_memory_mib, process_counts, rss_kib
from producer import keys
from producer.client import VQAClient
from producer.schema import GenerationSettings
from producer.settings import Settings


def _requests(base_url: str, files: list[str], *, tag: str, generation: GenerationSettings) -> list[dict[str, Any]]:
    # A distinct idempotency key per job: the same picture twice is still two jobs to answer.
    return [
        {"image_url": f"{base_url}/{name}", "question": QUESTION, "idempotency_key": f"{tag}-{i}", "generation": generation.model_dump()}
        for i, name in enumerate(files)
    ]


def burst(stack: Stack, env: dict[str, str], *, files: list[str], delay_s: float, generation: GenerationSettings, tag: str,
          timeout: float = 900) -> dict[str, Any]:
    """Submit every job at once (bulk) to a running worker; time each record as it is published."""
    with stack.client(env) as client:
        requests = _requests(stack.image_urls[delay_s], files, tag=tag, generation=generation)
        # The scrapes of the worker's stage counters fall outside the window its process CPU is read over.
        stages_before = stack.worker_stage_cpu()
        cpu_before, s3_before, redis_before = stack.cpu(), stack.s3_requests(), stack.redis_commands()
        start = time.monotonic()
        ids = client.submit_many(requests)
    done = stack.listener.wait_for(ids, timeout=timeout)
    cpu_after = stack.cpu()
    redis_commands = stack.redis_commands() - redis_before  # Counter subtraction: the commands run meanwhile
    stages_after = stack.worker_stage_cpu()
    time.sleep(0.2)  # the server writes its access-log line after the answer
    s3_requests = stack.s3_requests() - s3_before
    # Where the CPU went, per job: on a CPU host everything here shares the cores with the model.
    cpu = {name: round(1000 * (cpu_after[name] - cpu_before[name]) / len(ids), 1) for name in cpu_after if name in cpu_before}
    # Inside the worker: its model, decoding and preprocessing, each timed on the thread that ran it.
    stages = {stage: round(1000 * (stages_after[stage] - stages_before[stage]) / len(ids), 1) for stage in stages_after}
    return {**summarize(start, list(done.values())), "cpu_ms_per_job": cpu, "worker_cpu_ms_per_job": stages,
            "s3_requests_per_job": round(s3_requests / len(ids), 2), "redis_commands_per_job": round(redis_commands.total() / len(ids), 2),
            "redis_commands_per_job_by_name": {name: round(n / len(ids), 2) for name, n in redis_commands.most_common()}}


def summarize(start: float, done: list[Done]) -> dict[str, Any]:
    """Throughput (wall and steady-state), batches, fetch times and model utilisation of one burst."""
    done = sorted(done, key=lambda d: d.at)
    n = len(done)
    times = [d.at for d in done]
    batches: dict[tuple[Any, Any], tuple[int, float]] = {}
    ends: dict[tuple[Any, Any], float] = {}
    for d in done:
        r = d.record
        key = (r.get("worker"), r.get("started_at"))
        batches[key] = (int(r.get("batch_size") or 0), float(r.get("infer_ms") or 0.0))
        ends[key] = d.at  # the batch's last record
    order = sorted(ends, key=ends.__getitem__)
    # Steady state: the jobs of batches 2..K-1 over the time from the end of the first batch to
    # the end of the last but one. The pipeline's fill (first fetches, a batch flushed before it
    # is full) and drain (a last, partial batch) are left out, as the direct runs leave out their
    # warm-up and only ever run full batches.
    steady = None
    if len(order) >= 3 and ends[order[-2]] > ends[order[0]]:
        steady = sum(batches[key][0] for key in order[1:-1]) / (ends[order[-2]] - ends[order[0]])
    full = max(size for size, _ in batches.values())
    full_infer = sorted(ms for size, ms in batches.values() if size == full)
    infer_s = sum(ms for _, ms in batches.values()) / 1000
    first_infer_s = (float(done[0].record.get("infer_ms") or 0.0)) / 1000
    busy_span = times[-1] - (times[0] - first_infer_s)
    fetch = sorted(float(d.record["fetch_ms"]) for d in done if d.record.get("fetch_ms") is not None)
    return {
        "jobs": n,
        "failed": sum(d.status != "SUCCESS" for d in done),
        "seconds": round(times[-1] - start, 3),
        "images_per_s_wall": round(n / (times[-1] - start), 3),
        "images_per_s": None if steady is None else round(steady, 3),
        "batches": len(batches),
        "mean_batch_size": round(n / max(1, len(batches)), 2),
        "model_utilisation": round(infer_s / busy_span, 3) if busy_span > 0 else None,
        # Compare with the direct run's batch_ms_median: slower here = the model shares the CPUs.
        "full_batch_infer_ms_median": round(full_infer[len(full_infer) // 2], 1),
        "fetch_ms_mean": round(sum(fetch) / len(fetch), 1) if fetch else None,
        "fetch_ms_p95": round(percentile(fetch, 95), 1) if fetch else None,
    }


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), round(p / 100 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


def open_loop(stack: Stack, env: dict[str, str], *, files: list[str], rate: float, duration_s: float,
              generation: GenerationSettings, tag: str, seed: int = 5, timeout: float = 600) -> dict[str, Any]:
    """Poisson arrivals at ``rate`` jobs/s for ``duration_s``; latency = scheduled submit -> record published."""
    rng = random.Random(seed)
    count = max(1, round(rate * duration_s))
    requests = _requests(stack.image_urls[0.0], [files[i % len(files)] for i in range(count)], tag=tag, generation=generation)
    scheduled: dict[str, float] = {}
    lag: list[float] = []
    with stack.client(env) as client:
        at = time.monotonic() + 0.5
        for request in requests:
            at += rng.expovariate(rate)
            pause = at - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            lag.append(max(0.0, time.monotonic() - at))
            job_id = client.submit(request["image_url"], request["question"], idempotency_key=request["idempotency_key"],
                                   generation=request["generation"])
            scheduled[job_id] = at
    done = stack.listener.wait_for(list(scheduled), timeout=timeout)
    latencies = sorted(done[job_id].at - at for job_id, at in scheduled.items())
    batch_sizes = [int(d.record.get("batch_size") or 0) for d in done.values()]
    return {
        "rate_per_s": round(rate, 3),
        "jobs": count,
        "failed": sum(d.status != "SUCCESS" for d in done.values()),
        "p50_ms": round(1000 * percentile(latencies, 50), 1),
        "p95_ms": round(1000 * percentile(latencies, 95), 1),
        "p99_ms": round(1000 * percentile(latencies, 99), 1),
        "max_ms": round(1000 * latencies[-1], 1),
        "mean_batch_size": round(sum(batch_sizes) / len(batch_sizes), 2),
        "submit_lag_ms_max": round(1000 * max(lag), 1),
    }


def enqueue_rates(redis_url: str, *, jobs: int) -> dict[str, Any]:
    """Jobs/s onto the queue: our bulk path vs. publishing one message per call."""
    url_env = {"broker_url": redis_url, "result_backend": redis_url}
    broker = redis.Redis.from_url(redis_url)
    requests = [{"image_url": f"https://images.example/{i}.jpg", "question": QUESTION, "idempotency_key": f"enq-{i}"} for i in range(jobs)]
    results: dict[str, Any] = {"jobs": jobs}

    def timed(label: str, run: Any) -> None:
        broker.flushall()
        with VQAClient(Settings(**url_env)) as client:
            prepared = [client.build_job(**r) for r in requests] if label.startswith("send_task") else None
            start = time.perf_counter()
            run(client, prepared)
            seconds = time.perf_counter() - start
        queued = sum(broker.llen(key) for key in keys.priority_queue_keys("vqa"))
        if queued != jobs:
            raise RuntimeError(f"{label}: {queued} of {jobs} messages queued")
        results[label] = {"seconds": round(seconds, 3), "jobs_per_s": round(jobs / seconds, 1)}

    def plain_loop(client: VQAClient, built: list[Any]) -> None:
        # What a producer writes without our client: one send_task per job, payloads ready.
        for job in built:
            client.app.send_task(keys.TASK_NAME, kwargs={"job": job.model_dump(mode="json")}, task_id=job.job_id, queue="vqa")

    def shared_producer_loop(client: VQAClient, built: list[Any]) -> None:
        # The previous submit_many: send_task per job through one pooled producer.
        with client.app.producer_or_acquire() as producer:
            for job in built:
                client.app.send_task(keys.TASK_NAME, kwargs={"job": job.model_dump(mode="json")}, task_id=job.job_id,
                                     queue="vqa", producer=producer)

    timed("send_task_loop", plain_loop)
    timed("send_task_shared_producer", shared_producer_loop)
    timed("submit_loop", lambda client, _: [client.submit(**r) for r in requests])
    timed("submit_many", lambda client, _: client.submit_many(requests))
    broker.flushall()
    broker.close()
    bulk = results["submit_many"]["jobs_per_s"]
    results["bulk_vs_send_task_loop"] = round(bulk / results["send_task_loop"]["jobs_per_s"], 2)
    results["bulk_vs_shared_producer_loop"] = round(bulk / results["send_task_shared_producer"]["jobs_per_s"], 2)
    return results


def memory_run(stack: Stack, env: dict[str, str], *, files: list[str], jobs: int, generation: GenerationSettings, tag: str,
               sample_s: float = 1.0, window: int = 1000, timeout: float = 1800) -> dict[str, Any]:
    """Feed ``jobs`` jobs through one worker, sampling its RSS (and GPU memory) against jobs done."""
    worker = stack.start_worker(env)
    assert worker.proc is not None
    pid = worker.proc.pid
    base_url = stack.image_urls[0.0]
    samples: list[dict[str, float]] = []
    ids: list[str] = []
    start = time.monotonic()
    already = stack.listener.count()
    next_sample = start
    with stack.client(env) as client:
        while True:
            done = stack.listener.count() - already
            if len(ids) < jobs and len(ids) - done < window:
                # Keep about one window queued: enough to stay busy, bounded in Redis.
                chunk = [files[(len(ids) + i) % len(files)] for i in range(min(window, jobs - len(ids)))]
                batch = _requests(base_url, chunk, tag=f"{tag}-{len(ids)}", generation=generation)
                ids += client.submit_many(batch)
            now = time.monotonic()
            if now >= next_sample or done >= jobs:
                samples.append({"t_s": round(now - start, 2), "jobs_done": done, "rss_mib": round(rss_kib(pid) / 1024, 2),
                                "gpu_mib": gpu_memory_mib(pid), **process_counts(pid)})
                next_sample = now + sample_s
            if done >= jobs:
                break
            if now - start > timeout:
                raise TimeoutError(f"memory run: {done} of {jobs} jobs after {timeout:.0f} s")
            time.sleep(0.05)
    finished = stack.listener.wait_for(ids, timeout=60)
    seconds = time.monotonic() - start
    return {
        "jobs": jobs,
        "failed": sum(d.status != "SUCCESS" for d in finished.values()),
        "seconds": round(seconds, 1),
        "jobs_per_s": round(jobs / seconds, 1),
        **rss_trend(samples),
        "samples": samples,
    }


def rss_trend(samples: list[dict[str, float]]) -> dict[str, Any]:
    """RSS growth over the second half of the run (the first half includes warm-up allocations)."""
    half = [s for s in samples if s["jobs_done"] >= samples[-1]["jobs_done"] / 2]
    xs = [s["jobs_done"] / 1000 for s in half]
    ys = [s["rss_mib"] for s in half]
    slope = None
    if len(half) >= 3 and max(xs) > min(xs):
        mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
        slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / sum((x - mean_x) ** 2 for x in xs)
    rss = [s["rss_mib"] for s in samples]
    return {
        "rss_mib_first": rss[0],
        "rss_mib_at_half": ys[0] if ys else None,
        "rss_mib_end": rss[-1],
        "rss_mib_max": max(rss),
        "rss_growth_second_half_mib": round(ys[-1] - ys[0], 2) if ys else None,
        "rss_slope_mib_per_1000_jobs": None if slope is None else round(slope, 3),
    }
