"""Names in a bulk run: the run's id and each job's idempotency key."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

from producer.errors import InvalidJob
from producer.schema import BULK_ID_PATTERN, MAX_BULK_ID_LENGTH

_BULK_ID = re.compile(BULK_ID_PATTERN)


def check_bulk_id(name: str) -> str:
    """A ``--name`` as given, or InvalidJob: it becomes part of Redis keys and S3 keys."""
    if not name or len(name) > MAX_BULK_ID_LENGTH or not _BULK_ID.match(name):
        raise InvalidJob(f"a run name is 1-{MAX_BULK_ID_LENGTH} letters, digits, '.', '_' or '-', starting with a letter or digit; got {name!r}")
    return name


def derive_bulk_id(fingerprint: str, options: Mapping[str, Any]) -> str:
    """The id of a run without ``--name``: the manifest's content and every option that changes its jobs.

    The same manifest submitted again with the same options is the same run (so it resumes);
    another default question or answer length is another run.
    """
    content = json.dumps({"manifest": fingerprint, "options": dict(options)}, sort_keys=True, separators=(",", ":"))
    return "bulk-" + hashlib.sha256(content.encode()).hexdigest()[:20]


def job_key(bulk_id: str, custom_id: str, question: str) -> str:
    """The idempotency key of one job of a run: run, line and question name it, whatever else changes.

    Hashed because a custom id and a question may together be longer than a key may be.
    """
    content = json.dumps([bulk_id, custom_id, question.strip()], separators=(",", ":"))
    return "bulk:" + hashlib.sha256(content.encode()).hexdigest()
