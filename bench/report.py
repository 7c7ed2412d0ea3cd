"""Turn one benchmark result (a dict, also written as JSON) into a Markdown report and a PNG plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def targets(result: dict[str, Any], *, at_batch: int) -> list[dict[str, Any]]:
    """The CPU targets of issue 5, each with the measured value and whether it holds."""
    rows: list[dict[str, Any]] = []
    point = next((p for p in result.get("throughput", []) if p["batch_size"] == at_batch), None)
    if point is not None:
        rows.append(_target(f"end-to-end / direct at batch {at_batch}", ">= 0.95", point["e2e_ratio"], point["e2e_ratio"] is not None and point["e2e_ratio"] >= 0.95))
        rows.append(_target(f"100 ms image latency: throughput vs. no latency (batch {at_batch})", ">= 0.90", point["delay_ratio"],
                            point["delay_ratio"] is not None and point["delay_ratio"] >= 0.90))
        pipeline = point.get("e2e_cpu_ms_pipeline")
        if pipeline is not None and result["meta"].get("torch_threads_pinned") == 1:
            rows.append(_target(f"pipeline CPU per job beyond the model, decoding and preprocessing (ms, batch {at_batch})", "<= 5",
                                pipeline, pipeline <= 5))
        s3 = point.get("e2e_s3_requests_per_job")
        if s3 is not None:
            rows.append(_target(f"S3 requests per job, first deliveries (batch {at_batch})", "<= 1", s3, s3 <= 1))
    enqueue = result.get("enqueue")
    if enqueue:
        rows.append(_target("bulk enqueue / send_task loop", ">= 3x", enqueue["bulk_vs_send_task_loop"], enqueue["bulk_vs_send_task_loop"] >= 3))
    three = next((row for row in result.get("prefix", []) if row["questions_per_image"] == 3), None)
    if three is not None:
        rows.append(_target("shared image prefix: questions/s with / without at 3 questions per image", ">= 2x", three["speedup"],
                            three["speedup"] >= 2))
    memory = result.get("memory")
    if memory:
        growth = memory["rss_growth_second_half_mib"]
        # "No growth": under 1% of the RSS (or 2 MiB) over the second half of the run.
        limit = max(2.0, 0.01 * memory["rss_mib_end"])
        rows.append(_target(f"worker RSS growth over the 2nd half of {memory['jobs']} jobs (MiB)", f"<= {limit:.1f}", growth,
                            growth is not None and growth <= limit))
    return rows


def _target(name: str, goal: str, measured: Any, holds: bool) -> dict[str, Any]:
    return {"target": name, "goal": goal, "measured": measured, "holds": bool(holds)}


def markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    lines = [
        f"# Benchmark results ({meta['profile']} profile)",
        "",
        f"Command: `{meta['command']}`  ",
        f"Run at {meta['started_at']} on {meta['host']['cpu_model']} ({meta['host']['cpus']} CPUs), "
        f"torch {meta['versions']['torch']}, transformers {meta['versions']['transformers']}; took {meta['duration_s']:.0f} s.  ",
        f"Load average (1 min) during the run: min {meta['load']['min']}, mean {meta['load']['mean']}, max {meta['load']['max']} "
        f"({meta['load']['samples']} samples).  ",
        f"Model: `{meta['model']['size']}` random-weight LLaVA-NeXT ({meta['model']['parameters_m']} M parameters, "
        f"{meta['model']['prompt_tokens']} prompt tokens per uniform job), quantization {meta['model']['quantization']}, "
        f"{meta['generation']['max_new_tokens']} new tokens per answer (forced).",
    ]
    if result.get("throughput"):
        lines += [
            "",
            "## Throughput (images/s)",
            "",
            "| batch | direct | end-to-end | e2e / direct | e2e, 100 ms images | 100 ms / e2e | mean batch (e2e) | model busy (e2e) "
            "| model busy (100 ms) |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
    for p in result.get("throughput", []):
        lines.append(
            f"| {p['batch_size']} | {p['direct_ips']} | {p['e2e_ips']} | {p['e2e_ratio']} | {p['delay_ips']} | {p['delay_ratio']} "
            f"| {p['e2e_mean_batch']} | {p['e2e_utilisation']} | {p['delay_utilisation']} |"
        )
    for p in result.get("throughput", []):
        if p.get("rounds", 1) > 1:
            lines.append(f"\nBatch {p['batch_size']}: the median of {p['rounds']} rounds, each a direct, an end-to-end and a 100 ms run back "
                         f"to back; e2e / direct per round {p['round_e2e_ratios']}, 100 ms / e2e per round {p['round_delay_ratios']}.")
    lines += _cpu_table(result.get("throughput", []), torch_threads=meta.get("torch_threads_pinned"))
    latency = result.get("latency")
    if latency:
        lines += ["", f"## Latency, submit to record (open loop, Poisson arrivals)", "",
                  f"Worker settings: {latency['settings']}; capacity {latency['capacity_per_s']} jobs/s (end-to-end, batch {latency['batch_size']}).", "",
                  "| load | rate (jobs/s) | jobs | p50 ms | p95 ms | p99 ms | max ms | mean batch |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for run in latency["runs"]:
            lines.append(f"| {run['load']:.0%} | {run['rate_per_s']} | {run['jobs']} | {run['p50_ms']} | {run['p95_ms']} | {run['p99_ms']} "
                         f"| {run['max_ms']} | {run['mean_batch_size']} |")
    padding = result.get("padding")
    if padding:
        d = padding["direct"]
        lines += ["", "## Padding-aware batching (mixed image shapes)", "",
                  f"{d['images']} jobs, prompts of {d['prompt_tokens']['min']}-{d['prompt_tokens']['max']} tokens "
                  f"({d['prompt_tokens']['distinct']} distinct), batch {d['batch_size']}, VQA_MAX_BATCH_TOKENS={d['max_batch_tokens']}.", "",
                  "| where | batching | padding efficiency | images/s | mean batch |", "|---|---|---:|---:|---:|"]
        for label in ("fifo", "padding_aware"):
            lines.append(f"| model alone | {label} | {d[label]['padding_efficiency']} | {d[label]['images_per_s']} | {d[label]['mean_batch_size']} |")
        for label, run in padding.get("end_to_end", {}).items():
            lines.append(f"| end-to-end | {label} | {run.get('padding_efficiency')} | {run['images_per_s']} | {run['mean_batch_size']} |")
    prefix = result.get("prefix")
    if prefix:
        lines += ["", "## Shared image prefixes (several questions per image)", "",
                  f"The same prepared jobs with `VQA_SHARE_IMAGE_PREFIX` off and on, in batches of {prefix[0].get('batch', 'one image')} "
                  "formed image by image (an image's questions together, the next image's after them, as the batcher's affinity "
                  "orders them); with sharing a batch is one prefill of its distinct image prefixes and one generate. "
                  f"Medians of {len(prefix[0].get('speedup_per_round', [0]))} off/on rounds; the speedup of each round in the last column.", "",
                  "| questions/image | questions | q/s without | q/s with | speedup | prompt tokens computed/question without | with "
                  "| greedy answers agreeing | speedup per round |", "|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for row in prefix:
            lines.append(f"| {row['questions_per_image']} | {row['questions']} | {row['qps_without']} | {row['qps_with']} | {row['speedup']}x "
                         f"| {row['prompt_tokens_per_question_without']} | {row['prompt_tokens_per_question_with']} "
                         f"| {row['answers_agreeing']}/{row['questions']} | {', '.join(map(str, row.get('speedup_per_round', [])))} |")
    if prefix and "speedup_one_token" in prefix[0]:
        lines += ["", "Where the time goes: the same batches with one new token (a prefill and nothing else), off and on, medians "
                  "of the same rounds. Sharing saves prefill only, so the speedup it can give with full answers follows from "
                  "the prefill time it saves; the measured speedup beside it.", "",
                  "| questions/image | q/s, one token, without | with | speedup, one token | decode share of a question without "
                  "| speedup expected from the prefill saved | measured speedup |", "|---:|---:|---:|---:|---:|---:|---:|"]
        for row in prefix:
            lines.append(f"| {row['questions_per_image']} | {row['qps_one_token_without']} | {row['qps_one_token_with']} "
                         f"| {row['speedup_one_token']}x | {row['decode_share_without']:.0%} | {_cell(row['speedup_expected_from_prefill'])}x "
                         f"| {row['speedup']}x |")
    shared_e2e = result.get("prefix_end_to_end")
    if shared_e2e:
        lines += ["", "## Shared image prefixes end to end", "",
                  f"A worker at batch {result['meta'].get('prefix_batch_size')}; every image's questions submitted at once, image by image "
                  "(img1-q1, img1-q2, ..., img2-q1, ...: what a bulk line's `questions: [...]` publishes) or interleaved across images "
                  "(img1-q1, img2-q1, ..., img1-q2, ...: independent submissions); `VQA_SHARE_IMAGE_PREFIX` off and on (one fetch per "
                  "image for the jobs in the worker at once, the batcher puts one image's questions together). Questions/s: wall clock, "
                  f"submit to the last record; medians of {shared_e2e[0].get('rounds', 1)} alternating off/on rounds, each round's "
                  "speedup in the last column.", "",
                  "| order | questions/image | questions | q/s without | q/s with | speedup | image fetches/question without | with "
                  "| mean batch without | with | speedup per round |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for row in shared_e2e:
            lines.append(f"| {row['order']} | {row['questions_per_image']} | {row['questions']} | {row['qps_without']} | {row['qps_with']} "
                         f"| {row['speedup']}x | {row['fetches_per_question_without']} | {row['fetches_per_question_with']} "
                         f"| {row['mean_batch_size_without']} | {row['mean_batch_size_with']} "
                         f"| {', '.join(map(str, row['speedup_per_round']))} |")
    enqueue = result.get("enqueue")
    if enqueue:
        lines += ["", f"## Enqueue rate ({enqueue['jobs']} jobs)", "", "| path | jobs/s |", "|---|---:|"]
        for label in ("send_task_loop", "send_task_shared_producer", "submit_loop", "submit_many"):
            lines.append(f"| {label} | {enqueue[label]['jobs_per_s']} |")
        lines.append(f"\nBulk (`submit_many`, validation and dedupe included) vs. plain `send_task` loop: **{enqueue['bulk_vs_send_task_loop']}x**; "
                     f"vs. a loop sharing one producer: {enqueue['bulk_vs_shared_producer_loop']}x.")
    memory = result.get("memory")
    if memory:
        lines += ["", f"## Worker memory ({memory['jobs']} jobs, {memory['model']} model)", "",
                  f"{memory['seconds']} s, {memory['jobs_per_s']} jobs/s, {memory['failed']} failed. RSS MiB: first sample {memory['rss_mib_first']}, "
                  f"at half {memory['rss_mib_at_half']}, end {memory['rss_mib_end']}, max {memory['rss_mib_max']}; growth over the second half "
                  f"{memory['rss_growth_second_half_mib']} MiB, slope {memory['rss_slope_mib_per_1000_jobs']} MiB per 1000 jobs."]
    lines += ["", "## Targets", "", "| target | goal | measured | holds |", "|---|---|---:|---|"]
    for row in result.get("targets", []):
        lines.append(f"| {row['target']} | {row['goal']} | {row['measured']} | {'yes' if row['holds'] else '**no**'} |")
    return "\n".join(lines) + "\n"


def pipeline_cpu_ms(e2e: dict[str, Any]) -> float | None:
    """The worker's CPU per job beyond its model, decoding and preprocessing (each timed on its own thread: worker/cputime.py)."""
    worker = e2e["cpu_ms_per_job"].get("worker")
    stages = e2e.get("worker_cpu_ms_per_job") or {}
    if worker is None or not stages:
        return None
    return round(worker - sum(stages.values()), 1)


