"""The benchmark's workloads and the model-alone measurements (direct throughput, padding).

Workloads are deterministic pictures written to disk, so the direct runs and the end-to-end
runs see the same bytes: ``uniform`` (one shape, so every prompt has the same length and no
batch pads: it isolates pipeline overhead) and ``mixed`` (shapes whose anyres grids give
different image-token counts: what padding-aware batching is for).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from producer.schema import GenerationSettings
from worker.batching import MicroBatcher, padding_efficiency, prefetch_batches

QUESTION = "What is shown in this image? Answer briefly."
UNIFORM_SHAPE = (640, 480)
# Wide, tall, square and small pictures: anyres picks different tile grids for them.
MIXED_SHAPES = [(640, 480), (480, 640), (1000, 250), (250, 1000), (400, 400), (800, 200), (96, 96), (300, 500)]


@dataclass(frozen=True)
class Workload:
    name: str
    files: list[str]  # names under the image directory, in submission order


def write_workloads(directory: Path, *, uniform: int, mixed: int) -> dict[str, Workload]:
    """Draw the pictures once (JPEG, like photos from users) and return both workloads."""
    directory.mkdir(parents=True, exist_ok=True)
    loads = {
        "uniform": Workload("uniform", [_draw(directory, f"u{i:04d}.jpg", UNIFORM_SHAPE, i) for i in range(uniform)]),
        "mixed": Workload(
            "mixed", [_draw(directory, f"m{i:04d}.jpg", MIXED_SHAPES[(i * 5) % len(MIXED_SHAPES)], i) for i in range(mixed)]
        ),
    }
    return loads


def _draw(directory: Path, name: str, size: tuple[int, int], seed: int) -> str:
    path = directory / name
    if not path.exists():
        width, height = size
        image = Image.new("RGB", size, ((37 * seed) % 256, (91 * seed) % 256, (53 * seed + 80) % 256))
        draw = ImageDraw.Draw(image)
        for k in range(6):
            x0, y0 = (seed * 13 + k * 47) % width, (seed * 29 + k * 31) % height
            colour = ((seed + 60 * k) % 256, (200 - 30 * k) % 256, (seed * 7 + k * 40) % 256)
            draw.rectangle([x0, y0, min(width - 1, x0 + width // 3), min(height - 1, y0 + height // 4)], fill=colour)
        image.save(path, quality=90)
    return name


def load_images(directory: Path, files: list[str]) -> list[Image.Image]:
    """Decode once, up front: the direct runs time the model (and its preprocessing) only."""
    return [Image.open(directory / name).convert("RGB") for name in files]


def direct_throughput(model: Any, images: list[Image.Image], *, batch: int, generation: GenerationSettings) -> dict[str, Any]:
    """Images/s of ``VQAModel.generate`` alone in batches of ``batch`` (after one warm-up batch)."""
    questions = [QUESTION] * len(images)
    model.generate(images[:batch], questions[:batch], generation)
    start, cpu_start = time.perf_counter(), time.process_time()
    batch_s = []
    for first in range(0, len(images), batch):
        t = time.perf_counter()
        model.generate(images[first : first + batch], questions[first : first + batch], generation)
        batch_s.append(time.perf_counter() - t)
    seconds, cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
    return {
        "batch_size": batch,
        "images": len(images),
        "seconds": round(seconds, 3),
        "images_per_s": round(len(images) / seconds, 3),
        "ms_per_image": round(1000 * seconds / len(images), 1),
        "batch_ms_median": round(1000 * sorted(batch_s)[len(batch_s) // 2], 1),
        "cpu_ms_per_image": round(1000 * cpu_s / len(images), 1),  # preprocessing and the model, all threads
    }


def plan_batches(costs: list[int], *, batch: int, max_tokens: int, window: int) -> list[list[int]]:
    """Indices per batch as the worker would form them when saturated.

    Jobs arrive in order; at most ``window`` ready jobs wait in the batcher (the worker's
    prefetch less the running batch); the model takes one batch at a time. ``max_tokens=0`` is
    first come, first served.
    """
    batcher: MicroBatcher[int] = MicroBatcher(max_size=batch, max_delay_s=0.0, max_tokens=max_tokens, clock=lambda: 0.0)
    batches: list[list[int]] = []
    next_item = 0
    while next_item < len(costs) or len(batcher):
        while next_item < len(costs) and len(batcher) < window:
            batcher.add("g", next_item, cost=costs[next_item], arrived_at=0.0)  # ties: arrival order
            next_item += 1
        batches.append(batcher.take())
    return batches


def padding_run(
    model: Any, images: list[Image.Image], *, batch: int, max_tokens: int, generation: GenerationSettings
) -> dict[str, Any]:
    """Padding efficiency and model throughput for the mixed workload, padding-blind vs padding-aware."""
    prepared = [model.prepare(image, QUESTION) for image in images]
    costs = [item.num_tokens for item in prepared]
    result: dict[str, Any] = {
        "batch_size": batch,
        "max_batch_tokens": max_tokens,
        "images": len(images),
        "prompt_tokens": {"min": min(costs), "max": max(costs), "distinct": len(set(costs))},
    }
    # The worker holds prefetch_batches() batches of messages; one of them is the running batch.
    plans = {label: plan_batches(costs, batch=batch, max_tokens=budget, window=(prefetch_batches(budget) - 1) * batch)
             for label, budget in (("fifo", 0), ("padding_aware", max_tokens))}
    # Each new prompt length costs kernel set-up the first time: one untimed pass over the
    # plain plan, then the two plans alternate and each keeps its faster repetition.
    timings: dict[str, list[float]] = {label: [] for label in plans}
    for rep, label in enumerate(["fifo", "fifo", "padding_aware", "fifo", "padding_aware"]):
        start = time.perf_counter()
        for indices in plans[label]:
            model.generate_prepared([prepared[i] for i in indices], generation)
        if rep:
            timings[label].append(time.perf_counter() - start)
    for label, batches in plans.items():
        seconds = min(timings[label])
        result[label] = {
            "batches": len(batches),
            "mean_batch_size": round(len(images) / len(batches), 2),
            "padding_efficiency": round(padding_efficiency([[costs[i] for i in b] for b in batches]), 4),
            "seconds": round(seconds, 3),
            "images_per_s": round(len(images) / seconds, 3),
        }
    result["speedup"] = round(result["padding_aware"]["images_per_s"] / result["fifo"]["images_per_s"], 3)
    return result
