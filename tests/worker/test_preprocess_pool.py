"""VQA_PREPROCESS_PROCESSES (worker/preprocess_pool.py): real spawned processes, the tiny LLaVA-NeXT's processor."""

from __future__ import annotations

import io
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image

from producer.errors import ImageRejected, TransientError
from producer.settings import Settings
from worker.fetch.images import FetchPolicy, decode_image
from worker.model import VQAModel
from worker.preprocess_pool import PreprocessPool

POLICY = FetchPolicy()


@pytest.fixture(scope="module")
def vqa(tiny_model_dir: Path) -> VQAModel:
    return VQAModel.load(Settings(model=str(tiny_model_dir), quantization="none", device="cpu", share_image_prefix=True))


@pytest.fixture(scope="module")
def pool(vqa: VQAModel) -> Iterator[PreprocessPool]:
    pool = PreprocessPool(vqa.image_prep(), POLICY, processes=1)
    pool.warm()
    yield pool
    pool.close()


def _shared_blocks() -> set[str]:
    """Python's shared-memory blocks (psm_*) on this machine."""
    return {name for name in os.listdir("/dev/shm") if name.startswith("psm_")} if os.path.isdir("/dev/shm") else set()


def _jpeg(width: int, height: int, seed: int) -> bytes:
    noise = torch.rand(height, width, 3, generator=torch.Generator().manual_seed(seed))
    buffer = io.BytesIO()
    Image.fromarray((noise * 255).to(torch.uint8).numpy()).save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


@pytest.mark.parametrize("grid", [None, "1x1"])
def test_a_process_prepares_the_image_as_the_fetch_thread_does(vqa: VQAModel, pool: PreprocessPool, grid: str | None) -> None:
    data = _jpeg(300, 120, seed=1)
    blocks = _shared_blocks()
    inputs, decode_s, preprocess_s = pool.prepare_image(data, image_grid=grid)
    assert _shared_blocks() == blocks  # the tiles' shared-memory block is gone once copied out
    alone = vqa.prepare_image(decode_image(data, POLICY, image_grid=grid), image_grid=grid, source=data)
    assert torch.equal(inputs.pixel_values, alone.pixel_values) and torch.equal(inputs.image_size, alone.image_size)
    assert (inputs.image_tokens, inputs.image_key, inputs.image_grid, inputs.pinpoints) == (
        alone.image_tokens, alone.image_key, alone.image_grid, alone.pinpoints)
    assert decode_s > 0 and preprocess_s > 0  # the process's own CPU, for the worker's account
    # The job's question continues from it as from the thread's own.
    question = "What is shown?"
    assert torch.equal(vqa.prepare_question(inputs, question).input_ids, vqa.prepare_question(alone, question).input_ids)


def test_a_rejected_image_keeps_its_error_and_code_across_the_process(pool: PreprocessPool) -> None:
    with pytest.raises(ImageRejected) as raised:
        pool.prepare_image(b"GIF89a but not really", image_grid=None)
    with pytest.raises(ImageRejected) as alone:
        decode_image(b"GIF89a but not really", POLICY)
    assert raised.value.code == alone.value.code and str(raised.value) == str(alone.value)


def test_a_dead_process_fails_its_job_transiently_and_the_pool_starts_again(pool: PreprocessPool) -> None:
    pids = list(pool._executor._processes)  # the executor's own children (CPython's ProcessPoolExecutor)
    assert len(pids) == 1
    os.kill(pids[0], signal.SIGKILL)
    pool._executor._processes[pids[0]].join(timeout=10)
    with pytest.raises(TransientError) as raised:
        pool.prepare_image(_jpeg(64, 64, seed=2), image_grid=None)
    assert raised.value.retryable and raised.value.code == "preprocess_process_lost"
    inputs, _, _ = pool.prepare_image(_jpeg(64, 64, seed=2), image_grid=None)  # a new process took over
    assert inputs.image_tokens > 0
    assert list(pool._executor._processes) != pids
