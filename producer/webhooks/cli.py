"""``vqa webhooks``: the delivery process, and its dead letters (``dead``, ``retry``)."""

from __future__ import annotations

import json
import signal
import threading
from typing import Annotated, Any

import typer

app = typer.Typer(
    help="Signed webhook delivery (Standard Webhooks) of completion events; run it bare to start a dispatcher.",
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _deliveries() -> Any:
    from producer.cli import _settings
    from producer.connections import redis_client
    from producer.webhooks.deliveries import Deliveries

    settings = _settings()
    return Deliveries(redis_client(settings.broker_url, master_name=settings.sentinel_master_name), dead_stream=settings.webhook_dead_stream, done_ttl_s=settings.events_dedupe_ttl_s)


@app.callback(invoke_without_command=True)
def webhooks(
    ctx: typer.Context,
    consumer: Annotated[str | None, typer.Option("--consumer", help="This dispatcher's name in VQA_WEBHOOK_GROUP (default host:pid).")] = None,
) -> None:
    """Run a dispatcher until SIGTERM/SIGINT: consume VQA_EVENTS_STREAM in VQA_WEBHOOK_GROUP, POST each event to its webhook_url."""
    if ctx.invoked_subcommand is not None:
        return
    import logging

    from producer.cli import _fail, _settings
    from producer.connections import redis_client
    from producer.webhooks.dispatcher import Dispatcher

    settings = _settings()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    try:
        dispatcher = Dispatcher(redis_client(settings.broker_url, master_name=settings.sentinel_master_name), settings=settings, consumer=consumer, stopping=stopping)
    except ValueError as exc:
        _fail(str(exc), code=2)
    typer.echo(f"vqa webhooks {dispatcher.consumer} ready", err=True)
    dispatcher.run()


@app.command("dead")
def dead(count: Annotated[int | None, typer.Option("--count", min=1, help="At most this many, oldest first.")] = None) -> None:
    """List dead-lettered deliveries (out of tries, 410 Gone, or refused URLs) as JSON lines."""
    for entry in _deliveries().list_dead(count=count):
        typer.echo(json.dumps(entry, separators=(",", ":")))


@app.command("retry")
def retry(entry_ids: Annotated[list[str] | None, typer.Argument(help="Dead-letter entry ids (from `dead`); none = all.")] = None) -> None:
    """Put dead-lettered deliveries back, due now with a fresh retry schedule; print how many."""
    typer.echo(_deliveries().replay(entry_ids or None))
