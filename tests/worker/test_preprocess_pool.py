"""VQA_PREPROCESS_PROCESSES (worker/preprocess_pool.py): real spawned processes, the tiny LLaVA-NeXT's processor."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
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


def test_a_signal_meant_for_the_worker_does_not_stop_its_processes(pool: PreprocessPool) -> None:
    (pid,) = list(pool._executor._processes)
    os.kill(pid, signal.SIGINT)  # what Ctrl-C sends the whole process group
    os.kill(pid, signal.SIGTERM)
    inputs, _, _ = pool.prepare_image(_jpeg(64, 64, seed=3), image_grid=None)
    assert inputs.image_tokens > 0 and list(pool._executor._processes) == [pid]


def test_with_prescaling_a_process_decodes_as_the_fetch_thread_does(vqa: VQAModel) -> None:
    policy = FetchPolicy(prescale=vqa.prescaler())
    data = _jpeg(1200, 900, seed=4)  # large enough for a draft scale on the tiny model's pinpoints
    with_prescale = PreprocessPool(vqa.image_prep(), policy, processes=1)
    try:
        inputs, _, _ = with_prescale.prepare_image(data, image_grid="1x1")
    finally:
        with_prescale.close()
    alone = vqa.prepare_image(decode_image(data, policy, image_grid="1x1"), image_grid="1x1", source=data)
    assert torch.equal(inputs.pixel_values, alone.pixel_values) and torch.equal(inputs.image_size, alone.image_size)
    assert inputs.image_key == alone.image_key


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


def test_the_processes_end_with_a_worker_killed_outright(tiny_model_dir: Path) -> None:
    script = (
        "import sys, time\n"
        "from producer.settings import Settings\n"
        "from worker.fetch.images import FetchPolicy\n"
        "from worker.model import VQAModel\n"
        "from worker.preprocess_pool import PreprocessPool\n"
        "if __name__ == '__main__':\n"
        f"    vqa = VQAModel.load(Settings(model={str(tiny_model_dir)!r}, quantization='none', device='cpu'))\n"
        "    pool = PreprocessPool(vqa.image_prep(), FetchPolicy(), processes=2)\n"
        "    pool.warm()\n"
        "    print(*pool._executor._processes, flush=True)\n"
        "    time.sleep(120)\n"
    )
    children: list[int] = []
    with subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[2]) as worker:
        try:
            children = [int(pid) for pid in worker.stdout.readline().split()]  # type: ignore[union-attr]
            assert len(children) == 2
            worker.kill()
            worker.wait(timeout=10)
            deadline = time.monotonic() + 10
            while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert not any(_alive(pid) for pid in children)
        finally:
            worker.kill()
            for pid in filter(_alive, children):
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A child that ended but was not reaped yet (its parent is gone, so init reaps it) is a zombie.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(") ", 1)[1][0] != "Z"
