"""Manifest readers: JSON Lines, CSV, Parquet (with ``pyarrow``), and an S3 prefix listed as a manifest.

Each yields :class:`Row` values one at a time, so any manifest size reads in flat memory. A row
is one manifest line as a mapping of fields, or the reason it could not be read (bad JSON, not
UTF-8, too long); what the fields mean is checked by producer/bulk/lines.py.

How a resumed run finds its place: file manifests are read again from the first line (the
submitter skips what the run's cursor says was published, and sees every custom id again to
catch duplicates), an S3 listing starts after the last key published (``StartAfter``).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from producer.errors import InvalidJob

MAX_LINE_BYTES = 1 << 20  # a manifest line is a few hundred bytes; this much is a broken file
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp")
_READ = 1 << 20


@dataclass(frozen=True)
class Row:
    """One manifest line: its fields, or why they could not be read."""

    line: int  # 1-based, as an editor shows it (CSV: the line its record starts on; Parquet: the row)
    fields: dict[str, Any] | None
    error: str | None = None
    text: str = ""  # the line as read, shortened, for the invalid-line report
    position: str = ""  # where a listing resumes after this row (S3 sources)


class Manifest(Protocol):
    """A source of rows."""

    source: str
    replays: bool  # True: a resumed run reads it from the first line again

    def scan(self) -> tuple[str, int | None]:
        """(a fingerprint of its content, its number of lines if known); "" when it cannot be known up front."""
        ...

    def rows(self, *, after: str = "", after_line: int = 0) -> Iterator[Row]:
        """The rows; a source that does not replay starts after ``after`` (a position) numbering from ``after_line`` + 1."""
        ...


def open_manifest(source: str, *, s3_client: Any = None) -> Manifest:
    """The reader for ``source``: a path (by suffix: .csv, .parquet, else JSON Lines), ``-`` (stdin), or ``s3://bucket/prefix/``."""
    if source.startswith("s3://"):
        bucket, _, prefix = source.removeprefix("s3://").partition("/")
        if not bucket or (prefix and not prefix.endswith("/")):
            raise InvalidJob(f"an S3 source is a prefix ending in '/', e.g. s3://bucket/incoming/2026-11/; got {source!r}")
        if s3_client is None:
            raise InvalidJob("an S3 source needs an S3 client")
        return S3PrefixManifest(s3_client, bucket=bucket, prefix=prefix)
    if source == "-":
        return JsonLinesManifest(None)
    path = Path(source)
    if not path.is_file():
        raise InvalidJob(f"manifest {source} is not a readable file")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return CsvManifest(path)
    if suffix in (".parquet", ".pq"):
        return ParquetManifest(path)
    return JsonLinesManifest(path)