def _cpu_table(points: list[dict[str, Any]], *, torch_threads: int | None) -> list[str]:
    """CPU milliseconds per job: the model alone vs. every process of the end-to-end run, and the worker's split."""
    points = [p for p in points if p.get("direct_cpu_ms_per_image") is not None and p.get("e2e_cpu_ms_worker") is not None]
    if not points:
        return []
    exact = torch_threads == 1
    names = ("worker", "s3_server", "redis", "bench")
    lines = ["", "## Where the CPU goes (ms of CPU per job, all threads)", "",
             "On a CPU host every process below shares the cores with the model, so with the cores saturated the "
             "end-to-end / direct ratio can reach at most direct / end-to-end total. The worker's CPU is split by the "
             "worker itself: the model (its thread's CPU inside the batched generate call), decoding and preprocessing "
             "(the fetch threads' CPU inside them), each read from its `vqa_*_cpu_seconds_total` counters; \"pipeline\" is "
             "the rest of the worker's CPU, the queue's own cost per job (Redis, S3, messages, records, logging). "
             + ("Torch ran one intra-op thread (`--torch-threads 1`), so the model's CPU is all on the thread it is timed on "
                "and the pipeline figure is exact." if exact else
                "Torch ran its default intra-op threads: their helper threads' CPU is not in the model column, so the "
                "pipeline figure is not shown (run with `--torch-threads 1`).")
             + " S3 requests per job are counted from the S3 server's access log; Redis commands per job from the Redis "
             "server's `INFO commandstats`, every client's (the producer's submission and the bench's result listener "
             "included, as well as the worker's).", "",
             "| batch | direct (model + preprocessing) | e2e: worker | worker: model | worker: decode + preprocessing "
             "| worker: pipeline | e2e: S3 server | e2e: Redis | e2e: bench (client, listener, images) | e2e total "
             "| direct / e2e total | S3 requests / job | Redis commands / job |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for p in points:
        total = sum(p.get(f"e2e_cpu_ms_{name}") or 0.0 for name in names)
        model, decode, preprocess = (p.get(f"e2e_cpu_ms_{stage}") for stage in ("model", "decode", "preprocess"))
        inputs = None if decode is None or preprocess is None else round(decode + preprocess, 1)
        pipeline = p.get("e2e_cpu_ms_pipeline") if exact else None
        cells = " | ".join(str(p.get(f"e2e_cpu_ms_{name}")) for name in names[1:])
        lines.append(f"| {p['batch_size']} | {p['direct_cpu_ms_per_image']} | {p.get('e2e_cpu_ms_worker')} | {_cell(model)} "
                     f"| {_cell(inputs)} | {'**' + str(pipeline) + '**' if pipeline is not None else 'n/a'} | {cells} "
                     f"| {round(total, 1)} | {round(p['direct_cpu_ms_per_image'] / total, 3) if total else None} "
                     f"| {p.get('e2e_s3_requests_per_job')} | {_cell(p.get('e2e_redis_commands_per_job'))} |")
    return lines


def _cell(value: Any) -> str:
    return "n/a" if value is None else str(value)


def plot(result: dict[str, Any], path: Path) -> bool:
    """Throughput, latency and memory in one PNG; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    points = result.get("throughput", [])
    if points:
        sizes = [p["batch_size"] for p in points]
        for key, label in (("direct_ips", "model alone"), ("e2e_ips", "end-to-end"), ("delay_ips", "end-to-end, +100 ms per image")):
            axes[0].plot(sizes, [p[key] for p in points], marker="o", label=label)
        axes[0].set_xscale("log", base=2)
        axes[0].set_xticks(sizes, [str(s) for s in sizes])
        axes[0].set_xlabel("max batch size")
        axes[0].set_ylabel("images/s")
        axes[0].set_title("Throughput")
        axes[0].legend()
    latency = result.get("latency")
    if latency:
        runs = latency["runs"]
        width = 0.25
        for i, key in enumerate(("p50_ms", "p95_ms", "p99_ms")):
            axes[1].bar([j + (i - 1) * width for j in range(len(runs))], [r[key] for r in runs], width, label=key.removesuffix("_ms"))
        axes[1].set_xticks(range(len(runs)), [f"{r['load']:.0%} load\n{r['rate_per_s']}/s" for r in runs])
        axes[1].set_ylabel("submit to record, ms")
        axes[1].set_title(f"Latency (batch {latency['batch_size']})")
        axes[1].legend()
    memory = result.get("memory")
    if memory:
        samples = memory["samples"]
        axes[2].plot([s["jobs_done"] for s in samples], [s["rss_mib"] for s in samples])
        axes[2].set_xlabel("jobs done")
        axes[2].set_ylabel("worker RSS, MiB")
        axes[2].set_title(f"Worker memory ({memory['model']} model)")
        low = min(s["rss_mib"] for s in samples)
        axes[2].set_ylim(bottom=0, top=max(s["rss_mib"] for s in samples) * 1.1 if low else None)
    fig.suptitle(f"vqa-queue benchmark ({result['meta']['profile']}, {result['meta']['host']['cpus']} CPUs)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
