"""The ``vqa`` command line. Producer commands import nothing heavy; worker commands load torch lazily."""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from pydantic import ValidationError

from producer.errors import InvalidJob, VQAError
from producer.settings import Settings

app = typer.Typer(
    help="Visual question answering over a Celery/Redis queue with LLaVA-NeXT workers. Settings come from VQA_* environment variables.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class Priority(str, Enum):
    """The lanes of producer/keys.py PRIORITIES (typer shows them as the choices)."""

    high = "high"
    default = "default"
    low = "low"


def _settings() -> Settings:
    try:
        settings = Settings()
    except ValidationError as exc:
        # Without the offending values: a setting may hold a password or a key.
        problems = "; ".join(
            f"VQA_{'_'.join(str(part) for part in err['loc']).upper()}: {err['msg']}"
            for err in exc.errors(include_url=False, include_input=False)
        )
        _fail(f"invalid VQA_* settings: {problems}", code=2)
    if settings.log_format == "json":
        # Producer commands log as JSON too (the "submitted" line a job is followed from); in
        # text mode they keep Python's default (warnings only).
        from producer.logs import configure_logging

        configure_logging(settings)
    return settings


def _fail(message: str, *, code: int = 1) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _client(settings: Settings) -> Any:
    from producer.client import VQAClient

    return VQAClient(settings)


def _print_record(record: Any) -> None:
    typer.echo(record.model_dump_json(indent=2))


@app.command()
def submit(
    image: Annotated[str, typer.Option("--image", help="Image URL (http, https or s3://bucket/key).")],
    question: Annotated[str, typer.Option("--question", help="The question about the image.")],
    idempotency_key: Annotated[str | None, typer.Option("--idempotency-key", help="Same key, same job id: submitted once.")] = None,
    max_new_tokens: Annotated[int | None, typer.Option("--max-new-tokens", help="Answer length cap (default VQA_MAX_NEW_TOKENS).")] = None,
    deadline: Annotated[str | None, typer.Option("--deadline", help="ISO 8601 time with a zone; not started by then, the job ends as expired.")] = None,
    expires_in: Annotated[str | None, typer.Option("--expires-in", help="Like --deadline, from now: 90s, 15m, 24h, 7d.")] = None,
    webhook: Annotated[str | None, typer.Option("--webhook", help="URL called (signed) once the job's record is stored.")] = None,
    image_grid: Annotated[
        str | None,
        typer.Option("--image-grid", help="Less image detail than the workers' VQA_IMAGE_GRID: full or RxC (e.g. 2x1, 1x1); fewer image tokens, faster."),
    ] = None,
    priority: Annotated[Priority, typer.Option("--priority", help="Lane: high jobs are taken before default ones, default before low.")] = Priority.default,
    wait: Annotated[bool, typer.Option("--wait", help="Wait and print the result record; exit 1 if the job failed.")] = False,
    timeout: Annotated[float | None, typer.Option("--timeout", help="Seconds to wait with --wait.")] = None,
) -> None:
    """Submit one job; print its id (or, with --wait, its record as JSON)."""
    settings = _settings()
    client = _client(settings)
    try:
        job_id = client.submit(
            image,
            question,
            idempotency_key=idempotency_key,
            max_new_tokens=max_new_tokens,
            deadline=deadline,
            expires_in=expires_in,
            webhook_url=webhook,
            image_grid=image_grid,
            priority=priority.value,
        )
        if not wait:
            typer.echo(job_id)
            return
        record = client.wait(job_id, timeout=timeout)
    except InvalidJob as exc:
        _fail(str(exc), code=2)
    except TimeoutError as exc:
        _fail(str(exc))
    except VQAError as exc:
        _fail(str(exc))
    finally:
        client.close()
    _print_record(record)
    if record.status != "succeeded":
        raise typer.Exit(1)


@app.command("submit-many")
def submit_many(
    path: Annotated[Path, typer.Argument(help="JSON Lines file: one {\"image_url\", \"question\", ...} object per line; '-' for stdin.")],
    priority: Annotated[Priority, typer.Option("--priority", help="Lane of every job: high, default or low.")] = Priority.default,
) -> None:
    """Validate every line, then enqueue them all (nothing is enqueued if any line is invalid). Prints one id per line."""
    settings = _settings()
    try:
        text = sys.stdin.read() if str(path) == "-" else path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        _fail(f"cannot read {path}: {exc.strerror if isinstance(exc, OSError) and exc.strerror else exc}", code=2)
    client = _client(settings)
    try:
        # Every problem at once, numbered by the file's own lines (blank lines count).
        jobs: list[Any] = []
        problems: list[str] = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                jobs.append(client.build_request(json.loads(line)))
            except json.JSONDecodeError as exc:
                problems.append(f"line {number}: not JSON ({exc.msg})")
            except InvalidJob as exc:
                problems.append(f"line {number}: {exc}")
        if problems:
            _fail("; ".join(problems), code=2)
        ids = client.submit_jobs(jobs, priority=priority.value)
    except VQAError as exc:
        _fail(str(exc))
    finally:
        client.close()
    for job_id in ids:
        typer.echo(job_id)


@app.command()
def cancel(job_ids: Annotated[list[str], typer.Argument(help="Job ids printed by submit.")]) -> None:
    """Cancel jobs: one that has not reached a model ends as a cancelled record (state REVOKED); one in the model finishes."""
    client = _client(_settings())
    try:
        client.cancel(job_ids)
    except VQAError as exc:
        _fail(str(exc))
    finally:
        client.close()
    for job_id in job_ids:
        typer.echo(f"{job_id} cancelled")


@app.command()
def status(job_id: Annotated[str, typer.Argument(help="The job id printed by submit.")]) -> None:
    """Print the job's Celery state: PENDING, STARTED, SUCCESS, FAILURE or REVOKED (cancelled or expired)."""
    client = _client(_settings())
    try:
        typer.echo(client.status(job_id))
    except VQAError as exc:
        _fail(str(exc))
    finally:
        client.close()


@app.command()
def result(job_id: Annotated[str, typer.Argument(help="The job id printed by submit.")]) -> None:
    """Print the job's result record as JSON (exit 3 if it has none yet, 1 if it failed)."""
    client = _client(_settings())
    try:
        record = client.result(job_id)
    except VQAError as exc:
        _fail(str(exc))
    finally:
        client.close()
    if record is None:
        _fail(f"job {job_id} has no record yet", code=3)
    _print_record(record)
    if record.status != "succeeded":
        raise typer.Exit(1)


@app.command("dead-letters")
def dead_letters(
    limit: Annotated[int, typer.Option("--limit", help="How many to show, newest first.")] = 20,
) -> None:
    """List queue entries the workers refused (malformed, unsigned, invalid job), newest first, as JSON lines."""
    import redis

    from producer.connections import redis_client
    from worker.broker import RedisQueue

    settings = _settings()
    queue = RedisQueue(redis_client(settings.broker_url, master_name=settings.sentinel_master_name), queue=settings.queue)
    try:
        letters = queue.dead_letters(limit)
    except redis.RedisError as exc:
        _fail(f"cannot reach Redis: {type(exc).__name__}")
    finally:
        queue.client.close()
    for letter in letters:
        typer.echo(json.dumps(letter))


@app.command()
def worker(
    gpus: Annotated[str | None, typer.Option("--gpus", help="Supervise one worker per GPU: all, or ids like 0,1 (each pinned with CUDA_VISIBLE_DEVICES).")] = None,
    processes: Annotated[int | None, typer.Option("--processes", min=1, help="Supervise N workers on this host (CPU hosts, tests).")] = None,
) -> None:
    """Run a worker: load the model once, then consume and answer jobs in micro-batches until SIGTERM.

    With --gpus or --processes, supervise one worker process per GPU (or N): a crashed one is
    restarted with backoff, SIGTERM stops them all warmly. VQA_METRICS_PORT is the first
    child's port; the others take the next ones.
    """
    settings = _settings()
    from producer.logs import configure_logging

    if gpus is not None or processes is not None:
        from worker.supervisor import Supervisor, plan_children, supervisor_name

        try:
            specs = plan_children(settings, gpus=gpus, processes=processes)
        except ValueError as exc:
            _fail(str(exc), code=2)
        configure_logging(settings, worker=supervisor_name(settings))
        raise typer.Exit(Supervisor(specs, settings=settings).run())
    from worker.main import default_worker_name, run_worker

    configure_logging(settings, worker=default_worker_name(settings))
    try:
        run_worker(settings)
    except VQAError as exc:
        _fail(str(exc))


@app.command()
def exporter(
    host: Annotated[str, typer.Option("--host", help="Interface to listen on.")] = "0.0.0.0",  # noqa: S104 - a metrics endpoint in a pod
    port: Annotated[int, typer.Option("--port", help="Port of /metrics.")] = 9200,
) -> None:
    """Serve the fleet's signals from Redis for Prometheus and autoscalers: backlog per priority lane, age of the oldest job, dead letters."""
    settings = _settings()
    from producer.exporter import run_exporter
    from producer.logs import configure_logging

    configure_logging(settings)
    run_exporter(settings, host=host, port=port)


@app.command()
def api(
    host: Annotated[str, typer.Option("--host", help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port of the HTTP API.")] = 8000,
) -> None:
    """Serve the HTTP job API (jobs, bulk runs, S3 bucket notifications): the producer side over HTTP, no model.

    Every endpoint but /healthz needs a bearer token from VQA_API_TOKENS; VQA_INGEST_RULES names
    the rules that turn bucket notifications into jobs.
    """
    settings = _settings()
    from producer.api.server import run_api
    from producer.logs import configure_logging

    configure_logging(settings)
    try:
        run_api(settings, host=host, port=port)
    except VQAError as exc:
        _fail(str(exc), code=2)


@app.command("make-tiny-model")
def make_tiny_model(
    directory: Annotated[Path, typer.Argument(help="Where to save the checkpoint.")],
    size: Annotated[str, typer.Option(help="tiny (tests, demo) or bench (benchmarks).")] = "tiny",
    seed: Annotated[int, typer.Option(help="Weights come from this seed.")] = 0,
) -> None:
    """Build a small random-weight LLaVA-NeXT checkpoint (real architecture, local tokenizer). Its answers are random text."""
    from worker.dev.tiny_model import build_tiny_model

    if size not in ("tiny", "bench"):
        _fail("--size must be tiny or bench", code=2)
    path = build_tiny_model(directory, size=size, seed=seed)  # type: ignore[arg-type]
    typer.echo(str(path))


@app.command()
def demo(
    jobs: Annotated[int, typer.Option(help="How many jobs to submit.")] = 8,
) -> None:
    """Run the whole pipeline on this machine: private Redis, S3 API server, image server, one worker, a few jobs."""
    from worker.dev.demo import run_demo

    raise typer.Exit(run_demo(_settings(), jobs=jobs))


from producer.bulk.cli import app as bulk_app  # noqa: E402 - after _settings and _client, which it uses

app.add_typer(bulk_app, name="bulk")

from producer.events_cli import app as events_app  # noqa: E402 - as bulk_app

app.add_typer(events_app, name="events")

from producer.webhooks.cli import app as webhooks_app  # noqa: E402 - as bulk_app

app.add_typer(webhooks_app, name="webhooks")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
