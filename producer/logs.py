"""Logging set-up for every ``vqa`` process: plain text as before, or one JSON object per line (``VQA_LOG_FORMAT=json``).

A JSON line carries ``ts``, ``level``, ``logger``, ``message``, the process's ``worker`` name
(when it is a worker or the supervisor), and every ``extra`` the call site passed: ``job_id``,
``batch_id``, ``job_ids``, ``status``, ``code``... So a job is followed from submit to record
by its id::

    vqa submit ...                         {"message": "submitted", "job_id": "j1", ...}
    worker (worker/joblog.py)              {"message": "received", "job_id": "j1", "worker": "gpu0", ...}
                                           {"message": "batch ran", "batch_id": "gpu0-17", "job_ids": ["j1", ...]}
                                           {"message": "stored", "job_id": "j1", "batch_id": "gpu0-17", "status": "succeeded"}

    jq -c 'select(.job_id == "j1" or ((.job_ids // []) | index("j1")))' worker.log
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

from producer.settings import Settings

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# What every LogRecord has; anything else on a record came in as ``extra`` and goes into the JSON.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line; extras become fields (values that are not JSON become strings)."""

    def __init__(self, *, worker: str | None = None) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.worker is not None:
            entry["worker"] = self.worker
        for name, value in record.__dict__.items():
            if name not in _STANDARD and not name.startswith("_"):
                entry[name] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def configure_logging(settings: Settings, *, worker: str | None = None, level: str | None = None) -> None:
    """Install the one stderr handler on the root logger, in the format the settings ask for (replaces earlier handlers)."""
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter(worker=worker))
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level or settings.log_level)
