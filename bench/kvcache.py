"""Decode steps with Transformers' ``DynamicCache`` (a ``torch.cat`` of the whole cache per step) vs worker/kvcache.py's ``ReservedCache`` (in place).

    .venv/bin/python -m bench.kvcache --out docs/benchmarks/kv-cache/

Engine rows: ``VQAModel.generate_batch`` on the bench model, batches of 640x480 photos, 16 new
tokens, once with the worker's cache and once with the ``DynamicCache`` that ``generate``
makes by itself (the engine's cache factory swapped, in this script only): images/s, ms per
decode step (from a 1-token run of the same batches) and how many greedy answers agree.
Language-model rows: the text model alone at longer prompts (random token ids; the 7B's
prompts are ~2,000-2,900 tokens): ms per decode step, batch 1 and 8. Rounds alternate the
order of the two caches, so drift in the host's load falls on both; the medians are reported.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import DynamicCache

from bench.model import QUESTION, load_images, write_workloads
from producer.schema import GenerationSettings
from producer.settings import Settings
from worker.dev.tiny_model import build_tiny_model
from worker.kvcache import ReservedCache
from worker.model import VQAModel

CACHES = ("dynamic", "reserved")
NEW_TOKENS = 16


def _cache(kind: str, config: Any, reserve: int) -> DynamicCache:
    return DynamicCache(config=config) if kind == "dynamic" else ReservedCache(config, reserve=reserve)


def engine_rows(model: VQAModel, images: list[Any], *, batch: int, rounds: int) -> dict[str, Any]:
    """images/s and ms per decode step through the engine with each cache; answers compared."""
    jobs = [model.prepare(image, QUESTION) for image in images]
    batches = [jobs[start : start + batch] for start in range(0, len(jobs), batch)]
    full = GenerationSettings(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    one = GenerationSettings(max_new_tokens=1, min_new_tokens=1)
    config = model.model.config.get_text_config()
    factory = model._new_cache
    times: dict[str, dict[str, list[float]]] = {kind: {"full": [], "one": []} for kind in CACHES}
    answers: dict[str, list[str]] = {}
    try:
        for round_ in range(rounds):
            for kind in CACHES if round_ % 2 == 0 else CACHES[::-1]:
                model._new_cache = lambda *, reserve, kind=kind: _cache(kind, config, reserve)  # type: ignore[method-assign]
                model.generate_batch(batches[0], full)  # warm-up
                for name, generation in (("full", full), ("one", one)):
                    start = time.perf_counter()
                    got = [answer.text for chunk in batches for answer in model.generate_batch(chunk, generation)]
                    times[kind][name].append(time.perf_counter() - start)
                    if name == "full":
                        answers[kind] = got
    finally:
        model._new_cache = factory  # type: ignore[method-assign]
    row: dict[str, Any] = {"quantization": model.quantization, "batch": batch, "images": len(jobs), "rounds": rounds,
                           "prompt_tokens": jobs[0].num_tokens, "new_tokens": NEW_TOKENS}
    for kind in CACHES:
        full_s, one_s = statistics.median(times[kind]["full"]), statistics.median(times[kind]["one"])
        row[f"images_per_s_{kind}"] = round(len(jobs) / full_s, 3)
        row[f"decode_step_ms_{kind}"] = round((full_s - one_s) / (len(batches) * (NEW_TOKENS - 1)) * 1000, 2)
    row["speedup"] = round(row["images_per_s_reserved"] / row["images_per_s_dynamic"], 3)
    row["answers_agreeing"] = sum(a == b for a, b in zip(answers["dynamic"], answers["reserved"], strict=True))
    return row


def language_model_rows(model: VQAModel, *, prompt_tokens: int, batch: int, rounds: int, steps: int = 15) -> dict[str, Any]:
    """ms per decode step of the text model alone after a ``prompt_tokens`` prefill, with each cache."""
    config = model.model.config.get_text_config()
    ids = torch.randint(5, config.vocab_size - 1, (batch, prompt_tokens), generator=torch.Generator().manual_seed(prompt_tokens))
    step_ms: dict[str, list[float]] = {kind: [] for kind in CACHES}
    tokens: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        for round_ in range(rounds):
            for kind in CACHES if round_ % 2 == 0 else CACHES[::-1]:
                cache = _cache(kind, config, steps)
                out = model.model(input_ids=ids.to(model.model.device), cache=cache, use_cache=True, logits_to_keep=1)
                token, produced = out.logits[:, -1:].argmax(-1), []
                start = time.perf_counter()
                for step in range(steps):
                    mask = torch.ones(batch, prompt_tokens + step + 1, dtype=torch.long, device=model.model.device)
                    out = model.model(input_ids=token, attention_mask=mask, cache=cache, use_cache=True)
                    token = out.logits[:, -1:].argmax(-1)
                    produced.append(token)
                step_ms[kind].append((time.perf_counter() - start) / steps * 1000)
                tokens[kind] = torch.cat(produced, dim=1)
    row: dict[str, Any] = {"quantization": model.quantization, "batch": batch, "prompt_tokens": prompt_tokens, "rounds": rounds}
    for kind in CACHES:
        row[f"decode_step_ms_{kind}"] = round(statistics.median(step_ms[kind]), 2)
    row["speedup"] = round(row["decode_step_ms_dynamic"] / row["decode_step_ms_reserved"], 3)
    row["same_tokens"] = bool(torch.equal(tokens["dynamic"], tokens["reserved"]))
    return row


def _markdown(result: dict[str, Any]) -> str:
    lines = [f"# KV cache: DynamicCache vs ReservedCache ({result['meta']['date']})", "", f"`{result['meta']['command']}`", "",
             f"## Engine (VQAModel.generate_batch, {result['meta']['model']} model, 640x480 photos)", "",
             "| quantization | batch | prompt tokens | images/s dynamic | images/s reserved | x | decode step ms dynamic | reserved | answers agreeing |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["engine"]:
        lines.append(f"| {r['quantization']} | {r['batch']} | {r['prompt_tokens']} | {r['images_per_s_dynamic']} | {r['images_per_s_reserved']} "
                     f"| {r['speedup']} | {r['decode_step_ms_dynamic']} | {r['decode_step_ms_reserved']} | {r['answers_agreeing']}/{r['images']} |")
    lines += ["", "## Language model alone, longer prompts", "",
              "| quantization | batch | prompt tokens | decode step ms dynamic | reserved | x | same tokens |", "|---|---:|---:|---:|---:|---:|---|"]
    for r in result["language_model"]:
        lines.append(f"| {r['quantization']} | {r['batch']} | {r['prompt_tokens']} | {r['decode_step_ms_dynamic']} | {r['decode_step_ms_reserved']} "
                     f"| {r['speedup']} | {r['same_tokens']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.kvcache", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("tiny", "bench"), default="bench", help="random-weight model to build")
    parser.add_argument("--quantization", default="none,nf4", help="comma-separated")
    parser.add_argument("--batch-sizes", default="1,8", help="comma-separated")
    parser.add_argument("--images", type=int, default=16, help="photos per engine row")
    parser.add_argument("--prompt-tokens", default="320,1000,2400", help="language-model rows, comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, help="directory for kvcache.{json,md}")
    args = parser.parse_args()
    started = time.perf_counter()
    result: dict[str, Any] = {"engine": [], "language_model": []}
    with tempfile.TemporaryDirectory(prefix="vqa-kvcache-") as tmp:
        model_dir = build_tiny_model(Path(tmp) / "model", size=args.size)
        loads = write_workloads(Path(tmp) / "images", uniform=args.images, mixed=0)
        images = load_images(Path(tmp) / "images", loads["uniform"].files)
        for quantization in args.quantization.split(","):
            model = VQAModel.load(Settings(model=str(model_dir), quantization=quantization, device="cpu", share_image_prefix=False))
            for batch in (int(part) for part in args.batch_sizes.split(",")):
                row = engine_rows(model, images, batch=batch, rounds=args.rounds)
                result["engine"].append(row)
                print(json.dumps(row), flush=True)
                for length in (int(part) for part in args.prompt_tokens.split(",")):
                    row = language_model_rows(model, prompt_tokens=length, batch=batch, rounds=args.rounds)
                    result["language_model"].append(row)
                    print(json.dumps(row), flush=True)
    result["meta"] = {
        "command": " ".join(shlex.quote(part) for part in ["python", "-m", "bench.kvcache", *sys.argv[1:]]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "duration_s": round(time.perf_counter() - started, 1),
        "model": args.size,
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__},
    }
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "kvcache.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out / "kvcache.md").write_text(_markdown(result))
    print(_markdown(result))


if __name__ == "__main__":
    main()
