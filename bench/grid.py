"""Image detail (VQA_IMAGE_GRID / a job's image_grid): image tokens per image and questions/s per grid.

Engine-level, the same images and question at every setting, batches of ``batch`` jobs of one
grid (what the worker forms: jobs of different grids never share a ``generate`` call).
Settings whose pinpoints equal a larger one's are still reported: they show where a limit
stops changing anything for this checkpoint's pinpoints.
"""

from __future__ import annotations

import time
from typing import Any

from PIL import Image

from producer.schema import GenerationSettings

GRIDS = ("full", "2x2", "2x1", "1x1")
QUESTION = "What is written in this image? Answer briefly."


def image_grid_rows(model: Any, images: list[Image.Image], *, batch: int, generation: GenerationSettings) -> list[dict[str, Any]]:
    """One row per grid: its pinpoints, image and prompt tokens per image, questions/s, answers equal to full's."""
    rows: list[dict[str, Any]] = []
    full_answers: list[str] = []
    for grid in GRIDS:
        items = [model.prepare(image, QUESTION, image_grid=grid) for image in images]
        model.generate_batch(items[:batch], generation)  # warm-up at this grid's shapes
        answers: list[Any] = []
        start = time.perf_counter()
        for first in range(0, len(items), batch):
            answers.extend(model.generate_batch(items[first : first + batch], generation))
        seconds = time.perf_counter() - start
        texts = [answer.text for answer in answers]
        full_answers = full_answers or texts
        rows.append({
            "image_grid": grid,
            "pinpoints": [list(point) for point in items[0].pinpoints],
            "images": len(images),
            "batch_size": batch,
            "image_tokens_per_image": round(sum(a.image_tokens for a in answers) / len(answers), 1),
            "prompt_tokens_per_image": round(sum(a.prompt_tokens for a in answers) / len(answers), 1),
            "qps": round(len(answers) / seconds, 3),
            "answers_equal_to_full": sum(a == b for a, b in zip(texts, full_answers, strict=True)),
        })
    full_qps = rows[0]["qps"]
    for row in rows:
        row["speedup_vs_full"] = round(row["qps"] / full_qps, 3)
    return rows


def grid_markdown(result: dict[str, Any]) -> str:
    """docs/benchmarks/grid/results.md from the section's own JSON."""
    meta = result["meta"]
    lines = [
        "# Image detail: tokens and throughput per image grid",
        "",
        f"Command: `{meta['command']}`. Model: {meta['model']['size']} ({meta['model']['parameters_m']} M parameters, "
        f"quantization {meta['model']['quantization']}), {meta.get('device', 'cpu')}; {meta['image_size']} images; "
        f"greedy, {meta['generation']['max_new_tokens']} new tokens.",
        "",
        "| grid | pinpoints kept | image tokens / image | prompt tokens / image | questions/s | vs. full | answers equal to full's |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in result["grid"]:
        points = ", ".join(f"{h}x{w}" for h, w in row["pinpoints"])
        lines.append(f"| `{row['image_grid']}` | {points} | {row['image_tokens_per_image']} | {row['prompt_tokens_per_image']} | "
                     f"{row['qps']} | {row['speedup_vs_full']}x | {row['answers_equal_to_full']} / {row['images']} |")
    lines += ["", "Random-weight model: answers that differ from full's say the input changed, not which is better."]
    return "\n".join(lines) + "\n"
