"""The benchmark scripts themselves: `python -m bench --profile tiny` and `scripts/gpu_bench.py --config small` on the CPU.

Their figures mean nothing at these sizes; what is tested is that every section runs, reports
what the docs say it reports, and that the JSON a GPU run would commit is complete.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"

pytestmark = pytest.mark.slow


def _run(args: list[str], *, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_bench_tiny_profile_measures_every_section(tmp_path: Path) -> None:
    _run(["-m", "bench", "--profile", "tiny", "--out", str(tmp_path)], timeout=240)
    result = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "results.md").read_text().startswith("# Benchmark results (tiny profile)")

    [point] = result["throughput"]
    assert point["direct_ips"] > 0 and point["e2e_ips"] > 0 and point["delay_ips"] > 0
    assert point["e2e_ratio"] > 0 and point["delay_ratio"] > 0
    assert point["e2e_s3_requests_per_job"] == 1.0  # first deliveries: the conditional create of the record, nothing else
    # Every client's commands (submission, worker, listener): ~30 per job today; a per-job poll loop would show here.
    assert 0 < point["e2e_redis_commands_per_job"] < 60
    for run in (*result["end_to_end"], *result["end_to_end_delay"]):
        assert run["failed"] == 0 and run["jobs"] == 12
        assert 0 < run["model_utilisation"] <= 1.5
    assert all(run["fetch_ms_mean"] >= 100 for run in result["end_to_end_delay"])  # the image server's latency is real

    latency = result["latency"]
    assert [run["load"] for run in latency["runs"]] == [0.5, 0.9]
    for run in latency["runs"]:
        assert run["failed"] == 0 and 0 < run["p50_ms"] <= run["p95_ms"] <= run["p99_ms"] <= run["max_ms"]
    assert "VQA_MAX_BATCH_SIZE=4" in latency["settings"] and "VQA_MAX_BATCH_TOKENS" in latency["settings"]

    padding = result["padding"]["direct"]
    assert padding["prompt_tokens"]["distinct"] > 1  # mixed shapes really differ in image tokens
    assert padding["padding_aware"]["padding_efficiency"] >= padding["fifo"]["padding_efficiency"] - 1e-9

    prefix = {row["questions_per_image"]: row for row in result["prefix"]}
    assert sorted(prefix) == [1, 2, 3, 5]
    # One question per image has nothing to share; more share the image's prefill.
    assert prefix[1]["prompt_tokens_per_question_with"] == prefix[1]["prompt_tokens_per_question_without"]
    # Batches of 4 formed image by image split some images across two batches (each prefills it),
    # so the saving is short of 1/questions, but it grows with the questions per image.
    with_sharing = [prefix[n]["prompt_tokens_per_question_with"] for n in (1, 2, 3, 5)]
    assert with_sharing == sorted(with_sharing, reverse=True) and len(set(with_sharing)) == 4
    assert prefix[5]["prompt_tokens_per_question_with"] < prefix[5]["prompt_tokens_per_question_without"] / 2
    assert all(row["agreement_rate"] == 1.0 for row in prefix.values())
    # The one-token (prefill alone) runs are measured for every row and the bound computed from them
    # (timings at this size are noise: only that they were taken, not how they compare).
    assert all(row["qps_one_token_without"] > 0 and row["qps_one_token_with"] > 0 for row in prefix.values())
    assert all(row["speedup_expected_from_prefill"] is None or row["speedup_expected_from_prefill"] > 0 for row in prefix.values())
    # End to end: without sharing every job fetches its image; with it, an image's questions
    # submitted together (a bulk line's order) are in the worker at once and fetch it once.
    shared_e2e = {(row["order"], row["questions_per_image"]): row for row in result["prefix_end_to_end"]}
    assert sorted(shared_e2e) == sorted((order, n) for order in ("image by image", "interleaved") for n in (1, 2, 3, 5))
    assert all(row["failed"] == 0 and row["fetches_per_question_without"] == 1.0 for row in shared_e2e.values())
    assert shared_e2e[("image by image", 5)]["fetches_per_question_with"] <= 0.5

    grid = {row["image_grid"]: row for row in json.loads((tmp_path / "grid" / "results.json").read_text())["grid"]}
    assert sorted(grid) == ["1x1", "2x1", "2x2", "full"]
    assert grid["1x1"]["image_tokens_per_image"] < grid["full"]["image_tokens_per_image"]
    assert (tmp_path / "grid" / "results.md").read_text().startswith("# Image detail")

    enqueue = result["enqueue"]
    assert enqueue["submit_many"]["jobs_per_s"] > enqueue["send_task_loop"]["jobs_per_s"]

    memory = result["memory"]
    assert memory["jobs"] == 40 and memory["failed"] == 0
    assert memory["samples"][-1]["jobs_done"] == 40 and memory["rss_mib_end"] > 0

    assert {row["target"].split(" ")[0] for row in result["targets"]} >= {"end-to-end", "100", "bulk", "worker", "shared"}
    meta = result["meta"]
    assert meta["load"]["samples"] >= 1 and meta["versions"]["torch"] and "--profile tiny" in meta["command"]
    if (tmp_path / "results.png").exists():  # matplotlib is optional
        assert (tmp_path / "results.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_bulk_tiny_profile(tmp_path: Path) -> None:
    # The kill section runs a worker: tests/producer/bulk/test_bulk_e2e.py covers kill and resume.
    _run(["-m", "bench.bulk", "--profile", "tiny", "--sections", "memory,publish,collect", "--out", str(tmp_path)], timeout=180)
    result = json.loads((tmp_path / "bulk.json").read_text())
    memory = result["memory"]
    assert memory["window_on"]["queued"] == memory["window"] and memory["window_off"]["queued"] == memory["lines"]
    assert memory["window_off"]["redis_bytes_per_queued_job"] > 0 and memory["window_on"]["producer_peak_rss_mb"] > 0
    assert result["publish"]["bulk_vs_send_task_loop"] > 1
    collect = result["collect"]
    assert collect["collect"]["s3_requests_per_job"] < 0.05 and collect["workers"]["s3_requests_per_job"] < 0.05
    assert (tmp_path / "bulk.md").read_text().startswith("# Bulk-run benchmark (tiny profile)")


def test_bench_webhooks_tiny_profile(tmp_path: Path) -> None:
    _run(["-m", "bench.webhooks", "--profile", "tiny", "--out", str(tmp_path)], timeout=120)
    result = json.loads((tmp_path / "webhooks.json").read_text())
    assert result["burst"]["verified"] == result["burst"]["events"] == 20 and result["burst"]["deliveries_per_s"] > 0
    assert result["paced"]["verified"] == result["paced"]["events"] == 10
    assert 0 < result["paced"]["latency_p50_ms"] <= result["paced"]["latency_p95_ms"] <= result["paced"]["latency_max_ms"]
    assert (tmp_path / "webhooks.md").read_text().startswith("# Webhooks: one dispatcher's delivery rate and latency")


def test_bench_s3put_times_a_record_write_and_redis_round_trips(tmp_path: Path) -> None:
    _run(["-m", "bench.s3put", "--writes", "5", "--rounds", "2", "--out", str(tmp_path)], timeout=120)
    result = json.loads((tmp_path / "s3-put.json").read_text())
    for figure in ("s3_create_cpu_ms", "redis_get_cpu_ms", "redis_pipeline_of_8_cpu_ms", "thread_start_join_cpu_ms"):
        assert len(result[figure]) == 2 and all(ms > 0 for ms in result[figure]), figure
    assert result["record_bytes"] > 300
    assert (tmp_path / "s3-put.md").read_text().startswith("# One record write's CPU, alone")


def test_bench_fetchconn_times_a_fetch_on_new_and_kept_connections(tmp_path: Path) -> None:
    _run(["-m", "bench.fetchconn", "--fetches", "5", "--rounds", "2", "--out", str(tmp_path)], timeout=120)
    result = json.loads((tmp_path / "fetch-keepalive.json").read_text())
    for scheme in ("http", "https"):
        for figure in (f"{scheme}_new_cpu_ms", f"{scheme}_kept_cpu_ms"):
            assert len(result[figure]) == 2 and all(ms > 0 for ms in result[figure]), figure
        assert result[f"{scheme}_kept_reused"] == 20 + 2 * 5 - 1  # 20 unmeasured first: every fetch after the first reused one
    assert len(result["system_trust_store_context_cpu_ms"]) == 2 and all(ms > 0 for ms in result["system_trust_store_context_cpu_ms"])
    assert (tmp_path / "fetch-keepalive.md").read_text().startswith("# One image fetch's CPU, new connection vs. kept")


def test_gpu_bench_small_config_on_cpu(tmp_path: Path) -> None:
    _run([str(SCRIPTS / "gpu_bench.py"), "--config", "small", "--device", "cpu", "--out", str(tmp_path), "--batch-sizes", "1,2",
          "--max-new-tokens", "4", "--repeats", "1", "--baseline-images", "2", "--image-grid", "full,1x1",
          "--questions-per-image", "1,3"], timeout=240)
    result = json.loads((tmp_path / "gpu_results.json").read_text())
    meta = result["meta"]
    # What a later GPU run must record to be committed as is.
    assert meta["card"] and meta["command"].startswith("python scripts/gpu_bench.py --config small")
    assert {"torch", "transformers", "bitsandbytes", "cuda", "flash_attn"} <= set(meta["versions"])
    assert meta["config"] == "bench/llava-next-small-config.json"
    assert result["baseline"]["images_per_s"] > 0
    assert [v["error"] for v in result["variants"] if "error" in v] == []  # a variant's failure is recorded, not raised
    assert [(v["dtype"], v["attention"], v["image_grid"]) for v in result["variants"]] == [
        ("fp32", "sdpa", "full"), ("fp32", "sdpa", "1x1"), ("nf4", "sdpa", "full"), ("nf4", "sdpa", "1x1")]
    # Less detail, fewer image tokens (the 640x480 picture takes a 2-tile grid at full).
    assert result["variants"][1]["image_tokens"] < result["variants"][0]["image_tokens"]
    for variant in result["variants"]:
        assert [row["batch_size"] for row in variant["batches"]] == [1, 2]
        for row in variant["batches"]:
            assert row["images_per_s"] > 0 and row["prompt_tokens_per_s"] > 0
            # None only where the one-token runs came out slower than the full ones (noise at 4 tokens).
            assert row["generated_tokens_per_s"] is None or row["generated_tokens_per_s"] > 0
    # The shared-prefix rows, through the worker's engine, at the first grid of each variant only.
    assert [[r["questions_per_image"] for r in v.get("shared_prefix", [])] for v in result["variants"]] == [[1, 3], [], [1, 3], []]
    for variant in (result["variants"][0], result["variants"][2]):
        one, three = variant["shared_prefix"]
        assert one["questions"] == 8 and three["questions"] == 24
        # One question per image shares nothing; three share each image's prefix.
        assert one["prompt_tokens_per_question_with"] == one["prompt_tokens_per_question_without"]
        assert three["prompt_tokens_per_question_with"] < three["prompt_tokens_per_question_without"] / 2
        assert three["questions_per_s_with"] > 0 and three["questions_per_s_without"] > 0
    assert result["variants"][0]["shared_prefix"][1]["answers_agreeing"] == 24  # fp32: greedy answers equal shared or not
    text = (tmp_path / "gpu_results.md").read_text()
    assert "| nf4 | sdpa | 1x1 |" in text and "| fp32 | sdpa | 3 | 24 | 8 |" in text


def test_gpu_host_imports_need_no_queue_or_aws_packages() -> None:
    """What a lent GPU host runs (scripts/gpu_bench.py, bench.preprocess) imports without celery, redis or the AWS SDK.

    Its image has none of them and no registry: scripts/gpu_wheels.sh carries only what these
    imports need (docs/benchmarks/README.md, "GPU figures").
    """
    blocked = ["celery", "redis", "boto3", "botocore", "s3transfer", "fastapi", "prometheus_client"]
    code = "\n".join([
        "import sys",
        *(f"sys.modules[{name!r}] = None" for name in blocked),  # an import of any of them raises ImportError
        f"sys.path.insert(0, {str(SCRIPTS)!r})",
        "import gpu_bench, worker.model, worker.prefix, bench.preprocess",
        "print('imported')",
    ])
    done = _run(["-c", code], timeout=120)
    assert done.stdout.strip().endswith("imported")


def test_gpu_bench_counts_image_tokens_like_the_processor(tiny_model_dir: Path) -> None:
    """gpu_bench has no tokenizer for the 7B: its image-token count must equal the real processor's."""
    sys.path.insert(0, str(SCRIPTS))
    try:
        from gpu_bench import image_token_count
    finally:
        sys.path.remove(str(SCRIPTS))
    from PIL import Image
    from transformers import LlavaNextConfig, LlavaNextProcessor

    processor = LlavaNextProcessor.from_pretrained(tiny_model_dir)
    config = LlavaNextConfig.from_pretrained(tiny_model_dir)
    for width, height in [(640, 480), (480, 640), (1000, 250), (33, 77), (96, 96), (300, 500)]:
        encoded = processor(images=[Image.new("RGB", (width, height))], text=["<image>"], return_tensors="pt")
        expected = int((encoded["input_ids"] == config.image_token_id).sum())
        assert image_token_count(config, height, width) == expected, (width, height)


