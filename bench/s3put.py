"""What one record write costs the worker's CPU: the S3 create, beside a Redis round trip and a thread start.

    .venv/bin/python -m bench.s3put --out docs/benchmarks/queue-cost/s3-put    # ~1 min

The pipeline's CPU per job (the "where the CPU goes" table of ``python -m bench``) is the sum of
many small steps; this times the largest ones alone, one after another on one thread, with
``time.process_time()`` (the process's CPU, the kernel's share of the socket calls included):

1. ``RecordStore.write`` of a success record, as the writer's store pool does it: botocore's
   conditional PUT (``If-None-Match: *``) to moto's S3 server (a separate process, as in the bench);
2. a Redis round trip: one GET, and one pipeline of 8 commands (a batch's acks), to a private
   ``redis-server``;
3. a thread started and joined, as each fetch did twice before its deadline and DNS lookup
   moved to kept threads (worker/fetch/deadlines.py).

Prints one line per figure and writes s3-put.json and s3-put.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from bench.preprocess import run_header, write_result
from bench.stack import use_bench_credentials
from producer.schema import GenerationSettings, Record, utcnow
from producer.settings import Settings
from worker.dev.services import RedisServer, S3Server
from worker.storage import RecordStore, make_s3_client


def _record(job_id: str) -> Record:
    now = utcnow()
    return Record(job_id=job_id, status="succeeded", image_url=f"http://images.example/{job_id}.jpg", question="What is shown in this image?",
                  answer="A cat on a sofa, next to a window with a plant on its sill.", model="bench", quantization="none",
                  generation=GenerationSettings(max_new_tokens=16), attempts=0, executions=1, worker="bench-w1", batch_size=8,
                  submitted_at=now, started_at=now, finished_at=now)


def cpu_ms_per_call(step: Callable[[int], Any], n: int, rounds: int) -> list[float]:
    """CPU ms per call of ``step(i)``, one figure per round of ``n`` calls (after 20 unmeasured ones)."""
    for i in range(20):
        step(-1 - i)
    figures = []
    for r in range(rounds):
        start = time.process_time()
        for i in range(n):
            step(r * n + i)
        figures.append(round((time.process_time() - start) / n * 1000, 3))
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.s3put", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/queue-cost/s3-put"))
    parser.add_argument("--writes", type=int, default=300, help="per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    use_bench_credentials()  # moto takes any
    s3 = S3Server().start()
    server = RedisServer().start()
    try:
        settings = Settings(s3_endpoint_url=s3.url, s3_bucket="bench-records")
        client = make_s3_client(settings)
        client.create_bucket(Bucket=settings.s3_bucket)
        store = RecordStore(settings, s3_client=client, app=None, marks=None)  # type: ignore[arg-type]
        records = {i: _record(f"job-{i}") for i in range(-20, args.rounds * args.writes)}
        put = cpu_ms_per_call(lambda i: store.write(records[i], drop_failed=False), args.writes, args.rounds)

        jobs_redis = redis.Redis.from_url(server.url)
        get = cpu_ms_per_call(lambda i: jobs_redis.get("vqa:absent"), args.writes, args.rounds)

        def eight(_: int) -> None:
            pipe = jobs_redis.pipeline(transaction=False)
            for n in range(8):
                pipe.hdel("vqa:absent-hash", f"tag-{n}")
            pipe.execute()

        pipelined = cpu_ms_per_call(eight, args.writes, args.rounds)

        def thread(_: int) -> None:
            started = threading.Thread(target=lambda: None)
            started.start()
            started.join()

        threads = cpu_ms_per_call(thread, args.writes, args.rounds)
    finally:
        s3.stop()
        server.stop()

    result = {
        **run_header("bench.s3put", argv, writes_per_round=args.writes, rounds=args.rounds),
        "record_bytes": len(_record("job-0").model_dump_json()),
        "s3_create_cpu_ms": put, "redis_get_cpu_ms": get, "redis_pipeline_of_8_cpu_ms": pipelined,
        "thread_start_join_cpu_ms": threads,
    }
    median = statistics.median
    text = "\n".join([
        "# One record write's CPU, alone (`python -m bench.s3put`)",
        "",
        f"Command: `{result['command']}`; {result['machine']} ({result['cores']} CPUs), Python {result['python']}; "
        f"{args.rounds} rounds of {args.writes} calls, CPU ms per call (`time.process_time()`), one thread.",
        "",
        "| step | ms of CPU per call (median) | rounds |",
        "|---|---:|---|",
        f"| `RecordStore.write`: botocore's conditional PUT of a {result['record_bytes']}-byte record to moto's S3 server | {median(put)} | {put} |",
        f"| a Redis round trip (GET) | {median(get)} | {get} |",
        f"| a Redis pipeline of 8 commands (a batch's acks) | {median(pipelined)} | {pipelined} |",
        f"| a thread started and joined | {median(threads)} | {threads} |",
        "",
    ])
    write_result(args.out, "s3-put", result, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
