"""API submissions per second: ``vqa api`` as a process on a private Redis and S3 API server, no worker.

    .venv/bin/python -m bench.api                          # -> docs/benchmarks/api.json and api.txt
    .venv/bin/python -m bench.api --jobs 200 --out /tmp/api   # seconds

Three figures from one run: single-job POSTs from one client, from ``--clients`` clients at once,
and jobs per second when each POST carries a list of ``--list-size`` jobs. Every POST is a fresh
job (a distinct question), authenticated, and ends in a message in Redis (checked at the end).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import boto3
import redis
import requests

from producer import keys
from worker.dev.services import ApiProcess, RedisServer, S3Server

TOKEN = "bench-token"


def _job(n: int) -> dict[str, str]:
    return {"image_url": f"https://images.example.com/{n}.png", "question": f"What is in picture {n}?"}


def _post_many(url: str, bodies: list[Any]) -> float:
    with requests.Session() as session:
        session.headers["Authorization"] = f"Bearer {TOKEN}"
        start = time.perf_counter()
        for body in bodies:
            response = session.post(f"{url}/v1/jobs", json=body, timeout=30)
            if response.status_code != 202:
                raise RuntimeError(f"{response.status_code}: {response.text}")
        return time.perf_counter() - start


def measure(*, jobs: int, clients: int, list_size: int) -> dict[str, Any]:
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    redis_server, s3_server = RedisServer().start(), S3Server().start()
    try:
        boto3.client("s3", endpoint_url=s3_server.url).create_bucket(Bucket="vqa-bench")
        env = {"VQA_BROKER_URL": redis_server.url, "VQA_RESULT_BACKEND": redis_server.url, "VQA_S3_ENDPOINT_URL": s3_server.url,
               "VQA_S3_BUCKET": "vqa-bench", "VQA_API_TOKENS": TOKEN, "VQA_LOG_LEVEL": "WARNING"}
        with tempfile.TemporaryDirectory() as directory:
            api = ApiProcess(env=env, log_path=Path(directory) / "api.log").start()
            try:
                _post_many(api.url, [_job(-n - 1) for n in range(20)])  # warm-up, not counted
                one = _post_many(api.url, [_job(n) for n in range(jobs)])
                per_client = jobs // clients
                with ThreadPoolExecutor(clients) as pool:
                    start = time.perf_counter()
                    list(pool.map(lambda c: _post_many(api.url, [_job(jobs + c * per_client + n) for n in range(per_client)]), range(clients)))
                    parallel = time.perf_counter() - start
                lists = [[_job(3 * jobs + b * list_size + n) for n in range(list_size)] for b in range(max(1, jobs // list_size))]
                listed = _post_many(api.url, lists)
            finally:
                api.stop()
        client = redis.Redis.from_url(redis_server.url)
        enqueued = sum(client.llen(name) for name in keys.priority_queue_keys("vqa"))
        client.close()
    finally:
        s3_server.stop()
        redis_server.cleanup()
    expected = 20 + jobs + per_client * clients + len(lists) * list_size
    if enqueued != expected:
        raise RuntimeError(f"{enqueued} messages in Redis, expected {expected}")
    return {
        "single_job_posts_per_s_1_client": round(jobs / one, 1),
        f"single_job_posts_per_s_{clients}_clients": round(per_client * clients / parallel, 1),
        f"jobs_per_s_lists_of_{list_size}_1_client": round(len(lists) * list_size / listed, 1),
        "jobs": jobs,
        "clients": clients,
        "list_size": list_size,
        "enqueued_checked": enqueued,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--list-size", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    args = parser.parse_args()
    result = measure(jobs=args.jobs, clients=args.clients, list_size=args.list_size)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "api.json").write_text(json.dumps(result, indent=2) + "\n")
    text = "\n".join(f"{name}: {value}" for name, value in result.items())
    (args.out / "api.txt").write_text(f"$ python -m bench.api {' '.join(sys.argv[1:])}\n{text}\n")
    print(text)


if __name__ == "__main__":
    main()
