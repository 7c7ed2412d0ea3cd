"""A job's own image_grid: less detail than the worker's VQA_IMAGE_GRID, never more.

Unit tests of the intersection and of the job field, then the tiny model (one worker grid,
jobs of several grids, in one list and from several fetch threads), then a real worker process.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image

from producer.client import VQAClient
from producer.errors import InvalidJob
from producer.image_grid import GridLimit, effective_grid, intersect
from producer.schema import GenerationSettings, Job, derive_job_id
from producer.settings import Settings
from worker.dev.services import WorkerProcess
from worker.model import VQAModel

SHORT = GenerationSettings(max_new_tokens=4, min_new_tokens=2)
BASE_JOB = {
    "job_id": "j1",
    "image_url": "https://images.example/cat.png",
    "question": "What is it?",
    "model": "m",
    "generation": {},
    "submitted_at": "2026-01-01T00:00:00Z",
}


@pytest.mark.parametrize(
    ("requested", "worker", "expected"),
    [
        (None, "full", "full"),
        (None, "2x1", "2x1"),
        ("full", "2x1", "2x1"),  # never more than the worker's
        ("1x1", "full", "1x1"),  # less is fine
        ("3x3", "2x1", "2x1"),
        ("1x3", "2x1", "1x1"),  # each side on its own
        ("2x2", "3x1", "2x1"),
    ],
)
def test_effective_grid_is_the_intersection(requested: str | None, worker: str, expected: str) -> None:
    assert effective_grid(requested, worker) == expected


def test_intersect() -> None:
    assert intersect(None, None) is None
    assert intersect(GridLimit(2, 1), None) == GridLimit(2, 1) == intersect(None, GridLimit(2, 1))
    assert intersect(GridLimit(1, 3), GridLimit(2, 2)) == GridLimit(1, 2)


def test_the_job_field_is_normalised_validated_and_absent_when_unset() -> None:
    assert Job.decode({**BASE_JOB, "image_grid": " 2X1 "}).image_grid == "2x1"
    assert Job.decode({**BASE_JOB, "image_grid": "FULL"}).image_grid == "full"
    with pytest.raises(InvalidJob, match="image_grid: Value error, image grid must be 'full' or RxC"):
        Job.decode({**BASE_JOB, "image_grid": "2*1"})
    # Unset, the message holds no image_grid key: workers of the previous version (extra=forbid) still accept it.
    plain = Job.decode(BASE_JOB)
    assert "image_grid" not in plain.model_dump(mode="json")
    assert Job.decode(plain.model_dump(mode="json")) == plain
    asked = Job.decode({**BASE_JOB, "image_grid": "1x1"})
    assert asked.model_dump(mode="json")["image_grid"] == "1x1" and Job.decode(asked.model_dump(mode="json")) == asked


def test_the_grid_is_part_of_the_job_id_only_when_asked() -> None:
    common = {"image_url": "https://x/a.png", "question": "Q?", "model": "m", "generation": GenerationSettings()}
    plain = derive_job_id(**common)
    assert derive_job_id(**common, image_grid=None) == plain
    assert len({plain, derive_job_id(**common, image_grid="1x1"), derive_job_id(**common, image_grid="2x1")}) == 3


def test_the_client_builds_and_refuses_it() -> None:
    client = VQAClient(Settings(broker_url="redis://127.0.0.1:1/0", result_backend="redis://127.0.0.1:1/0"))  # never reached
    try:
        job = client.build_request({"image_url": "https://x/a.png", "question": "Q?", "image_grid": "1X1"})
        assert job.image_grid == "1x1"
        assert job.job_id != client.build_request({"image_url": "https://x/a.png", "question": "Q?"}).job_id
        with pytest.raises(InvalidJob, match="image grid must be 'full' or RxC"):
            client.build_job("https://x/a.png", "Q?", image_grid="0x0")
    finally:
        client.close()


# --------------------------------------------------------------------------- the tiny model


@pytest.fixture(scope="module")
def full_model(tiny_model_dir: Path) -> VQAModel:
    return VQAModel.load(Settings(model=str(tiny_model_dir), quantization="none", device="cpu", image_grid="full"))


def _images() -> list[Image.Image]:
    # Square, wide and tall: with the full grid each gets more than one tile.
    return [Image.new("RGB", size, color=(i * 70, 90, 200)) for i, size in enumerate([(500, 500), (300, 120), (64, 256)])]


def test_a_job_never_gets_more_than_the_worker(tiny_model_dir: Path) -> None:
    model = VQAModel.load(Settings(model=str(tiny_model_dir), quantization="none", device="cpu", image_grid="2x1"))
    # Tall: a 2x1 grid holds it at twice the detail of one tile (a square one would unpad to
    # one tile's worth of tokens either way).
    tall = _images()[2]
    default = model.prepare(tall, "What is it?")
    more = model.prepare(tall, "What is it?", image_grid="full")
    less = model.prepare(tall, "What is it?", image_grid="1x1")
    assert default.image_grid == more.image_grid == "2x1" and less.image_grid == "1x1"
    assert torch.equal(more.input_ids, default.input_ids) and torch.equal(more.pixel_values, default.pixel_values)
    assert less.num_tokens < default.num_tokens


def test_jobs_of_different_grids_in_one_list_answer_as_they_would_alone(full_model: VQAModel) -> None:
    items = []
    for image in _images():
        items += [full_model.prepare(image, "What is it?"), full_model.prepare(image, "What colour?", image_grid="1x1")]
    mixed = full_model.generate_batch(items, SHORT)
    alone = [full_model.generate_batch([item], SHORT)[0] for item in items]
    assert [answer.text for answer in mixed] == [answer.text for answer in alone]
    for full, single in zip(mixed[::2], mixed[1::2], strict=True):
        assert single.image_tokens < full.image_tokens
        assert full.generated_tokens >= 2 and single.generated_tokens >= 2
    # What the fetch threads start from is still the worker's own grid.
    assert full_model.processor.image_processor.image_grid_pinpoints == full_model._checkpoint_pinpoints


def test_fetch_threads_of_different_grids_do_not_mix(full_model: VQAModel) -> None:
    tall = _images()[2]
    expected = {grid: full_model.prepare(tall, "Q?", image_grid=grid).num_tokens for grid in ("full", "2x1", "1x1")}
    assert len(set(expected.values())) == 3
    wrong: list[str] = []

    def run(grid: str) -> None:
        for _ in range(15):
            got = full_model.prepare(tall, "Q?", image_grid=grid)
            if got.num_tokens != expected[grid] or got.image_grid != grid:
                wrong.append(grid)

    threads = [threading.Thread(target=run, args=(grid,)) for grid in expected]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert wrong == []


# --------------------------------------------------------------------------- a real worker


@pytest.mark.slow
def test_a_worker_answers_each_job_at_its_own_grid(
    stack_env: dict[str, str],
    image_base_url: str,
    client_for: Callable[[dict[str, str]], VQAClient],
    start_worker: Callable[..., WorkerProcess],
) -> None:
    env = {**stack_env, "VQA_IMAGE_GRID": "2x1", "VQA_MAX_BATCH_DELAY_MS": "300"}
    client = client_for(env)
    url = f"{image_base_url}/tall.png"
    asked = {"default": None, "more": "full", "less": "1x1"}
    ids = {name: client.submit(url, f"What is shown ({name})?", image_grid=grid) for name, grid in asked.items()}
    start_worker(env)
    records = {name: client.wait(job_id, timeout=180) for name, job_id in ids.items()}
    for record in records.values():
        assert record.status == "succeeded", record.error
        assert isinstance(record.answer, str) and record.answer and record.usage is not None
    assert {name: record.image_grid for name, record in records.items()} == {"default": "2x1", "more": "2x1", "less": "1x1"}
    tokens = {name: record.usage.image_tokens for name, record in records.items() if record.usage is not None}
    assert tokens["more"] == tokens["default"] > tokens["less"] > 0
