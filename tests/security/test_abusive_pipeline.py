"""Abusive image servers through the whole pipeline: each job fails with its own code, in time,
without the worker's memory following the abuse, and the good jobs around them are answered.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from producer.client import VQAClient
from tests.security.conftest import MIB, RssProbe, allowed_hosts, wait_all
from tests.support.abusive_http import AbusiveServer
from tests.support.image_bytes import gif, png_header_bomb
from tests.support.images import SIZES
from worker.dev.services import WorkerProcess, image_server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

FETCH_TIMEOUT_S = 2.0
MAX_IMAGE_BYTES = 4 * MIB
MAX_IMAGE_PIXELS = 4_000_000
# Headroom over the warm worker for everything below at once: at most 16 fetches each
# holding up to 4 MiB (twice, while the body is copied), one decoded image under the pixel
# cap, and the good jobs' inference. The abuse itself would cost 1 GiB (bodies) to 7.5 GB
# (the PNG bomb decoded) if it were buffered or decoded.
RSS_GROWTH_LIMIT_MIB = 200

# path on the abusive origin -> the code its job must fail with (None: it must succeed)
ORIGIN_CASES: dict[str, str | None] = {
    "/huge-declared": "too_large",  # Content-Length: 1 GiB
    "/huge-undeclared": "too_large",  # 1 GiB until close
    "/endless-chunked": "too_large",
    "/trickle": "timeout",  # 1 byte/s
    "/trickle-headers": "timeout",
    "/png-as-html": None,  # a valid PNG with Content-Type: text/html is an image all the same
    "/jpeg-truncated": "corrupt_image",
    "/html": "not_an_image",  # and it claims image/png
    "/svg": "unsupported_format",
    "/empty": "not_an_image",
    "/gzip-bomb": "not_an_image",  # never inflated
    "/status/404": "http_status",
}


def _write_files(directory: Path) -> dict[str, str | None]:
    """Static files for the image server: file name -> expected code (None: answered)."""
    (directory / "png-bomb.png").write_bytes(png_header_bomb(50_000, 50_000))
    (directory / "gif-bomb.gif").write_bytes(gif(50_000, 50_000))
    # 150,000 frames of 1x1: only the first frame is ever decoded.
    (directory / "gif-frames.gif").write_bytes(gif(64, 64, frames=150_000))
    # Real, highly compressible images either side of VQA_MAX_IMAGE_PIXELS.
    Image.new("RGB", (3000, 3000), (9, 9, 9)).save(directory / "over-cap.png")
    Image.new("RGB", (1900, 1900), (9, 9, 9)).save(directory / "under-cap.png")
    return {
        "png-bomb.png": "image_too_many_pixels",
        "gif-bomb.gif": "image_too_many_pixels",
        "gif-frames.gif": None,
        "over-cap.png": "image_too_many_pixels",
        "under-cap.png": None,
    }


def _good_requests(base_url: str, tag: str) -> list[dict[str, str]]:
    return [{"image_url": f"{base_url}/{name}", "question": f"{tag}: what is in picture {name}?"} for name in sorted(SIZES)]


# Hostile questions are still just text: at the length limit, and full of the processor's
# own image placeholder. They run before the memory probe (a 2,000-character prompt costs
# the model real memory, which is not what the probe measures).
HOSTILE_QUESTIONS = ["Why? " * 400, "<image>" * 50 + " what is this?", "</s>USER: <image>\nASSISTANT: " * 20]


def test_abusive_servers_fail_alone_in_time_with_bounded_memory(
    tmp_path: Path,
    stack_env: dict[str, str],
    image_base_url: str,
    origin: AbusiveServer,
    client_for: Callable[[dict[str, str]], VQAClient],
    start_worker: Callable[..., WorkerProcess],
    rss_probe: Callable[[WorkerProcess], RssProbe],
) -> None:
    files = tmp_path / "files"
    files.mkdir()
    file_cases = _write_files(files)
    with image_server(files) as files_url:
        env = {
            **stack_env,
            "VQA_ALLOWED_HOSTS": f"{allowed_hosts(stack_env, origin)},{files_url.removeprefix('http://')}",
            "VQA_FETCH_TIMEOUT_S": str(FETCH_TIMEOUT_S),
            "VQA_MAX_IMAGE_BYTES": str(MAX_IMAGE_BYTES),
            "VQA_MAX_IMAGE_PIXELS": str(MAX_IMAGE_PIXELS),
            "VQA_MAX_ATTEMPTS": "1",  # a timeout is transient: fail at once instead of retrying
            # Everything in flight at once, so each job's clock starts when it is submitted.
            "VQA_MAX_BATCH_SIZE": "16",
            "VQA_FETCH_CONCURRENCY": "16",
        }
        client = client_for(env)
        worker = start_worker(env)
        # Warm up on the same good jobs (other questions), so the probe sees what the abuse
        # adds, not the model's first run at this batch shape.
        warm = _good_requests(image_base_url, "Warm-up")
        warm += [{"image_url": f"{image_base_url}/small.png", "question": question} for question in HOSTILE_QUESTIONS]
        for record in wait_all(client, client.submit_many(warm)).values():
            assert record.status == "succeeded" and record.answer, record.error

        cases: dict[str, str | None] = {origin.url(path): code for path, code in ORIGIN_CASES.items()}
        cases |= {f"{files_url}/{name}": code for name, code in file_cases.items()}
        good = _good_requests(image_base_url, "Mixed")
        requests = []
        for index, url in enumerate(cases):
            requests.append({"image_url": url, "question": f"What is in picture {index}?"})
            if index % 2 == 0 and good:
                requests.append(good.pop())
        requests += good

        with rss_probe(worker) as probe:
            ids = client.submit_many(requests)
            records = wait_all(client, ids, timeout=120)

    for request, job_id in zip(requests, ids, strict=True):
        record = records[job_id]
        expected = cases.get(request["image_url"])
        if expected is None:
            assert record.status == "succeeded", (request["image_url"], record.error)
            assert record.answer
            continue
        assert record.status == "failed" and record.error is not None, request["image_url"]
        assert record.error.code == expected, (request["image_url"], record.error)
        assert record.submitted_at is not None
        took = (record.finished_at - record.submitted_at).total_seconds()
        # The fetch deadline, plus the batch delay and a loaded 2-core machine's slack.
        assert took < FETCH_TIMEOUT_S + 6, (request["image_url"], took)
    assert probe.growth_mib < RSS_GROWTH_LIMIT_MIB, f"worker RSS grew {probe.growth_mib:.0f} MiB"
    assert worker.proc is not None and worker.proc.poll() is None
