"""Shared image prefixes (worker/prefix.py): questions/s with and without sharing, 1-5 questions per image.

Engine-level, the same images and questions both ways: each image's questions are one batch
(what the batcher forms from a bulk line's ``questions: [...]``). Reports questions/s, the
prompt tokens the language model computed per question, and how many greedy answers agree.
"""

from __future__ import annotations

import time
from typing import Any

from PIL import Image

from producer.schema import GenerationSettings

QUESTIONS = (
    "What is shown in this image? Answer briefly.",
    "Is there any text in the image?",
    "How many people are in the picture?",
    "What is the main colour of the scene?",
    "Describe the background in one sentence.",
)


def prefix_sharing(model: Any, images: list[Image.Image], *, per_image: tuple[int, ...], generation: GenerationSettings) -> list[dict[str, Any]]:
    """One row per questions-per-image count: questions/s shared vs. not, computed prompt tokens per question, agreement."""
    rows = []
    for count in per_image:
        questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(count)]
        batches = [[model.prepare(image, question) for question in questions] for image in images]
        runs = {shared: _run(model, batches, shared=shared, generation=generation) for shared in (False, True)}
        plain, shared = runs[False], runs[True]
        agree = sum(a == b for a, b in zip(plain["answers"], shared["answers"], strict=True))
        rows.append({
            "questions_per_image": count,
            "images": len(images),
            "questions": len(plain["answers"]),
            "qps_without": plain["qps"],
            "qps_with": shared["qps"],
            "speedup": round(shared["qps"] / plain["qps"], 3),
            "prompt_tokens_per_question_without": plain["tokens_per_question"],
            "prompt_tokens_per_question_with": shared["tokens_per_question"],
            "answers_agreeing": agree,
            "agreement_rate": round(agree / len(plain["answers"]), 4),
        })
    return rows


def _run(model: Any, batches: list[list[Any]], *, shared: bool, generation: GenerationSettings) -> dict[str, Any]:
    model.share_image_prefix = shared
    model.generate_batch(batches[0], generation)  # warm-up
    tokens_before = model.computed_prompt_tokens
    answers: list[str] = []
    start = time.perf_counter()
    for batch in batches:
        answers.extend(answer.text for answer in model.generate_batch(batch, generation))
    seconds = time.perf_counter() - start
    return {
        "answers": answers,
        "qps": round(len(answers) / seconds, 3),
        "tokens_per_question": round((model.computed_prompt_tokens - tokens_before) / len(answers), 1),
    }
