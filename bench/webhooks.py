"""Webhooks, measured: one ``vqa webhooks`` dispatcher's delivery rate and latency to a local receiver.

    .venv/bin/python -m bench.webhooks                       # -> docs/benchmarks/webhooks/
    .venv/bin/python -m bench.webhooks --profile tiny --out /tmp/wh   # seconds; what the tests run

Two sections, one run, one private redis-server and S3 API server:

* ``burst``: N synthetic completion events XADDed at once into ``VQA_EVENTS_STREAM`` while the
  dispatcher runs; deliveries per second until the local receiver has verified all N (with the
  Standard Webhooks reference library), and each one's latency after its event's ``finished_at``.
* ``paced``: events XADDed at a steady rate well under that capacity: the latency one delivery
  takes when nothing queues ahead of it.
* ``worker``: a real ``vqa worker`` on the bench model answering the same burst of jobs with
  completion events off (``VQA_EVENTS_ENABLED=false``; the dispatcher idles), then on with every job
  asking for a webhook that the dispatcher delivers, in alternating rounds: jobs/s and the
  model's time per full batch, to show whether the model loop notices them.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis

from bench.stack import cpu_seconds, run_meta, sample_workdir, stack, write_report

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


@dataclass(frozen=True)
class Profile:
    burst_events: int
    paced_events: int
    paced_rate: float  # events per second
    worker_jobs: int = 48  # per round of the worker section
    worker_rounds: int = 2  # of each setting, alternating off/on
    worker_model: str = "bench"  # worker/dev/tiny_model.py size


PROFILES = {
    "full": Profile(burst_events=2000, paced_events=200, paced_rate=20.0),
    # Seconds, not minutes: the harness's own test. Figures from it mean nothing.
    "tiny": Profile(burst_events=20, paced_events=10, paced_rate=20.0, worker_jobs=8, worker_rounds=1, worker_model="tiny"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.webhooks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="full")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/webhooks"), help="where webhooks.{json,md} go")
    args = parser.parse_args(argv)
    command = " ".join(shlex.quote(part) for part in ["python", "-m", "bench.webhooks", *(argv if argv is not None else sys.argv[1:])])
    result = run(PROFILES[args.profile], name=args.profile, command=command)
    write_report(args.out, "webhooks", result, markdown)
    return 0


def run(profile: Profile, *, name: str, command: str) -> dict[str, Any]:
    from tests.integration.receiver import webhook_receiver

    started = time.monotonic()
    result: dict[str, Any] = {"meta": run_meta(name, command)}
    with sample_workdir("vqa-bench-webhooks-") as (work, images):
        with stack(images, delays=(0.0,)) as bench_stack, webhook_receiver(SECRET) as receiver:
            env = bench_stack.env(model="unused", VQA_WEBHOOK_SECRETS=SECRET, VQA_LOG_LEVEL="WARNING",
                                  VQA_ALLOWED_HOSTS=f"{next(iter(bench_stack.image_urls.values())).removeprefix('http://')},"
                                                    f"{receiver.url.removeprefix('http://')}")
            client = redis.Redis.from_url(bench_stack.redis.url)
            with dispatcher(env, work / "webhooks.log", client) as proc:
                say(f"burst: {profile.burst_events} events")
                cpu_before = cpu_seconds(proc.pid)
                result["burst"] = synthetic(client, receiver, url=f"{receiver.url}/burst", events=profile.burst_events, rate=None)
                # What one delivery costs the dispatcher (sign, POST, bookkeeping in Redis): on a
                # machine of 2 cores shared with the receiver, this, not the per-host cap, bounds the burst.
                result["burst"]["dispatcher_cpu_ms_per_delivery"] = round(
                    (cpu_seconds(proc.pid) - cpu_before) * 1000 / profile.burst_events, 2)
                say(f"paced: {profile.paced_events} events at {profile.paced_rate}/s")
                result["paced"] = synthetic(client, receiver, url=f"{receiver.url}/paced", events=profile.paced_events,
                                            rate=profile.paced_rate)
                # The dispatcher keeps running, idle in the rounds with events off.
                result["worker"] = worker_on_off(bench_stack, env, receiver, profile, work)
            client.close()
    result["settings"] = {"VQA_WEBHOOK_CONCURRENCY": 32, "VQA_WEBHOOK_PER_HOST": 4}  # the defaults the dispatcher ran with
    result["meta"]["seconds"] = round(time.monotonic() - started, 1)
    return result


@contextmanager
def dispatcher(env: dict[str, str], log_path: Path, client: redis.Redis) -> Any:
    """``vqa webhooks`` as a process; yields once its consumer group exists (so it is reading)."""
    log = open(log_path, "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "producer.cli", "webhooks"], env={**os.environ, **env}, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not _has_group(client, env):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"vqa webhooks did not start:\n{log_path.read_text(errors='replace')[-4000:]}")
            time.sleep(0.1)
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def _has_group(client: redis.Redis, env: dict[str, str]) -> bool:
    try:
        return any(group["name"] == b"vqa-webhooks" for group in client.xinfo_groups(env.get("VQA_EVENTS_STREAM", "vqa:events")))
    except redis.ResponseError:  # no stream yet
        return False


def synthetic(client: redis.Redis, receiver: Any, *, url: str, events: int, rate: float | None) -> dict[str, Any]:
    """XADD ``events`` completion events (all at once, or ``rate`` per second) and time their verified deliveries."""
    path = url.rsplit("/", 1)[1]
    path = "/" + path
    start = time.time()
    for n in range(events):
        if rate is not None:
            time.sleep(max(0.0, start + n / rate - time.time()))
        job_id = str(uuid.uuid4())
        client.xadd("vqa:events", {"job_id": job_id, "status": "succeeded", "error_code": "", "bulk_id": "", "custom_id": "",
                                   "s3_bucket": "vqa-bench", "s3_key": f"results/{job_id}.json",
                                   "finished_at": datetime.now(UTC).isoformat(), "webhook_url": url})
    added = time.time()
    calls = _wait_deliveries(receiver, path, events, timeout=max(60.0, events / 5))
    last = max(call["at"] for call in calls)
    latencies = [call["at"] - datetime.fromisoformat(call["payload"]["data"]["finished_at"]).timestamp() for call in calls]
    out = {"events": events, "verified": len(calls), "xadd_s": round(added - start, 3), "seconds": round(last - start, 3),
           **_percentiles_ms(latencies)}
    if rate is None:
        out["deliveries_per_s"] = round(events / (last - start), 1)
    else:
        out["rate_per_s"] = rate
    return out


def worker_on_off(bench_stack: Any, env: dict[str, str], receiver: Any, profile: Profile, work: Path) -> dict[str, Any]:
    """The same burst of jobs through a real worker with events and webhooks off, then on, alternating."""
    from bench.e2e import summarize
    from bench.model import QUESTION, write_workloads
    from producer.schema import GenerationSettings
    from worker.dev.tiny_model import build_tiny_model

    model = str(build_tiny_model(work / "model", size=profile.worker_model))  # type: ignore[arg-type]
    files = write_workloads(bench_stack.image_dir, uniform=profile.worker_jobs, mixed=0)["uniform"].files
    gen = GenerationSettings(max_new_tokens=8, min_new_tokens=8)
    base = {**env, "VQA_MODEL": model, "VQA_MAX_BATCH_SIZE": "8", "VQA_MAX_NEW_TOKENS": "8"}
    rounds: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
    image_url = next(iter(bench_stack.image_urls.values()))
    tag = f"w{int(time.time())}"
    for n in range(profile.worker_rounds):
        for setting in ("off", "on"):
            worker_env = {**base, "VQA_EVENTS_ENABLED": "true" if setting == "on" else "false"}
            bench_stack.start_worker(worker_env)
            path = f"/worker-{n}"
            requests = [{"image_url": f"{image_url}/{name}", "question": QUESTION, "idempotency_key": f"{tag}-{setting}{n}-{i}",
                         "generation": gen.model_dump(), **({"webhook_url": f"{receiver.url}{path}"} if setting == "on" else {})}
                        for i, name in enumerate(files)]
            say(f"worker: events {setting}, round {n + 1}, {len(requests)} jobs")
            events = redis.Redis.from_url(bench_stack.redis.url)
            events_before = events.xlen("vqa:events")
            with bench_stack.client(worker_env) as client:
                start = time.monotonic()
                ids = client.submit_many(requests)
            done = bench_stack.listener.wait_for(ids, timeout=900)
            summary = summarize(start, list(done.values()))
            time.sleep(0.5)  # a record is published before its event is appended
            summary["events_appended"] = events.xlen("vqa:events") - events_before
            events.close()
            if setting == "on":
                summary["webhooks_verified"] = len(_wait_deliveries(receiver, path, len(ids), timeout=120))
            rounds[setting].append({key: summary[key] for key in ("images_per_s_wall", "images_per_s", "full_batch_infer_ms_median",
                                                                   "model_utilisation", "events_appended")} | {k: v for k, v in summary.items() if k == "webhooks_verified"})
    bench_stack.stop_worker()

    def median(setting: str, key: str) -> float | None:
        values = [r[key] for r in rounds[setting] if r.get(key) is not None]
        return round(statistics.median(values), 3) if values else None

    return {"model": profile.worker_model, "jobs_per_round": profile.worker_jobs, "rounds": rounds,
            **{f"{key}_{setting}": median(setting, key) for key in ("images_per_s_wall", "full_batch_infer_ms_median")
               for setting in ("off", "on")}}


def _wait_deliveries(receiver: Any, path: str, count: int, *, timeout: float) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        calls = receiver.deliveries(path)
        if len(calls) >= count:
            return calls
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(calls)} of {count} deliveries to {path} after {timeout:.0f} s")
        time.sleep(0.02)


def _percentiles_ms(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    cuts = statistics.quantiles(ordered, n=20, method="inclusive") if len(ordered) > 1 else ordered * 19
    return {"latency_p50_ms": round(statistics.median(ordered) * 1000, 1), "latency_p95_ms": round(cuts[18] * 1000, 1),
            "latency_max_ms": round(ordered[-1] * 1000, 1)}


def say(message: str) -> None:
    print(f"[bench.webhooks {datetime.now(UTC).strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def markdown(result: dict[str, Any]) -> str:
    meta, burst, paced = result["meta"], result["burst"], result["paced"]
    lines = [
        "# Webhooks: one dispatcher's delivery rate and latency", "",
        f"`{meta['command']}` — profile {meta['profile']}, {meta['machine']}, Python {meta['python']}, "
        f"{meta['started_at']}, {meta['seconds']} s. Dispatcher defaults: VQA_WEBHOOK_CONCURRENCY "
        f"{result['settings']['VQA_WEBHOOK_CONCURRENCY']}, VQA_WEBHOOK_PER_HOST {result['settings']['VQA_WEBHOOK_PER_HOST']} "
        "(every delivery here goes to one host). Every delivery verified by the receiver with `standardwebhooks`.", "",
        "| measurement | events | deliveries/s | latency p50 | p95 | max |",
        "|---|---:|---:|---:|---:|---:|",
        f"| burst: all XADDed at once | {burst['events']:,} | {burst['deliveries_per_s']} | {burst['latency_p50_ms']} ms | "
        f"{burst['latency_p95_ms']} ms | {burst['latency_max_ms']} ms |",
        f"| paced: {paced['rate_per_s']:g} events/s | {paced['events']:,} | — | {paced['latency_p50_ms']} ms | "
        f"{paced['latency_p95_ms']} ms | {paced['latency_max_ms']} ms |", "",
        "Latency: receiver's clock minus the event's `finished_at` (the burst's includes the wait behind the backlog). "
        f"The dispatcher process spent {burst['dispatcher_cpu_ms_per_delivery']} ms of CPU per burst delivery "
        "(signing, the POST, its Redis bookkeeping); the receiver verifying signatures runs on the same 2 cores.", "",
    ]
    worker = result.get("worker")
    if worker:
        lines += [
            f"## The worker with events and webhooks off vs. on ({worker['model']} model, {worker['jobs_per_round']} jobs a round, "
            "batch 8, rounds alternating)", "",
            "| round | events | jobs/s (wall) | full batch in the model, median | model busy | events appended | webhooks verified |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for n in range(len(worker["rounds"]["off"])):
            for setting in ("off", "on"):
                r = worker["rounds"][setting][n]
                lines.append(f"| {n + 1} | {setting} | {r['images_per_s_wall']} | {r['full_batch_infer_ms_median']} ms | "
                             f"{r['model_utilisation']} | {r['events_appended']} | {r.get('webhooks_verified', '—')} |")
        lines += ["", f"Medians: {worker['images_per_s_wall_off']} jobs/s off, {worker['images_per_s_wall_on']} on; a full batch "
                  f"{worker['full_batch_infer_ms_median_off']} ms off, {worker['full_batch_infer_ms_median_on']} ms on. "
                  "On this machine the dispatcher, the receiver and the model share 2 cores; on a GPU host only the first two share the CPU.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
