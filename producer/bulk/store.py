"""A bulk run's lasting objects in S3, under ``{prefix}bulk/{bulk_id}/``::

    status.json          the run's status, kept current while it runs and final once it ends
    invalid.jsonl        one line per invalid manifest line: {"line", "reason", "custom_id", "text"}
    log/0000000001.jsonl the completion log, sealed segment by segment (one JSON object per job)

botocore errors become :class:`producer.errors.StorageUnavailable` here, where they enter.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from producer import keys
from producer.bulk.status import BulkStatus
from producer.errors import StorageUnavailable

_MISSING = {"NoSuchKey", "404", "NotFound"}


class BulkStore:
    """Reads and writes one run's objects; ``requests`` counts the S3 calls made (the benchmarks read it)."""

    def __init__(self, s3_client: Any, *, bucket: str, prefix: str, bulk_id: str) -> None:
        self.s3 = s3_client
        self.bucket = bucket
        self.prefix = prefix
        self.bulk_id = bulk_id
        self.requests = 0

    def put_status(self, status: BulkStatus) -> None:
        self._put(keys.bulk_status_object(self.prefix, self.bulk_id), status.model_dump_json(indent=2).encode(), "application/json")

    def get_status(self) -> BulkStatus | None:
        body = self._get(keys.bulk_status_object(self.prefix, self.bulk_id))
        return None if body is None else BulkStatus.model_validate_json(body)

    def put_invalid(self, lines: list[bytes]) -> None:
        body = b"".join(line + b"\n" for line in lines)
        self._put(keys.bulk_invalid_object(self.prefix, self.bulk_id), body, "application/x-ndjson")

    def put_segment(self, seq: int, body: bytes) -> None:
        # Sealed segments never change, so a second write of one (by a writer that claimed it as
        # stale while the first was slow) writes the same bytes.
        self._put(keys.bulk_segment_object(self.prefix, self.bulk_id, seq), body, "application/x-ndjson")

    def get_segment(self, seq: int) -> bytes | None:
        return self._get(keys.bulk_segment_object(self.prefix, self.bulk_id, seq))

    def segment_numbers(self) -> Iterator[int]:
        """The numbers of the segments in S3, in order (one LIST request per 1,000)."""
        folder = keys.bulk_segments_prefix(self.prefix, self.bulk_id)
        token: str | None = None
        while True:
            params: dict[str, Any] = {"Bucket": self.bucket, "Prefix": folder}
            if token:
                params["ContinuationToken"] = token
            page = self._call("list_objects_v2", **params)
            for item in page.get("Contents", []):
                name = item["Key"][len(folder) :].removesuffix(".jsonl")
                if name.isdigit():
                    yield int(name)
            if not page.get("IsTruncated"):
                return
            token = page.get("NextContinuationToken")

    def _put(self, key: str, body: bytes, content_type: str) -> None:
        self._call("put_object", Bucket=self.bucket, Key=key, Body=body, ContentType=content_type)

    def _get(self, key: str) -> bytes | None:
        try:
            return bytes(self._call("get_object", Bucket=self.bucket, Key=key)["Body"].read())
        except _Missing:
            return None

    def _call(self, operation: str, **params: Any) -> Any:
        self.requests += 1
        try:
            return getattr(self.s3, operation)(**params)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in _MISSING:
                raise _Missing() from exc
            raise StorageUnavailable(f"S3 {operation} for bulk run {self.bulk_id} failed: {code}") from exc
        except BotoCoreError as exc:
            raise StorageUnavailable(f"S3 {operation} for bulk run {self.bulk_id} failed: {type(exc).__name__}") from exc


class _Missing(Exception):
    pass
