"""Bulk runs, measured: window and memory, publishing rate, collecting outcomes, kills of the submitter.

    .venv/bin/python -m bench.bulk                       # full profile -> docs/benchmarks/bulk.{json,md}
    .venv/bin/python -m bench.bulk --profile tiny --out /tmp/bulk   # seconds; what the tests run

Full profile: a 1,000,000-line manifest with no worker (window 5,000, then off); 20,000 jobs
published both ways; 100,000 outcomes collected; 10,000 jobs on the tiny model with the submitter
killed 3 times. Everything runs on a private stack (bench/stack.py). bench/bulk_sections.py says
what each section does; docs/benchmarks/README.md says what the figures mean.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import bulk_sections
from bench.stack import run_meta, sample_workdir, stack, write_report

SECTIONS = ("memory", "publish", "collect", "kill")


@dataclass(frozen=True)
class Profile:
    memory_lines: int
    window: int
    hold_s: float
    publish_jobs: int
    collect_jobs: int
    kill_jobs: int
    kills: int
    kill_window: int


PROFILES = {
    "full": Profile(memory_lines=1_000_000, window=5000, hold_s=20, publish_jobs=20_000, collect_jobs=100_000,
                    kill_jobs=10_000, kills=3, kill_window=1000),
    "tiny": Profile(memory_lines=3000, window=500, hold_s=2, publish_jobs=500, collect_jobs=600, kill_jobs=60, kills=1, kill_window=16),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bulk", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="full")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"), help="where bulk.json and bulk.md go")
    args = parser.parse_args(argv)
    sections = [name for name in SECTIONS if name in set(args.sections.split(","))]
    profile = PROFILES[args.profile]
    command = " ".join(shlex.quote(part) for part in [sys.executable.replace(os.getcwd() + "/", ""), "-m", "bench.bulk", *sys.argv[1:]])
    result = run(profile, name=args.profile, command=command, sections=sections)
    write_report(args.out, "bulk", result, markdown)
    return 0


def run(profile: Profile, *, name: str, command: str, sections: list[str]) -> dict[str, Any]:
    from worker.dev.tiny_model import build_tiny_model

    started = time.monotonic()
    result: dict[str, Any] = {"meta": run_meta(name, command)}
    with sample_workdir("vqa-bench-bulk-") as (work, images):
        with stack(images, delays=(0.0,)) as bench_stack:
            for section in sections:
                say(f"section {section}")
                if section == "memory":
                    result["memory"] = bulk_sections.memory(bench_stack, work, lines=profile.memory_lines, window=profile.window,
                                                            hold_s=profile.hold_s)
                elif section == "publish":
                    result["publish"] = bulk_sections.publish(bench_stack, work, jobs=profile.publish_jobs)
                elif section == "collect":
                    result["collect"] = bulk_sections.collect(bench_stack, work, jobs=profile.collect_jobs)
                elif section == "kill":
                    model = str(build_tiny_model(work / "tiny", size="tiny"))
                    worker_env = {"VQA_MAX_BATCH_SIZE": "16", "VQA_MAX_BATCH_DELAY_MS": "50", "VQA_MAX_NEW_TOKENS": "2",
                                  "VQA_QUANTIZATION": "none", "VQA_VISIBILITY_TIMEOUT": "120"}
                    result["kill"] = bulk_sections.kill(bench_stack, work, model=model, jobs=profile.kill_jobs, kills=profile.kills,
                                                        window=profile.kill_window, worker_env=worker_env)
                    bench_stack.stop_worker()
    result["meta"]["seconds"] = round(time.monotonic() - started, 1)
    return result


def say(message: str) -> None:
    print(f"[bench.bulk {datetime.now(UTC).strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    out = [f"# Bulk-run benchmark ({meta['profile']} profile)", "", f"`{meta['command']}` on {meta['machine']}, "
           f"Python {meta['python']}, {meta['started_at']}, {meta.get('seconds', '?')} s.", ""]
    if "memory" in result:
        memory = result["memory"]
        on, off = memory["window_on"], memory["window_off"]
        out += [
            f"## Window and memory: {memory['lines']:,}-line manifest ({memory['manifest_mb']} MB), no worker", "",
            "| | window on | window off |", "| --- | --- | --- |",
            f"| window | {memory['window']:,} | none |",
            f"| jobs queued | {on['queued']:,} (after {on['seconds_to_window']} s, then held {on['held_s']} s) | {off['queued']:,} ({off['seconds']} s, {off['jobs_per_s']:,} jobs/s) |",
            f"| producer peak RSS | {on['producer_peak_rss_mb']} MB (first/last at the window: {on['producer_rss_mb_first_last_at_window']}) | {off['producer_peak_rss_mb']} MB |",
            f"| Redis used_memory | {on['redis_used_mb_before']} MB before, {on['redis_used_mb_first_last_at_window']} MB at the window | {off['redis_used_mb_before']} → {off['redis_used_mb_after']} MB |",
            f"| Redis per queued job | | {off['redis_bytes_per_queued_job']:,} bytes |", "",
        ]
    if "publish" in result:
        publish = result["publish"]
        out += [
            f"## Publishing rate: {publish['jobs']:,} jobs, same manifest, same process", "",
            "| | jobs/s | seconds |", "| --- | --- | --- |",
            f"| bulk run (read, validate, encode, publish.lua per chunk) | {publish['bulk_run']['jobs_per_s']:,} | {publish['bulk_run']['seconds']} |",
            f"| send_task loop (read, validate, send_task per line) | {publish['send_task_loop']['jobs_per_s']:,} | {publish['send_task_loop']['seconds']} |",
            "", f"Bulk run / send_task loop: **{publish['bulk_vs_send_task_loop']}x** (target ≥ 5x).", "",
        ]
    if "collect" in result:
        collect = result["collect"]
        out += [
            f"## Collecting {collect['jobs']:,} finished outcomes (segments of {collect['segment_jobs']:,})", "",
            "| | outcomes/s | S3 requests | per job |", "| --- | --- | --- | --- |",
            f"| workers' bulk hook (count, log, seal, write segments and status.json) | {collect['workers']['outcomes_per_s']:,} | {collect['workers']['s3_requests']} | {collect['workers']['s3_requests_per_job']} |",
            f"| results file (`vqa bulk results`) | {collect['collect']['outcomes_per_s']:,} | {collect['collect']['s3_requests']} | {collect['collect']['s3_requests_per_job']} |",
            "",
        ]
    if "kill" in result:
        kill = result["kill"]
        out += [
            f"## {kill['jobs']:,} jobs on the tiny model, `vqa bulk submit` killed {kill['kills']} times (window {kill['window']:,})", "",
            f"- killed (SIGKILL) with {', '.join(f'{n:,}' for n in kill['published_when_killed'])} jobs published; the same command run again each time",
            f"- {kill['seconds']} s in all ({kill['jobs_per_s']} jobs/s); final state {kill['state']}, {kill['succeeded']:,} succeeded",
            f"- lost: **{kill['lost']}**, computed twice: **{kill['computed_twice']}**, never computed: {kill['never_computed']}, "
            f"results file complete: **{kill['results_complete']}** ({kill['results_lines']:,} lines)", "",
        ]
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
