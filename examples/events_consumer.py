"""A consumer-group reader of the completion-event stream: XREADGROUP, XACK, and XAUTOCLAIM for a dead consumer's entries.

    python examples/events_consumer.py --redis redis://localhost:6379/0 --group billing --consumer c1

Each event is handled, then acked; an event another consumer of the group read and never acked
(it died) is claimed after --stale-ms and handled here. Delivery is at-least-once: dedupe on
job_id (here: a set in memory; in production, your own store's unique key).
"""

from __future__ import annotations

import argparse
import json

import redis


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--redis", default="redis://localhost:6379/0")
    parser.add_argument("--stream", default="vqa:events")
    parser.add_argument("--group", required=True)
    parser.add_argument("--consumer", required=True)
    parser.add_argument("--stale-ms", type=int, default=60_000)
    parser.add_argument("--max", type=int, default=0, help="exit after this many distinct jobs (0: run forever)")
    args = parser.parse_args()
    client = redis.Redis.from_url(args.redis, decode_responses=True)
    try:
        client.xgroup_create(args.stream, args.group, id="0", mkstream=True)  # "0": from the retained history
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise
    seen: set[str] = set()

    def handle(entry_id: str, fields: dict[str, str]) -> None:
        if fields and fields["job_id"] not in seen:  # an entry trimmed while pending comes back empty
            seen.add(fields["job_id"])
            print(json.dumps({"id": entry_id, **fields}), flush=True)
        client.xack(args.stream, args.group, entry_id)  # only after handling it

    while not args.max or len(seen) < args.max:
        # First what dead consumers left behind, then new entries.
        _cursor, claimed, *_ = client.xautoclaim(args.stream, args.group, args.consumer, min_idle_time=args.stale_ms, count=100)
        for entry_id, fields in claimed:
            handle(entry_id, fields)
        for _stream, entries in client.xreadgroup(args.group, args.consumer, {args.stream: ">"}, count=100, block=1000) or []:
            for entry_id, fields in entries:
                handle(entry_id, fields)


if __name__ == "__main__":
    main()