def _scan_file(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    lines = 0
    last = b"\n"
    with path.open("rb") as handle:
        while block := handle.read(_READ):
            digest.update(block)
            lines += block.count(b"\n")
            last = block[-1:]
    return digest.hexdigest(), lines + (last != b"\n")


def _short(text: str, limit: int = 500) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


class JsonLinesManifest:
    """One JSON object per line; blank lines are skipped (and counted, so line numbers match an editor's)."""

    replays = True

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.source = "-" if path is None else str(path)

    def scan(self) -> tuple[str, int | None]:
        if self.path is None:
            return "", None  # stdin cannot be read twice: such a run needs a --name
        return _scan_file(self.path)

    def rows(self, *, after: str = "", after_line: int = 0) -> Iterator[Row]:
        handle = sys.stdin.buffer if self.path is None else self.path.open("rb")
        try:
            number = 0
            while True:
                raw = handle.readline(MAX_LINE_BYTES + 1)
                if not raw:
                    return
                number += 1
                if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                    while (rest := handle.readline(MAX_LINE_BYTES)) and not rest.endswith(b"\n"):
                        pass  # skip the rest of the overlong line
                    yield Row(number, None, f"line longer than {MAX_LINE_BYTES} bytes", _short(raw[:500].decode(errors="replace")))
                    continue
                yield _json_row(number, raw)
        finally:
            if handle is not sys.stdin.buffer:
                handle.close()


def _json_row(number: int, raw: bytes) -> Row:
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        return Row(number, None, "not UTF-8", _short(raw.decode(errors="replace")))
    if not text.strip():
        return Row(number, {})  # blank: skipped by the caller
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return Row(number, None, f"not JSON ({exc.msg} at column {exc.colno})", _short(text.strip()))
    if not isinstance(value, dict):
        return Row(number, None, "not a JSON object", _short(text.strip()))
    return Row(number, value, text=_short(text.strip()))


class CsvManifest:
    """A header row, then one record per row; empty cells are missing fields, ``questions`` is a JSON list."""

    replays = True

    def __init__(self, path: Path) -> None:
        self.path = path
        self.source = str(path)

    def scan(self) -> tuple[str, int | None]:
        digest, lines = _scan_file(self.path)
        return digest, max(lines - 1, 0)  # the header; quoted newlines make this an estimate

    def rows(self, *, after: str = "", after_line: int = 0) -> Iterator[Row]:
        with self.path.open("rb") as binary:
            text = io.TextIOWrapper(binary, encoding="utf-8", newline="")
            reader = csv.reader(text)
            try:
                header = next(reader)
            except StopIteration:
                return
            except (csv.Error, UnicodeDecodeError) as exc:
                yield Row(1, None, f"unreadable header: {exc}")
                return
            names = [name.strip() for name in header]
            while True:
                start = reader.line_num + 1
                try:
                    cells = next(reader)
                except StopIteration:
                    return
                except (csv.Error, UnicodeDecodeError) as exc:
                    yield Row(start, None, f"not CSV ({exc})")
                    if isinstance(exc, UnicodeDecodeError):
                        return  # the decoder cannot find its way back into the file
                    continue
                if not any(cell.strip() for cell in cells):
                    yield Row(start, {})
                    continue
                if len(cells) != len(names):
                    yield Row(start, None, f"{len(cells)} cells for {len(names)} columns", _short(",".join(cells)))
                    continue
                fields = {name: cell for name, cell in zip(names, cells, strict=True) if cell.strip()}
                yield _typed_csv_row(start, fields, _short(",".join(cells)))


def _typed_csv_row(line: int, fields: dict[str, Any], text: str) -> Row:
    """CSV cells are text: a questions cell is a JSON list, numbers are numbers."""
    if "questions" in fields:
        try:
            fields["questions"] = json.loads(fields["questions"])
        except json.JSONDecodeError:
            return Row(line, None, 'questions: not a JSON list (e.g. ["What is shown?", "What colour?"])', text)
    if "max_new_tokens" in fields:
        try:
            fields["max_new_tokens"] = int(fields["max_new_tokens"])
        except ValueError:
            return Row(line, None, "max_new_tokens: not a whole number", text)
    return Row(line, fields, text=text)


class ParquetManifest:
    """A Parquet file (``pip install 'vqa-queue[parquet]'``), read one record batch at a time."""

    replays = True
    batch_rows = 10_000

    def __init__(self, path: Path) -> None:
        self.path = path
        self.source = str(path)
        try:
            import pyarrow.parquet  # noqa: F401 - only to fail early and clearly
        except ImportError as exc:
            raise InvalidJob("Parquet manifests need pyarrow: pip install 'vqa-queue[parquet]'") from exc

    def scan(self) -> tuple[str, int | None]:
        import pyarrow.parquet as pq

        digest, _ = _scan_file(self.path)
        return digest, int(pq.ParquetFile(self.path).metadata.num_rows)

    def rows(self, *, after: str = "", after_line: int = 0) -> Iterator[Row]:
        import pyarrow.parquet as pq

        number = 0
        for batch in pq.ParquetFile(self.path).iter_batches(batch_size=self.batch_rows):
            for values in batch.to_pylist():
                number += 1
                fields = {name: value for name, value in values.items() if value is not None}
                yield Row(number, fields, text=_short(json.dumps(fields, default=str)))


class S3PrefixManifest:
    """Every image under ``s3://bucket/prefix/``: one line per key, the key its custom id (non-images are skipped)."""

    replays = False

    def __init__(self, s3_client: Any, *, bucket: str, prefix: str) -> None:
        self.s3 = s3_client
        self.bucket = bucket
        self.prefix = prefix
        self.source = f"s3://{bucket}/{prefix}"

    def scan(self) -> tuple[str, int | None]:
        # The listing is the manifest and may grow while the run runs: the source names the run.
        return hashlib.sha256(self.source.encode()).hexdigest(), None

    def rows(self, *, after: str = "", after_line: int = 0) -> Iterator[Row]:
        from botocore.exceptions import BotoCoreError, ClientError

        from producer.errors import StorageUnavailable

        number = after_line
        params: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self.prefix}
        if after:
            params["StartAfter"] = after
        while True:
            try:
                page = self.s3.list_objects_v2(**params)
            except (BotoCoreError, ClientError) as exc:
                raise StorageUnavailable(f"cannot list {self.source}: {exc}") from exc
            for item in page.get("Contents", []):
                key = item["Key"]
                if not key.lower().endswith(IMAGE_SUFFIXES):
                    continue
                number += 1
                yield Row(number, {"custom_id": key, "image_url": f"s3://{self.bucket}/{key}"}, text=key, position=key)
            if not page.get("IsTruncated"):
                return
            params.pop("StartAfter", None)
            params["ContinuationToken"] = page["NextContinuationToken"]

