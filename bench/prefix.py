"""Shared image prefixes (worker/prefix.py): questions/s with and without sharing, 1-5 questions per image.

Engine-level, the same images and questions both ways, in batches of the worker's size formed
image by image (what the batcher's affinity gives for a bulk line's ``questions: [...]``: an
image's questions together, the next image's filling the rest of the batch). Reports
questions/s, the prompt tokens the language model computed per question, and how many greedy
answers agree.

:func:`end_to_end_sharing` is the same comparison end to end, through a real worker, with the
questions submitted in two orders: image by image (img1-q1, img1-q2, ..., img2-q1, ...: what a
bulk line's ``questions: [...]`` publishes) and interleaved across images (img1-q1, img2-q1, ...,
img1-q2, ...: independent submissions), where sharing depends on an image's questions being in
the worker at once, the batcher putting them together and the worker fetching the image once
(worker/imageshare.py); it also counts the image server's requests per question.
"""

from __future__ import annotations

import statistics
import time
from typing import TYPE_CHECKING, Any

from PIL import Image

from producer.schema import GenerationSettings

if TYPE_CHECKING:
    from bench.stack import Stack

QUESTIONS = (
    "What is shown in this image? Answer briefly.",
    "Is there any text in the image?",
    "How many people are in the picture?",
    "What is the main colour of the scene?",
    "Describe the background in one sentence.",
)


def prefix_sharing(model: Any, images: list[Image.Image], *, per_image: tuple[int, ...], batch: int, rounds: int,
                   generation: GenerationSettings) -> list[dict[str, Any]]:
    """One row per questions-per-image count: questions/s shared vs. not, computed prompt tokens per question, agreement.

    ``rounds`` off/on pairs back to back (the order alternating, so drift in the host's load
    falls on both); questions/s and the speedup are the medians, the per-round speedups kept.
    """
    # The same batches with one new token: a prefill and nothing else. Sharing saves prefill
    # only (every question still takes its own decode steps), so from the prefill times the
    # speedup it can give at the full answer length follows; the measured one is set beside it.
    one_token = generation.model_copy(update={"max_new_tokens": 1, "min_new_tokens": 1})
    rows = []
    for count in per_image:
        questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(count)]
        jobs = [model.prepare(image, question) for image in images for question in questions]
        batches = [jobs[start : start + batch] for start in range(0, len(jobs), batch)]
        pairs, prefill_pairs = [], []
        for round_ in range(rounds):
            order = (False, True) if round_ % 2 == 0 else (True, False)
            runs = {shared: _run(model, batches, shared=shared, generation=generation) for shared in order}
            pairs.append((runs[False], runs[True]))
            prefills = {shared: _run(model, batches, shared=shared, generation=one_token) for shared in order}
            prefill_pairs.append((prefills[False], prefills[True]))
        plain, shared = pairs[0]
        speedups = [round(on["qps"] / off["qps"], 3) for off, on in pairs]
        agree = sum(a == b for a, b in zip(plain["answers"], shared["answers"], strict=True))
        one_token_off = statistics.median(off["qps"] for off, _ in prefill_pairs)
        one_token_on = statistics.median(on["qps"] for _, on in prefill_pairs)
        # Seconds per question, medians: full answers off, one token off and on.
        full_off, prefill_off, prefill_on = 1 / statistics.median(off["qps"] for off, _ in pairs), 1 / one_token_off, 1 / one_token_on
        rows.append({
            "qps_one_token_without": one_token_off,
            "qps_one_token_with": one_token_on,
            "speedup_one_token": round(prefill_off / prefill_on, 3),
            # The share of an unshared question's time past its first token: the decode steps.
            "decode_share_without": round(1 - prefill_off / full_off, 3),
            # Full answers, if sharing saved exactly the prefill time it saves with one token.
            # (None when noise made the one-token runs slower than the full ones by more than that.)
            "speedup_expected_from_prefill": _expected_speedup(full_off, prefill_off - prefill_on),
            "questions_per_image": count,
            "images": len(images),
            "questions": len(plain["answers"]),
            "batch": batch,
            "qps_without": statistics.median(off["qps"] for off, _ in pairs),
            "qps_with": statistics.median(on["qps"] for _, on in pairs),
            "speedup": statistics.median(speedups),
            "speedup_per_round": speedups,
            "prompt_tokens_per_question_without": plain["tokens_per_question"],
            "prompt_tokens_per_question_with": shared["tokens_per_question"],
            "answers_agreeing": agree,
            "agreement_rate": round(agree / len(plain["answers"]), 4),
        })
    return rows


