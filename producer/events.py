"""Completion events: what the worker appends to the Redis Stream ``VQA_EVENTS_STREAM`` once a record is stored.

One entry per stored record, with these fields (all strings; empty when a job has none):

    job_id       the job
    status       succeeded | failed
    error_code   the failed record's error code ("" when it succeeded)
    bulk_id      the bulk run it belongs to
    custom_id    the caller's own id for it (bulk manifests)
    s3_bucket    where the record is: s3://<s3_bucket>/<s3_key>
    s3_key
    finished_at  ISO 8601, when the record was made
    webhook_url  only when the job asked to be called (``vqa webhooks`` delivers it)

Delivery is at-least-once: a worker that dies after storing a record and before appending its
event appends it when the job is redelivered, so a consumer may (rarely) see a job twice and
dedupes on ``job_id``. Consumers read with consumer groups (XREADGROUP, XACK, XAUTOCLAIM);
docs/integration.md and examples/events_consumer.py show the pattern.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator, Mapping
from typing import Any

import redis

from producer import keys
from producer.schema import Record

FIELDS = ("job_id", "status", "error_code", "bulk_id", "custom_id", "s3_bucket", "s3_key", "finished_at")


def event_fields(record: Record, *, bucket: str, prefix: str, webhook_url: str | None) -> dict[str, str]:
    """The stream entry for a stored record."""
    key = keys.result_key(prefix, record.job_id) if record.status == "succeeded" else keys.failed_key(prefix, record.job_id)
    fields = {
        "job_id": record.job_id,
        "status": record.status,
        "error_code": record.error.code if record.error is not None else "",
        "bulk_id": record.bulk_id or "",
        "custom_id": record.custom_id or "",
        "s3_bucket": bucket,
        "s3_key": key,
        "finished_at": record.finished_at.isoformat() if record.finished_at is not None else "",
    }
    if webhook_url:
        fields["webhook_url"] = webhook_url
    return fields


def decode_entry(entry_id: bytes | str, fields: Mapping[bytes | str, bytes | str]) -> dict[str, str]:
    """A stream entry as a plain dict of strings, with its stream id under ``id``."""

    def text(value: bytes | str) -> str:
        return value.decode() if isinstance(value, bytes) else value

    event = {text(name): text(value) for name, value in fields.items()}
    return {"id": text(entry_id), **event}


def default_consumer() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def ensure_group(client: redis.Redis, stream: str, group: str, *, start: str = "0") -> None:
    """Create the consumer group (and the stream) unless it exists; a new group reads the retained history."""
    try:
        client.xgroup_create(stream, group, id=start, mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def tail(
    client: redis.Redis, stream: str, *, group: str | None = None, consumer: str | None = None, block_ms: int = 1000,
    limit: int | None = None,
) -> Iterator[dict[str, str]]:
    """Yield events as they come: plain XREAD from now, or XREADGROUP in ``group`` (acked once yielded)."""
    seen = 0
    if group is None:
        last = "$"
        while limit is None or seen < limit:
            replies = client.xread({stream: last}, block=block_ms, count=100)
            for _name, entries in replies or []:
                for entry_id, fields in entries:
                    last = entry_id
                    yield decode_entry(entry_id, fields)
                    seen += 1
                    if limit is not None and seen >= limit:
                        return
        return
    consumer = consumer or default_consumer()
    ensure_group(client, stream, group)
    while limit is None or seen < limit:
        replies = client.xreadgroup(group, consumer, {stream: ">"}, block=block_ms, count=100)
        for _name, entries in replies or []:
            for entry_id, fields in entries:
                yield decode_entry(entry_id, fields)
                client.xack(stream, group, entry_id)  # printed: handled, as far as a tail goes
                seen += 1
                if limit is not None and seen >= limit:
                    return


def as_json_line(event: Mapping[str, Any]) -> str:
    return json.dumps(event, separators=(",", ":"), sort_keys=False)
