"""``vqa bulk``: submit a manifest as a run, follow it, collect its results, cancel it."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from producer.errors import InvalidJob, VQAError

app = typer.Typer(
    help="Bulk runs: a manifest of images (JSON Lines, CSV, Parquet, or s3://bucket/prefix/) answered as one run with progress, resume and cancel.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _fail(message: str, *, code: int = 1) -> NoReturn:
    from producer.cli import _fail as fail

    fail(message, code=code)


@contextlib.contextmanager
def _client() -> Iterator[Any]:
    """A client for one command; our errors become exit codes (3: no such run, 1: anything else)."""
    from producer.cli import _client as make_client
    from producer.cli import _settings

    client = make_client(_settings())
    try:
        yield client
    except InvalidJob as exc:
        _fail(str(exc), code=3)
    except VQAError as exc:
        _fail(str(exc))
    finally:
        client.close()


@app.command()
def submit(
    source: Annotated[str, typer.Argument(help="Manifest: a .jsonl, .csv or .parquet file, '-' for JSON Lines on stdin (needs --name), or s3://bucket/prefix/ (every image under it).")],
    name: Annotated[str | None, typer.Option("--name", help="The run's id. Default: derived from the manifest's content and the options, so the same command is the same run.")] = None,
    question: Annotated[list[str] | None, typer.Option("--question", help="Default question for lines without one (repeat for several: one job each).")] = None,
    max_new_tokens: Annotated[int | None, typer.Option("--max-new-tokens", help="Answer length cap for lines without their own.")] = None,
    window: Annotated[int | None, typer.Option("--window", help="At most this many jobs queued but not finished (default VQA_BULK_WINDOW, 5000; 0: no limit).")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Validate the whole manifest first; publish nothing if any line is invalid.")] = False,
    expires_in: Annotated[str | None, typer.Option("--expires-in", help="Jobs not started this long after the run was created end as expired: 90s, 15m, 24h, 7d.")] = None,
    webhook: Annotated[str | None, typer.Option("--webhook", help="URL called (signed) as each job's record is stored.")] = None,
    priority: Annotated[str, typer.Option("--priority", help="The run's lane: high, default or low (default: low, so interactive jobs overtake it).")] = "low",
    wait: Annotated[bool, typer.Option("--wait", help="Stay until the run ended (progress all along).")] = False,
    out: Annotated[Path | None, typer.Option("--out", help="With --wait (implied): write the results file at the end (.jsonl, or .parquet).")] = None,
    interval: Annotated[float, typer.Option("--interval", help="Seconds between progress lines when not on a terminal.")] = 10.0,
) -> None:
    """Submit a manifest as a bulk run (or resume it: the same command again continues where it stopped). Prints the run's id first."""
    from producer.bulk.progress import ProgressDisplay
    from producer.bulk.run import start
    from producer.bulk.submit import InvalidManifest

    def on_invalid(line: int, reason: str) -> None:
        typer.echo(f"line {line}: invalid, skipped: {reason}", err=True)

    with _client() as client:
        try:
            run = start(
                client, source, name=name, questions=question or (), max_new_tokens=max_new_tokens, expires_in=expires_in,
                webhook_url=webhook, window=window, strict=strict, priority=priority, background=False, on_invalid=on_invalid,
            )
        except InvalidManifest as exc:
            for report in exc.reports:
                typer.echo(report, err=True)
            _fail(str(exc), code=2)
        except InvalidJob as exc:
            _fail(str(exc), code=2)
        typer.echo(run.bulk_id)
        waiting = wait or out is not None
        display = ProgressDisplay(sys.stderr, interval_s=interval)
        run.start_publishing()
        try:
            while True:
                status = run.status()
                display.update(status)
                if not run.publishing:
                    run.join()  # raises what stopped publishing, if anything did
                    status = run.status()
                    display.update(status)
                    if status.ended or not waiting:
                        break
                time.sleep(1.0)
        except KeyboardInterrupt:
            run.stop()
            typer.echo(f"stopped; run the same command again to resume {run.bulk_id}", err=True)
            raise typer.Exit(130) from None
        finally:
            display.close()
        if out is not None:
            lines = run.results(out)
            typer.echo(f"{lines} results written to {out}", err=True)
        run.close()


@app.command()
def status(
    bulk_id: Annotated[str, typer.Argument(help="The run's id (printed by bulk submit).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the whole status object as JSON.")] = False,
) -> None:
    """Print a run's state and counts (total = queued + running + succeeded + failed + cancelled + expired)."""
    from producer.bulk.progress import summary

    with _client() as client:
        found = client.bulk(name=bulk_id).status()
    typer.echo(found.model_dump_json(indent=2) if as_json else summary(found, None))


@app.command()
def results(
    bulk_id: Annotated[str, typer.Argument(help="The run's id.")],
    out: Annotated[Path, typer.Option("--out", help="The results file: .jsonl (JSON Lines) or .parquet.")],
) -> None:
    """Write one line per finished job (custom_id, question, job_id, status, answer, error, usage): partial while the run runs."""
    with _client() as client:
        handle = client.bulk(name=bulk_id)
        found = handle.status()
        lines = handle.results(out)
    complete = "complete" if found.ended else f"partial, the run is {found.state}"
    typer.echo(json.dumps({"bulk_id": bulk_id, "results": lines, "total": found.counts.total, "file": str(out), "complete": found.ended}))
    typer.echo(f"{lines} results written to {out} ({complete})", err=True)


@app.command()
def cancel(bulk_id: Annotated[str, typer.Argument(help="The run's id.")]) -> None:
    """Cancel a run: nothing more is published, queued jobs end as cancelled, running ones finish, finished ones stay."""
    from producer.bulk.progress import summary

    with _client() as client:
        found = client.bulk(name=bulk_id).cancel()
    typer.echo(summary(found, None))
