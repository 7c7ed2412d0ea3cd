"""``vqa events``: follow the completion-event stream (producer/events.py) as JSON lines."""

from __future__ import annotations

from typing import Annotated

import typer

app = typer.Typer(
    help="Completion events: one entry per stored record in the Redis Stream VQA_EVENTS_STREAM.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.command("tail")
def tail_command(
    group: Annotated[str | None, typer.Option("--group", help="Read in this consumer group (created if new, from the retained history); each printed event is acked.")] = None,
    consumer: Annotated[str | None, typer.Option("--consumer", help="Consumer name within --group (default host:pid).")] = None,
    count: Annotated[int | None, typer.Option("--count", min=1, help="Exit after this many events.")] = None,
) -> None:
    """Print events as JSON lines: without --group, those appended from now on (XREAD); with it, XREADGROUP/XACK."""
    from producer.cli import _settings
    from producer.connections import redis_client
    from producer.events import as_json_line, tail

    settings = _settings()
    client = redis_client(settings.broker_url, master_name=settings.sentinel_master_name)
    try:
        for event in tail(client, settings.events_stream, group=group, consumer=consumer, limit=count):
            typer.echo(as_json_line(event))
    except KeyboardInterrupt:
        pass
    finally:
        client.close()
