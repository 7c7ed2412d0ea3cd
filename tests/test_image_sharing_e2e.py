"""Jobs about one image in a worker at once: one image fetch, and each job its own record (the real worker process)."""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from producer.client import VQAClient
from producer.schema import GenerationSettings
from producer.settings import Settings
from worker.dev.services import WorkerProcess, image_server
from worker.fetch.images import FetchPolicy, decode_image
from worker.model import VQAModel

pytestmark = pytest.mark.slow

QUESTIONS = ["What is shown?", "What colour is the box?", "Is there a circle?", "How many shapes are there?", "Is it day?"]
GREEDY = GenerationSettings(max_new_tokens=6, min_new_tokens=6)


@pytest.fixture()
def counted_images(sample_images: dict[str, Path]) -> Iterator[tuple[str, list[str]]]:
    """A fresh image server of the sample images and the list of paths it was asked for."""
    requests: list[str] = []
    with image_server(next(iter(sample_images.values())).parent, delay_s=0.2, requests=requests) as url:
        yield url, requests


def test_jobs_on_one_url_fetch_it_once_and_keep_their_own_records(
    stack_env: dict[str, str],
    counted_images: tuple[str, list[str]],
    sample_images: dict[str, Path],
    tiny_model_dir: Path,
    client_for: Callable[[dict[str, str]], VQAClient],
    start_worker: Callable[..., WorkerProcess],
) -> None:
    base, requests = counted_images
    env = {**stack_env, "VQA_ALLOWED_HOSTS": base.removeprefix("http://"), "VQA_MAX_BATCH_SIZE": "8", "VQA_MAX_ATTEMPTS": "1"}
    client = client_for(env)
    # 15 jobs: all in the worker at once (its prefetch holds 2 batches of 8). Interleaved, as independent submissions arrive: wide, tall, missing, wide, tall, missing, ...
    jobs: dict[str, tuple[str, str]] = {}
    for question in QUESTIONS:
        for name in ("wide.jpg", "tall.png", "missing.png"):
            jobs[client.submit(f"{base}/{name}", question, generation=GREEDY)] = (name, question)
    start_worker(env)
    records = {job_id: client.wait(job_id, timeout=240) for job_id in jobs}

    fetched = collections.Counter(requests)
    assert fetched["/wide.jpg"] == 1 and fetched["/tall.png"] == 1  # 5 jobs each, one fetch each
    solo = VQAModel.load(Settings(model=str(tiny_model_dir), quantization="none", device="cpu", share_image_prefix=False))
    policy = FetchPolicy()
    for job_id, (name, question) in jobs.items():
        record = records[job_id]
        assert record.job_id == job_id and record.question == question and record.image_url.endswith(f"/{name}")
        if name == "missing.png":
            # The shared part failed: each job that needed it fails alone, with its own record and error.
            assert record.status == "failed" and record.error is not None and record.error.code == "http_status"
            continue
        assert record.status == "succeeded", record.error
        image = decode_image(sample_images[name].read_bytes(), policy)
        assert record.answer == solo.generate_batch([solo.prepare(image, question)], GREEDY)[0].text
    assert max(records[job_id].batch_size for job_id in jobs) > 1


def test_with_preprocessing_processes_a_worker_answers_as_the_fetch_threads_do(
    stack_env: dict[str, str],
    sample_images: dict[str, Path],
    tiny_model_dir: Path,
    tmp_path: Path,
    client_for: Callable[[dict[str, str]], VQAClient],
    start_worker: Callable[..., WorkerProcess],
) -> None:
    """VQA_PREPROCESS_PROCESSES=1: decode and the image's part in a spawned process; answers and errors as on the threads."""
    served = tmp_path / "served"
    served.mkdir()
    for name in ("wide.jpg", "tall.png"):
        (served / name).write_bytes(sample_images[name].read_bytes())
    (served / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    requests: list[str] = []
    with image_server(served, requests=requests) as base:
        env = {**stack_env, "VQA_ALLOWED_HOSTS": base.removeprefix("http://"), "VQA_MAX_ATTEMPTS": "1", "VQA_PREPROCESS_PROCESSES": "1"}
        client = client_for(env)
        jobs = {client.submit(f"{base}/{name}", question, generation=GREEDY): (name, question)
                for name, question in [("wide.jpg", QUESTIONS[0]), ("wide.jpg", QUESTIONS[1]), ("tall.png", QUESTIONS[2]), ("corrupt.png", QUESTIONS[0])]}
        worker = start_worker(env)
        records = {job_id: client.wait(job_id, timeout=240) for job_id in jobs}
    assert "1 preprocessing processes started" in worker._log_text()
    solo = VQAModel.load(Settings(model=str(tiny_model_dir), quantization="none", device="cpu", share_image_prefix=False))
    for job_id, (name, question) in jobs.items():
        record = records[job_id]
        if name == "corrupt.png":
            assert record.status == "failed" and record.error is not None and record.error.code == "corrupt_image"
            continue
        assert record.status == "succeeded", record.error
        image = decode_image(sample_images[name].read_bytes(), FetchPolicy())
        assert record.answer == solo.generate_batch([solo.prepare(image, question)], GREEDY)[0].text
    assert collections.Counter(requests)["/wide.jpg"] == 1  # one fetch for the two questions, as on the threads
