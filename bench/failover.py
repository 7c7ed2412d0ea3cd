"""Redis failover, measured: accepted jobs lost, duplicate runs and time to recover, VQA_ACCEPT_REPLICAS=0 vs 1.

    .venv/bin/python -m bench.failover                      # -> docs/benchmarks/failover/
    .venv/bin/python -m bench.failover --rounds 1 --out /tmp/fo

Each round is one real failover (worker/dev/sentinel.py): a redis-server master, one replica and
three sentinels; one ``vqa worker`` (tiny random-weight model, CPU) and one producer thread, both
given the ``redis+sentinel://`` URL. The producer submits one job every 20 ms, retrying a refused
submission as it is. After 2 s the master is SIGKILLed. Two link conditions:

* ``healthy``: the replica is up to date (loopback, sub-millisecond lag): the best case;
* ``lagging``: the replica's link to the master (through a proxy) stalls ``--stall-ms`` before
  the kill, standing in for a replica that lags (a slow cross-zone link, a replica busy with a
  sync). What the master accepts in that window is on no replica: the window asynchronous
  replication always leaves open, made wide enough to measure instead of left to luck.

Per round: accepted (submit returned), lost (accepted, no record in S3 once everything accepted
after the kill has finished and 10 s more passed), duplicates (jobs the worker ran in more than
one batch, from its JSON log), and seconds from the kill to the promotion, to the producer's first
accepted submission, and to the worker's first record of a job first offered after the promotion.
The killed master stays down: the promoted replica has no replica of its own, so with
``VQA_ACCEPT_REPLICAS=1`` every new submission is refused after the failover (only retries of
jobs that meanwhile finished return). That is part of its cost; with two replicas it would not be.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.stack import Stack, run_meta, sample_workdir, stack, write_report
from producer.client import VQAClient
from producer.errors import BackendUnavailable
from tests.support.tcp_proxy import PartitionProxy
from worker.dev.sentinel import SentinelGroup
from worker.dev.services import WorkerProcess

RUN_BEFORE_KILL_S = 2.0
RUN_AFTER_RECOVERY_S = 3.0
SUBMIT_EVERY_S = 0.02


class Producer(threading.Thread):
    """One job per submission; a refused one is retried as is (same job, same id)."""

    def __init__(self, client: VQAClient, image_url: str, tag: str) -> None:
        super().__init__(daemon=True)
        self.client, self.image_url, self.tag = client, image_url, tag
        self.accepted: dict[str, float] = {}  # job id -> time.monotonic() its submit returned
        self.first_asked: dict[str, float] = {}  # job id -> when its first attempt began
        self.refused = 0
        self.slowest_s = 0.0
        self.stopping = threading.Event()

    def run(self) -> None:
        sent = 0
        job = None
        while not self.stopping.is_set():
            asked = time.monotonic()
            if job is None:
                job = self.client.build_job(self.image_url, f"{self.tag} {sent}: what is shown?")
                self.first_asked[job.job_id] = asked
            try:
                job_id = self.client.submit_jobs([job])[0]
            except BackendUnavailable:
                self.refused += 1
                time.sleep(0.05)
                continue
            now = time.monotonic()
            self.slowest_s = max(self.slowest_s, now - asked)
            self.accepted[job_id] = now
            job = None
            sent += 1
            time.sleep(SUBMIT_EVERY_S)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.failover", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="failovers per setting and link condition")
    parser.add_argument("--stall-ms", type=int, default=500, help="how long the lagging replica's link stalls before the kill")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/failover"), help="where failover.{json,md} go")
    args = parser.parse_args(argv)
    command = " ".join(shlex.quote(part) for part in ["python", "-m", "bench.failover", *(argv if argv is not None else sys.argv[1:])])
    result = run(rounds=args.rounds, stall_ms=args.stall_ms, command=command)
    write_report(args.out, "failover", result, markdown)
    return 0


def run(*, rounds: int, stall_ms: int, command: str) -> dict[str, Any]:
    from worker.dev.tiny_model import build_tiny_model

    result: dict[str, Any] = {"meta": {**run_meta(f"{rounds} rounds", command), "stall_ms": stall_ms}, "rounds": []}
    with sample_workdir("vqa-bench-failover-") as (work, images), stack(images, delays=(0.0,)) as bench_stack:
        model = build_tiny_model(work / "tiny", size="tiny", seed=0)
        for link in ("healthy", "lagging"):
            for accept in (0, 1):
                for index in range(rounds):
                    outcome = one_failover(bench_stack, work / f"{link}-{accept}-{index}", model=str(model), accept_replicas=accept,
                                           stall_s=stall_ms / 1000 if link == "lagging" else 0.0)
                    outcome.update(link=link, accept_replicas=accept, round=index)
                    print(json.dumps(outcome), flush=True)
                    result["rounds"].append(outcome)
    result["summary"] = summarize(result["rounds"])
    return result


def one_failover(bench_stack: Stack, work: Path, *, model: str, accept_replicas: int, stall_s: float) -> dict[str, Any]:
    proxies: list[PartitionProxy] = []

    def through_proxy(master_port: int) -> int:
        proxies.append(PartitionProxy(master_port).start())
        return proxies[-1].port

    # A long failover timeout keeps the sentinels from re-pointing the replica past the proxy (worker/dev/sentinel.py).
    group = SentinelGroup(data_dir=work / "redis", replica_link=through_proxy, failover_timeout_ms=120_000).start()
    worker: WorkerProcess | None = None
    try:
        env = bench_stack.env(model=model, VQA_BROKER_URL=group.url, VQA_RESULT_BACKEND=group.url, VQA_ACCEPT_REPLICAS=str(accept_replicas),
                              VQA_ACCEPT_REPLICAS_TIMEOUT_MS="300", VQA_MAX_BATCH_SIZE="8", VQA_MAX_BATCH_DELAY_MS="50",
                              VQA_MAX_NEW_TOKENS="4", VQA_LOG_FORMAT="json", VQA_VISIBILITY_TIMEOUT="60", VQA_SHUTDOWN_GRACE_S="10")
        work.mkdir(parents=True, exist_ok=True)
        worker = WorkerProcess(env={**env, "VQA_WORKER_NAME": "failover"}, log_path=work / "worker.log").start(ready_timeout=120)
        client = bench_stack.client(env)
        producer = Producer(client, f"{next(iter(bench_stack.image_urls.values()))}/tiny.png", tag=f"{work.name}")
        producer.start()
        time.sleep(RUN_BEFORE_KILL_S)
        assert group.replica_follows() == proxies[0].port, "the sentinels re-pointed the replica past the proxy"
        if stall_s:
            proxies[0].stall()
            time.sleep(stall_s)
        proxies[0].stop()  # the link breaks, its unsent stream with it; then the master dies
        group.kill_master()
        killed_at = time.monotonic()
        promoted_at = group.wait(group.promoted, 60, "no replica promoted")
        group.wait(lambda: any(at > killed_at for at in producer.accepted.values()), 60, "no submission accepted after the kill")
        first_after = min(at for at in producer.accepted.values() if at > killed_at)
        time.sleep(RUN_AFTER_RECOVERY_S)
        producer.stopping.set()
        producer.join(timeout=30)
        accepted = dict(producer.accepted)
        after = [job_id for job_id, at in accepted.items() if at > killed_at]
        records = {job_id: _wait_record(client, job_id, timeout_s=120) for job_id in after}  # all must finish
        killed_wall = time.time() - (time.monotonic() - killed_at)
        # First asked after the promotion: published on the new master, so its record means the worker follows it.
        fresh = [records[job_id].finished_at.timestamp() for job_id in after if producer.first_asked[job_id] > promoted_at]
        time.sleep(10)  # stragglers: survivors from before the kill the worker still held
        lost = [job_id for job_id in accepted if client.result(job_id) is None]
        runs = _runs_per_job(worker.log)
        client.close()
        return {
            "accepted": len(accepted),
            "accepted_before_kill": len(accepted) - len(after),
            "lost": len(lost),
            "duplicates": sum(1 for job_id in accepted if runs[job_id] > 1),
            "refused_submissions": producer.refused,
            "promoted_s": round(promoted_at - killed_at, 2),
            "producer_back_s": round(first_after - killed_at, 2),
            "worker_back_s": round(min(fresh) - killed_wall, 2) if fresh else None,
            "slowest_submit_s": round(producer.slowest_s, 2),
            "worker_survived": worker.proc is not None and worker.proc.poll() is None,
        }
    finally:
        if worker is not None:
            worker.stop(timeout=30)
        group.stop()
        for proxy in proxies:
            proxy.stop()


def _wait_record(client: VQAClient, job_id: str, *, timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    while (record := client.result(job_id)) is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} accepted after the kill did not finish within {timeout_s} s")
        time.sleep(0.1)
    return record


def _runs_per_job(log: str) -> Counter[str]:
    """Model runs per job: its ids in the worker's "batch ran" lines (worker/joblog.py)."""
    runs: Counter[str] = Counter()
    for line in log.splitlines():
        if '"job_ids"' not in line:
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        runs.update(entry.get("job_ids") or [])
    return runs