def _expected_speedup(full_s: float, prefill_saved_s: float) -> float | None:
    """Seconds per question with full answers, less the prefill seconds sharing saves: the speedup that leaves."""
    left = full_s - prefill_saved_s
    return round(full_s / left, 3) if left > 0 else None


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


# Submission orders of the end-to-end rows: an image's questions together, or one question of every image at a time.
ORDERS = ("image by image", "interleaved")


def end_to_end_sharing(st: Stack, env: dict[str, str], files: list[str], *, per_image: tuple[int, ...],
                       generation: GenerationSettings, tag: str, rounds: int = 3) -> list[dict[str, Any]]:
    """One row per (submission order, questions-per-image count): end-to-end questions/s and image fetches per question, sharing off vs. on.

    Off and on alternate, ``rounds`` times (a worker restart each switch): one burst is a few
    seconds, and on this shared machine single bursts moved more between runs than sharing
    changes them. Medians per row, each round's speedup beside them.
    """
    cases = [(order, n) for order in ORDERS for n in per_image]
    bursts: dict[bool, dict[tuple[str, int], list[dict[str, Any]]]] = {shared: {case: [] for case in cases} for shared in (False, True)}
    for round_no in range(rounds):
        for shared in (False, True):
            worker_env = {**env, "VQA_SHARE_IMAGE_PREFIX": "true" if shared else "false"}
            st.start_worker(worker_env)
            _burst(st, worker_env, files[:2], 2, order=ORDERS[1], generation=generation, tag=f"{tag}-warm-{shared}-{round_no}")  # kernels, first fetches
            for order, count in cases:
                bursts[shared][(order, count)].append(_burst(st, worker_env, files, count, order=order, generation=generation,
                                                             tag=f"{tag}-{shared}-{ORDERS.index(order)}-{count}-{round_no}"))
    st.stop_worker()
    rows = []
    for order, count in cases:
        plain, shared = bursts[False][(order, count)], bursts[True][(order, count)]
        rows.append({
            "order": order, "questions_per_image": count, "images": len(files), "questions": plain[0]["questions"], "rounds": rounds,
            "qps_without": _median(plain, "qps"), "qps_with": _median(shared, "qps"),
            "speedup": round(_median(shared, "qps") / _median(plain, "qps"), 3),
            "speedup_per_round": [round(on["qps"] / off["qps"], 3) for off, on in zip(plain, shared, strict=True)],
            "fetches_per_question_without": _median(plain, "fetches_per_question"), "fetches_per_question_with": _median(shared, "fetches_per_question"),
            "mean_batch_size_without": _median(plain, "mean_batch_size"), "mean_batch_size_with": _median(shared, "mean_batch_size"),
            "failed": sum(run["failed"] for run in plain + shared),
        })
    return rows


def _median(runs: list[dict[str, Any]], name: str) -> float:
    return round(statistics.median(run[name] for run in runs), 3)


def _burst(st: Stack, env: dict[str, str], files: list[str], count: int, *, order: str, generation: GenerationSettings,
           tag: str) -> dict[str, Any]:
    """Every image's ``count`` questions at once in one of :data:`ORDERS`; wall-clock questions/s to the last record."""
    base = st.image_urls[0.0]
    pairs = [(q, name) for name in files for q in range(count)] if order == ORDERS[0] else [(q, name) for q in range(count) for name in files]
    requests = [
        {"image_url": f"{base}/{name}", "question": QUESTIONS[q % len(QUESTIONS)], "idempotency_key": f"{tag}-{q}-{name}",
         "generation": generation.model_dump()}
        for q, name in pairs
    ]
    seen = len(st.image_requests[0.0])
    with st.client(env) as client:
        start = time.monotonic()
        ids = client.submit_many(requests)
    done = st.listener.wait_for(ids, timeout=900)
    last = max(d.at for d in done.values())
    fetches = len(st.image_requests[0.0]) - seen
    batches = {(d.record.get("worker"), d.record.get("started_at")) for d in done.values()}
    return {
        "questions": len(ids), "qps": round(len(ids) / (last - start), 3), "fetches_per_question": round(fetches / len(ids), 3),
        "mean_batch_size": round(len(ids) / max(1, len(batches)), 2), "failed": sum(d.status != "SUCCESS" for d in done.values()),
    }