def test_bench_preprocess_reports_every_size_and_pool(tmp_path: Path) -> None:
    _run(["-m", "bench.preprocess", "--out", str(tmp_path), "--repeats", "1", "--seconds", "0.5", "--workers", "1"], timeout=180)
    result = json.loads((tmp_path / "preprocess.json").read_text())
    assert [row["size"] for row in result["per_image"]] == ["640x480", "1280x960", "1920x1080", "4032x3024"]
    assert all(row["decode_ms"] > 0 and row["preprocess_ms_pil"] > 0 for row in result["per_image"])
    # Both prefix keys are timed per size; the 7B's anyres grid gives a photo more than one tile.
    assert all(row["key_ms_tiles"] > 0 and row["key_ms_source"] > 0 and row["tiles"] > 1 for row in result["per_image"])
    # The draft decode keeps at least the target grid: a phone photo comes out no smaller than 672x672.
    width, height = map(int, result["per_image"][-1]["draft_size"].split("x"))
    assert width >= 672 and height >= 672 and width < 4032
    assert [(run["pool"], run["workers"]) for run in result["pools"]] == [
        ("threads", 1), ("processes", 1), ("worker threads", 1), ("worker processes", 1)]
    assert all(run["images_per_s"] > 0 and run["model_stall_ms_per_s"] >= 0 for run in result["pools"])
    assert (tmp_path / "preprocess.md").read_text().startswith("# The GPU host's CPU side")