def summarize(rounds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for link in ("healthy", "lagging"):
        for accept in (0, 1):
            group = [r for r in rounds if r["link"] == link and r["accept_replicas"] == accept]
            if not group:
                continue
            rows.append({
                "link": link, "accept_replicas": accept, "rounds": len(group),
                "accepted": sum(r["accepted"] for r in group), "lost": sum(r["lost"] for r in group),
                "lost_per_round": [r["lost"] for r in group], "duplicates": sum(r["duplicates"] for r in group),
                "refused_submissions": sum(r["refused_submissions"] for r in group),
                "promoted_s_median": round(statistics.median(r["promoted_s"] for r in group), 2),
                "producer_back_s_median": round(statistics.median(r["producer_back_s"] for r in group), 2),
                "worker_back_s_median": round(statistics.median(r["worker_back_s"] for r in group if r["worker_back_s"] is not None), 2),
                "slowest_submit_s": max(r["slowest_submit_s"] for r in group),
            })
    return rows


def markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    lines = [
        "# Redis failover (python -m bench.failover)", "",
        f"`{meta['command']}` on {meta['machine']}, Python {meta['python']}, {meta['started_at']}; "
        f"lagging link: replica link stalled {meta['stall_ms']} ms before the SIGKILL.", "",
        "| link | VQA_ACCEPT_REPLICAS | rounds | accepted | lost (per round) | duplicates | refused submits | "
        "promoted s | producer back s | worker back s | slowest submit s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["summary"]:
        lines.append(
            f"| {row['link']} | {row['accept_replicas']} | {row['rounds']} | {row['accepted']} | {row['lost']} "
            f"({', '.join(map(str, row['lost_per_round']))}) | {row['duplicates']} | {row['refused_submissions']} | "
            f"{row['promoted_s_median']} | {row['producer_back_s_median']} | {row['worker_back_s_median']} | {row['slowest_submit_s']} |"
        )
    lines += ["", "Times are medians, seconds after the SIGKILL. Lost: accepted (submit returned) and no record in S3 at the end.",
              "Producer back: first submission accepted after the kill (with VQA_ACCEPT_REPLICAS=1 and no replica left, only",
              "retries of jobs that had meanwhile finished are). Worker back: first record of a job first offered after the promotion."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
