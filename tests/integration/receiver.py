"""A local webhook receiver that verifies every delivery with the Standard Webhooks reference library."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks.webhooks import Webhook


@dataclass
class Receiver:
    """Records each delivery per path; ``answers[path]`` is a list of statuses to answer in turn (then 200).

    ``delays[path]`` holds each answer to that path back that long; ``most_at_once`` is the most
    requests this receiver had open at the same time.
    """

    secret: str
    url: str = ""
    answers: dict[str, list[int]] = field(default_factory=dict)
    calls: list[dict[str, Any]] = field(default_factory=list)  # every try, verified or not
    delays: dict[str, float] = field(default_factory=dict)
    open_now: int = 0
    most_at_once: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def deliveries(self, path: str, *, ok_only: bool = True) -> list[dict[str, Any]]:
        with self.lock:
            return [call for call in self.calls if call["path"] == path and (call["status"] < 300 or not ok_only)]


@contextmanager
def webhook_receiver(secret: str) -> Iterator[Receiver]:
    receiver = Receiver(secret=secret)
    verifier = Webhook(secret)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            with receiver.lock:
                receiver.open_now += 1
                receiver.most_at_once = max(receiver.most_at_once, receiver.open_now)
            try:
                self._answer()
            finally:
                with receiver.lock:
                    receiver.open_now -= 1

        def _answer(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            received = time.time(), time.monotonic()  # wall clock for finished_at, monotonic for in-process stamps
            headers = {name.lower(): value for name, value in self.headers.items()}
            payload = verifier.verify(body, headers)  # raises on a bad signature: the test sees a 500 and no record
            with receiver.lock:
                queue = receiver.answers.get(self.path, [])
                status = queue.pop(0) if queue else 200
                receiver.calls.append({"path": self.path, "status": status, "webhook_id": headers["webhook-id"],
                                       "signatures": headers["webhook-signature"].split(" "), "payload": payload,
                                       "at": received[0], "at_monotonic": received[1]})
            time.sleep(receiver.delays.get(self.path, 0.0))
            self.send_response(status)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *_: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    receiver.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()


def payload_job(call: dict[str, Any]) -> str:
    return str(call["payload"]["data"]["job_id"])


def dumps(value: Any) -> str:
    return json.dumps(value)
