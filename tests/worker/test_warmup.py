"""The warm-up batch: a full batch through the engine before the worker says it is ready."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from producer.errors import OutOfMemory
from producer.schema import GenerationSettings
from worker.engine import Answer
from worker.warmup import warm_up


class _Engine:
    name = "fake"
    quantization = "none"

    def __init__(self, *, fits: int) -> None:
        self.fits = fits
        self.batches: list[int] = []

    def prepare(self, image: Any, question: str, *, image_grid: str | None = None) -> Any:
        return (image.size, question)

    def cost(self, inputs: Any) -> int:
        return 1

    def generate_batch(self, inputs: Sequence[Any], generation: GenerationSettings) -> list[Answer]:
        self.batches.append(len(inputs))
        if len(inputs) > self.fits:
            raise OutOfMemory(f"{len(inputs)} do not fit")
        return [Answer("x", 1, 0, generation.max_new_tokens)] * len(inputs)


def test_a_full_batch_runs_once() -> None:
    engine = _Engine(fits=8)
    assert warm_up(engine, batch_size=8) >= 0
    assert engine.batches == [8]


def test_a_batch_that_does_not_fit_is_said_and_one_job_warms_up(caplog: pytest.LogCaptureFixture) -> None:
    engine = _Engine(fits=2)
    warm_up(engine, batch_size=8)
    assert engine.batches == [8, 1] and "ran out of memory" in caplog.text


def test_a_model_that_cannot_run_one_job_fails_the_start() -> None:
    with pytest.raises(OutOfMemory):
        warm_up(_Engine(fits=0), batch_size=1)
