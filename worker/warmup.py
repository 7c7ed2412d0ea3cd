"""The warm-up batch a worker runs after loading its model and before it says it is ready (``/readyz``).

The first generate call pays for CUDA context set-up, kernel selection and the allocator's first
blocks; a job that met it would wait seconds longer than the rest. A full batch of a synthetic
image also shows at start-up whether ``VQA_MAX_BATCH_SIZE`` fits in memory: when it does not,
the worker says so and goes on (the runner splits batches that run out of memory).
"""

from __future__ import annotations

import logging
import time

from PIL import Image

from producer.errors import OutOfMemory
from producer.schema import GenerationSettings
from worker.engine import Engine

log = logging.getLogger(__name__)

_SIDE = 336  # one CLIP tile: the smallest image every LLaVA-NeXT preprocessor takes as is
_GENERATION = GenerationSettings(max_new_tokens=2)


def warm_up(engine: Engine, *, batch_size: int) -> float:
    """Run one batch of ``batch_size`` synthetic jobs through ``engine``; seconds it took. Errors other than out-of-memory propagate."""
    started = time.perf_counter()
    inputs = engine.prepare(Image.new("RGB", (_SIDE, _SIDE), (128, 128, 128)), "What is shown in this image?")
    try:
        engine.generate_batch([inputs] * batch_size, _GENERATION)
    except OutOfMemory as exc:
        if batch_size == 1:
            raise
        log.warning("warm-up: a batch of %d ran out of memory (%s); batches will be split when they do. Warming up with 1", batch_size, exc)
        engine.generate_batch([inputs], _GENERATION)
    return time.perf_counter() - started
