"""From manifest rows to jobs: what a line must hold, and the duplicate check of custom ids.

A line is ``custom_id`` (required, unique within the run; text or a whole number), ``image_url``,
``question`` or ``questions`` (a list: one job per question, same image; the run's default
``--question``s when it has neither), and optionally ``max_new_tokens``, ``generation`` or
``image_grid`` (less image detail than the workers' ``VQA_IMAGE_GRID``: ``full`` or ``RxC``). Any
other field makes the line invalid (a misspelt ``qestion`` must not silently use the default).
The first valid line with a custom id holds it; a later line with the same id is invalid.
"""

from __future__ import annotations

import json
import sqlite3
import tempfile
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from producer.bulk.ids import job_key
from producer.bulk.manifest import Row
from producer.errors import InvalidJob
from producer.schema import MAX_CUSTOM_ID_LENGTH, Job

if TYPE_CHECKING:
    from producer.client import VQAClient

MAX_QUESTIONS_PER_LINE = 16
FIELDS = frozenset({"custom_id", "image_url", "question", "questions", "max_new_tokens", "generation", "image_grid"})


class InvalidLine(InvalidJob):
    """A manifest line that gives no job; the run reports it and goes on (or, with --strict, publishes nothing)."""


class SeenIds:
    """The custom ids met so far, on disk (SQLite in a temporary file), so memory stays flat for any manifest."""

    def __init__(self) -> None:
        self._file = tempfile.NamedTemporaryFile(prefix="vqa-bulk-ids-", suffix=".sqlite")  # noqa: SIM115 - closed in close()
        self._db = sqlite3.connect(self._file.name, isolation_level=None, check_same_thread=False)
        self._db.executescript(
            "PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; PRAGMA cache_size=-4096;"
            "CREATE TABLE seen (custom_id TEXT PRIMARY KEY, line INTEGER) WITHOUT ROWID; BEGIN;"
        )
        self._pending = 0

    def first_line(self, custom_id: str, line: int) -> int | None:
        """Remember ``custom_id`` at ``line``; if it was met before, the line it was first met on."""
        cursor = self._db.execute("INSERT OR IGNORE INTO seen VALUES (?, ?)", (custom_id, line))
        self._pending += 1
        if self._pending >= 10_000:  # one transaction per 10,000 ids: fast, and its journal stays small
            self._db.execute("COMMIT")
            self._db.execute("BEGIN")
            self._pending = 0
        if cursor.rowcount == 1:
            return None
        (first,) = self._db.execute("SELECT line FROM seen WHERE custom_id = ?", (custom_id,)).fetchone()
        return int(first)

    def close(self) -> None:
        self._db.close()
        self._file.close()


class LineJobs:
    """Builds the jobs of one manifest line with the client's own validation (``VQAClient.build_job``)."""

    def __init__(
        self,
        client: VQAClient,
        *,
        bulk_id: str,
        questions: Sequence[str] = (),
        max_new_tokens: int | None = None,
        deadline: datetime | None = None,
        webhook_url: str | None = None,
    ) -> None:
        self.client = client
        self.bulk_id = bulk_id
        self.questions = tuple(questions)
        self.max_new_tokens = max_new_tokens
        self.deadline = deadline
        self.webhook_url = webhook_url

    def build(self, row: Row, seen: SeenIds) -> list[Job]:
        """The line's jobs (none for a blank line); InvalidLine saying why it gives none."""
        if row.error is not None:
            raise InvalidLine(row.error)
        fields = row.fields or {}
        if not fields:
            return []
        unknown = set(fields) - FIELDS
        if unknown:
            raise InvalidLine(f"unknown fields: {', '.join(sorted(unknown))} (a line has {', '.join(sorted(FIELDS))})")
        custom_id = _custom_id(fields.get("custom_id"))
        if "image_url" not in fields:
            raise InvalidLine("missing field: image_url")
        jobs = [self._job(fields, custom_id, question) for question in self._questions(fields)]
        first = seen.first_line(custom_id, row.line)
        if first is not None:
            raise InvalidLine(f"duplicate custom_id {custom_id!r} (first on line {first})")
        return jobs

    def _questions(self, fields: dict[str, Any]) -> list[str]:
        if "question" in fields and "questions" in fields:
            raise InvalidLine("give question or questions, not both")
        if "question" in fields:
            given: Any = [fields["question"]]
        elif "questions" in fields:
            given = fields["questions"]
            if not isinstance(given, list) or not given:
                raise InvalidLine("questions: must be a non-empty list of strings")
        elif self.questions:
            given = list(self.questions)
        else:
            raise InvalidLine("missing field: question (or questions, or run with --question)")
        if not all(isinstance(question, str) for question in given):
            raise InvalidLine("questions must be strings")
        unique = list(dict.fromkeys(question.strip() for question in given))
        if len(unique) > MAX_QUESTIONS_PER_LINE:
            raise InvalidLine(f"{len(unique)} questions; at most {MAX_QUESTIONS_PER_LINE} per line")
        return unique

    def _job(self, fields: dict[str, Any], custom_id: str, question: str) -> Job:
        image_url = fields["image_url"]
        if not isinstance(image_url, str):
            raise InvalidLine("image_url: must be a string")
        max_new_tokens = fields.get("max_new_tokens", self.max_new_tokens)
        generation = fields.get("generation")
        if generation is not None and not isinstance(generation, dict):
            raise InvalidLine("generation: must be an object")
        image_grid = fields.get("image_grid")
        if image_grid is not None and not isinstance(image_grid, str):
            raise InvalidLine("image_grid: must be a string (full or RxC, e.g. 2x1)")
        try:
            return self.client.build_job(
                image_url,
                question,
                idempotency_key=job_key(self.bulk_id, custom_id, question),
                max_new_tokens=max_new_tokens,
                generation=generation,
                deadline=self.deadline,
                webhook_url=self.webhook_url,
                bulk_id=self.bulk_id,
                custom_id=custom_id,
                image_grid=image_grid,
            )
        except InvalidJob as exc:
            raise InvalidLine(str(exc)) from exc
        except TypeError as exc:  # e.g. a max_new_tokens that is a list
            raise InvalidLine(str(exc)) from exc


def _custom_id(value: Any) -> str:
    if value is None:
        raise InvalidLine("missing field: custom_id")
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise InvalidLine("custom_id: must be a string or a whole number")
    text = str(value)
    if not text.strip() or len(text) > MAX_CUSTOM_ID_LENGTH:
        raise InvalidLine(f"custom_id: must be 1-{MAX_CUSTOM_ID_LENGTH} characters")
    return text


def invalid_report(row: Row, reason: str) -> str:
    """The line's entry in invalid.jsonl."""
    custom_id = (row.fields or {}).get("custom_id")
    return json.dumps(
        {"line": row.line, "reason": reason, "custom_id": custom_id if isinstance(custom_id, str | int) else None, "text": row.text},
        ensure_ascii=False,
        separators=(",", ":"),
    )
