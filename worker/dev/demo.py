"""`vqa demo`: the whole pipeline on one machine with private services and the bundled sample images."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import boto3

from producer import keys
from producer.client import VQAClient
from producer.settings import DEFAULT_MODEL, Settings
from worker.dev.services import RedisServer, S3Server, WorkerProcess, image_server

SAMPLES = Path(__file__).parent / "samples"
TINY_MODEL_DIR = Path("models/tiny")
QUESTIONS = [
    "What is shown in this image?",
    "What colours dominate this picture?",
    "Is it day or night?",
    "Describe the scene in one sentence.",
]


def _say(text: str = "") -> None:
    print(text, flush=True)


def run_demo(settings: Settings, *, jobs: int = 8) -> int:
    """Start everything, answer ``jobs`` questions, print them, stop everything. Returns an exit code."""
    for name, value in {"AWS_ACCESS_KEY_ID": "demo", "AWS_SECRET_ACCESS_KEY": "demo", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        os.environ.setdefault(name, value)
    model = settings.model
    tiny = model == DEFAULT_MODEL and not _has_cuda()
    if tiny:
        from worker.dev.tiny_model import build_tiny_model

        if not (TINY_MODEL_DIR / "config.json").exists():
            _say(f"building the tiny test model in {TINY_MODEL_DIR} ...")
            build_tiny_model(TINY_MODEL_DIR, size="tiny", seed=0)
        model = str(TINY_MODEL_DIR.resolve())
    _say(f"model: {model}" + ("  (tiny random-weight LLaVA-NeXT: its answers are RANDOM TEXT)" if tiny else ""))

    redis_server = RedisServer().start()
    s3_server = S3Server().start()
    worker: WorkerProcess | None = None
    try:
        with image_server(SAMPLES) as images_url:
            bucket = "vqa-demo"
            boto3.client("s3", endpoint_url=s3_server.url).create_bucket(Bucket=bucket)
            env = {
                "VQA_BROKER_URL": redis_server.url,
                "VQA_RESULT_BACKEND": redis_server.url,
                "VQA_S3_ENDPOINT_URL": s3_server.url,
                "VQA_S3_BUCKET": bucket,
                "VQA_MODEL": model,
                "VQA_QUANTIZATION": settings.quantization if not tiny else "nf4",
                "VQA_DEVICE": settings.device,
                "VQA_MAX_NEW_TOKENS": str(min(settings.max_new_tokens, 24) if tiny else settings.max_new_tokens),
                "VQA_MAX_BATCH_SIZE": str(settings.max_batch_size),
                "VQA_MAX_BATCH_DELAY_MS": str(max(settings.max_batch_delay_ms, 200)),
                # The sample server is on loopback, which the worker blocks unless allowed.
                "VQA_ALLOWED_HOSTS": images_url.removeprefix("http://"),
            }
            os.environ.update(env)
            _say(f"redis-server on {redis_server.url}, S3 API on {s3_server.url}, images on {images_url}")
            log_path = Path(tempfile.mkdtemp(prefix="vqa-demo-")) / "worker.log"
            _say(f"starting a worker (log: {log_path}) ...")
            worker = WorkerProcess(env=env, log_path=log_path).start(ready_timeout=1800)
            samples = sorted(path.name for path in SAMPLES.iterdir())
            with VQAClient(Settings()) as client:
                submitted = []
                started = time.perf_counter()
                for index in range(jobs):
                    url = f"{images_url}/{samples[index % len(samples)]}"
                    # Shift the question each round so every (image, question) pair is a different job.
                    question = QUESTIONS[(index + index // len(samples)) % len(QUESTIONS)]
                    submitted.append((client.submit(url, question), url, question))
                _say(f"submitted {len(submitted)} jobs\n")
                failures = 0
                for job_id, url, question in submitted:
                    record = client.wait(job_id, timeout=600)
                    key = keys.result_key("", job_id) if record.status == "succeeded" else keys.failed_key("", job_id)
                    _say(f"{job_id}  {url.rsplit('/', 1)[-1]}  batch={record.batch_size}")
                    _say(f"  Q: {question}")
                    _say(f"  A: {record.answer!r}" if record.answer is not None else f"  FAILED: {record.error}")
                    _say(f"  s3://{bucket}/{key}")
                    failures += record.status != "succeeded"
                elapsed = time.perf_counter() - started
            _say(f"\n{len(submitted) - failures}/{len(submitted)} answered in {elapsed:.1f} s.")
            if tiny:
                _say(
                    "\nThese answers come from a tiny model with random weights: they are random text, not descriptions.\n"
                    "For real answers run the 7B model on a GPU:\n"
                    "  TORCH_SPEC=torch VQA_MODEL=llava-hf/llava-v1.6-vicuna-7b-hf VQA_DEVICE=cuda make demo\n"
                    "or the docker recipe (docker/compose.yaml), see README.md."
                )
            return 1 if failures else 0
    finally:
        if worker is not None:
            worker.stop()
        s3_server.stop()
        redis_server.cleanup()
        _say("stopped the worker, redis-server and the S3 API server.")


def _has_cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False
