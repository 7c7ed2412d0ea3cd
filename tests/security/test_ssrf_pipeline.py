"""SSRF through the whole pipeline: client → Redis → `vqa worker` process → records.

Every URL here passes the producer's shape check (scheme, host, length) and is enqueued;
the worker must refuse each one with ``blocked_address`` without ever connecting. The
canaries are real servers on loopback that nobody allowed: they count TCP connections, so
"refused" cannot mean "fetched, then refused". Good jobs are interleaved with them, held by
the worker at the same time, and must all be answered.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from urllib.parse import urlencode

import pytest

from producer import keys
from producer.client import VQAClient
from producer.schema import check_url_shape
from tests.security.conftest import allowed_hosts, s3_record, wait_all
from tests.support.abusive_http import AbusiveServer
from tests.support.images import SIZES
from worker.dev.services import WorkerProcess

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

# {c}: the IPv4 canary's port; {c6}: the IPv6 canary's (the IPv4 one where there is no IPv6).
DIRECT = [
    "http://127.0.0.1:{c}/png",
    "http://localhost:{c}/png",
    "http://localhost.:{c}/png",
    "http://LOCALHOST:{c}/png",
    "HTTP://127.0.0.1:{c}/png",
    "https://127.0.0.1:{c}/png",
    "http://2130706433:{c}/png",
    "http://0x7f000001:{c}/png",
    "http://0177.0.0.1:{c}/png",
    "http://017700000001:{c}/png",
    "http://0x7f.0x0.0x0.0x1:{c}/png",
    "http://0x7f.1:{c}/png",
    "http://127.1:{c}/png",
    "http://127.000.000.001:{c}/png",
    "http://127.0.0.1.:{c}/png",
    "http://127.2.3.4:{c}/png",
    "http://0.0.0.0:{c}/png",
    "http://0:{c}/png",
    "http://１２７.０.０.１:{c}/png",
    "http://127。0。0。1:{c}/png",
    "http://[::ffff:127.0.0.1]:{c}/png",
    "http://[::ffff:7f00:1]:{c}/png",
    "http://[0:0:0:0:0:ffff:127.0.0.1]:{c}/png",
    "http://[::127.0.0.1]:{c}/png",
    "http://[64:ff9b::7f00:1]:{c}/png",
    "http://[2002:7f00:1::]:{c}/png",
    "http://[::1]:{c6}/png",
    "http://[0:0:0:0:0:0:0:1]:{c6}/png",
    "http://[::]:{c6}/png",
    "http://[::1%25lo]:{c6}/png",
    # "http://images.example@127.0.0.1/..." and other userinfo tricks never reach the queue: the
    # job schema refuses any userinfo (test_submit_validation.py); the fetcher's own refusal of
    # them is tested in tests/worker/test_fetch_http.py.
    "http://127.0.0.1:{c}#@127.0.0.1:{o}/png",
    "http://127.0.0.1:{c}?@127.0.0.1:{o}/png",
]

# Served by the allowed origin as a redirect: (status, target). Every hop is vetted again.
VIA_REDIRECT = [
    ("302", "http://127.0.0.1:{c}/png"),
    ("301", "http://localhost:{c}/png"),
    ("303", "http://2130706433:{c}/png"),
    ("307", "http://[::ffff:127.0.0.1]:{c}/png"),
    ("308", "http://[::1]:{c6}/png"),
    ("302", "//127.0.0.1:{c}/png"),
    ("302", "http://0x7f.1:{c}/png"),
    ("302", "https://localhost:{c}/png"),
]


def _redirect(origin: AbusiveServer, target: str, status: str = "302") -> str:
    return origin.url("/redirect?" + urlencode({"to": target, "status": status}))


def _corpus(origin: AbusiveServer, canary: AbusiveServer, canary6: AbusiveServer | None) -> list[tuple[str, int]]:
    """(url, requests the origin serves for it) for every SSRF attempt aimed at a canary."""
    ports = {"c": canary.port, "c6": (canary6 or canary).port, "o": origin.port}
    corpus = [(template.format(**ports), 0) for template in DIRECT]
    corpus += [(_redirect(origin, template.format(**ports), status), 1) for status, template in VIA_REDIRECT]
    # Chains: the origin redirects to itself, then to the canary.
    to_canary = _redirect(origin, f"http://127.0.0.1:{canary.port}/png")
    two_hops = _redirect(origin, to_canary, "307")
    corpus += [(two_hops, 2), (_redirect(origin, two_hops), 3)]
    # The chain starts at a path the origin serves as a relative redirect to the next hop.
    corpus.append((_redirect(origin, "/redirect?" + urlencode({"to": f"http://localhost:{canary.port}/png"})), 2))
    return corpus


def test_ssrf_corpus_is_refused_by_the_worker_and_never_reaches_the_canary(
    stack_env: dict[str, str],
    image_base_url: str,
    origin: AbusiveServer,
    canary: AbusiveServer,
    canary6: AbusiveServer | None,
    client_for: Callable[[dict[str, str]], VQAClient],
    start_worker: Callable[..., WorkerProcess],
) -> None:
    env = {
        **stack_env,
        "VQA_ALLOWED_HOSTS": allowed_hosts(stack_env, origin),
        "VQA_MAX_ATTEMPTS": "1",  # a wrongly transient refusal shows up as its code, not as retries
        "VQA_FETCH_TIMEOUT_S": "3",
    }
    corpus = _corpus(origin, canary, canary6)
    assert len(corpus) >= 30
    for url, _ in corpus:
        check_url_shape(url)  # the producer lets every one of these through to the queue
    # Other internal targets: the worker's own Redis and S3 endpoint, cloud metadata, private
    # ranges, and an s3:// URL for the results bucket, which is not an image bucket.
    redis_port = env["VQA_BROKER_URL"].rsplit(":", 1)[1].split("/")[0]
    internal = [
        f"http://127.0.0.1:{redis_port}/",
        f"{env['VQA_S3_ENDPOINT_URL']}/{env['VQA_S3_BUCKET']}/",
        "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
        "http://[fd00:ec2::254]/latest/meta-data/",
        "http://10.0.0.1/x.png",
        "http://192.168.1.1/x.png",
        "http://100.64.0.1/x.png",
        f"s3://{env['VQA_S3_BUCKET']}/results/anything.json",
    ]
    bad_urls = [url for url, _ in corpus] + internal

    names = sorted(SIZES)
    requests: list[dict[str, str]] = []
    good_positions: list[int] = []
    for index, url in enumerate(bad_urls):
        if index % 6 == 0:  # a good job between every few bad ones: the worker holds them together
            good_positions.append(len(requests))
            requests.append({"image_url": f"{image_base_url}/{names[index % len(names)]}", "question": f"Good {index}?"})
        requests.append({"image_url": url, "question": f"SSRF {index}?"})

    client = client_for(env)
    ids = client.submit_many(requests)
    assert len(set(ids)) == len(requests)
    worker = start_worker(env)
    records = wait_all(client, ids, timeout=180)

    good_ids = {ids[position] for position in good_positions}
    for job_id in good_ids:
        assert records[job_id].status == "succeeded", records[job_id].error
        assert records[job_id].answer
    for request, job_id in zip(requests, ids, strict=True):
        if job_id in good_ids:
            continue
        record = records[job_id]
        assert record.status == "failed", request["image_url"]
        assert record.error is not None
        assert (record.error.code, record.error.retryable) == ("blocked_address", False), (request["image_url"], record.error)
        stored = json.loads(s3_record(env, keys.failed_key("", job_id)))
        assert stored["error"]["code"] == "blocked_address"
    assert canary.connections == 0, canary.requests
    assert canary6 is None or canary6.connections == 0
    # The origin answered each redirect hop exactly once and was asked for nothing else.
    assert origin.request_count == sum(hops for _, hops in corpus)
    assert worker.proc is not None and worker.proc.poll() is None
