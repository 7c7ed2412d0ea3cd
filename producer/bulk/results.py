"""The results file of a bulk run: one line per finished job, JSON Lines or Parquet (by the file's suffix).

Each line: ``custom_id``, ``question``, ``job_id``, ``status`` (succeeded, failed, cancelled,
expired), ``answer``, ``error`` ({code, message} or null) and ``usage``. It holds the jobs
finished when it is written (partial results at any time) and every job of the run once the
run has ended. It is written from the run's completion log (producer/bulk/completions.py),
about one S3 request per 1,000 jobs, never one per job, to a temporary file renamed into place.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from producer.errors import InvalidJob

FIELDS = ("custom_id", "question", "job_id", "status", "answer", "error", "usage")
_PARQUET_BATCH = 10_000


def result_line(entry: dict[str, Any]) -> dict[str, Any]:
    return {name: entry.get(name) for name in FIELDS}


def write_results(entries: Iterable[dict[str, Any]], path: Path) -> int:
    """Write the entries to ``path`` (``.parquet``: Parquet, else JSON Lines); return how many lines."""
    path = Path(path)
    parquet = path.suffix.lower() in (".parquet", ".pq")
    if parquet:
        try:
            import pyarrow  # noqa: F401
        except ImportError as exc:
            raise InvalidJob("Parquet results need pyarrow: pip install 'vqa-queue[parquet]'") from exc
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        lines = _write_parquet(entries, Path(temporary)) if parquet else _write_jsonl(entries, Path(temporary))
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return lines


def _write_jsonl(entries: Iterable[dict[str, Any]], path: Path) -> int:
    lines = 0
    with path.open("w", encoding="utf-8") as out:
        for entry in entries:
            out.write(json.dumps(result_line(entry), ensure_ascii=False, separators=(",", ":")) + "\n")
            lines += 1
    return lines


def _schema() -> Any:
    import pyarrow as pa

    return pa.schema(
        [
            ("custom_id", pa.string()),
            ("question", pa.string()),
            ("job_id", pa.string()),
            ("status", pa.string()),
            ("answer", pa.string()),
            ("error", pa.struct([("code", pa.string()), ("message", pa.string())])),
            (
                "usage",
                pa.struct(
                    [("prompt_tokens", pa.int64()), ("image_tokens", pa.int64()), ("generated_tokens", pa.int64()), ("model_ms", pa.float64())]
                ),
            ),
        ]
    )


def _write_parquet(entries: Iterable[dict[str, Any]], path: Path) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = _schema()
    lines = 0
    with pq.ParquetWriter(path, schema) as writer:
        for batch in _batches(entries):
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))
            lines += len(batch)
    return lines


def _batches(entries: Iterable[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    for entry in entries:
        batch.append(result_line(entry))
        if len(batch) >= _PARQUET_BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def read_results(path: Path) -> list[dict[str, Any]]:
    """A results file read back (tests, notebooks): JSON Lines or Parquet."""
    path = Path(path)
    if path.suffix.lower() in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        return list(pq.read_table(path).to_pylist())
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]
