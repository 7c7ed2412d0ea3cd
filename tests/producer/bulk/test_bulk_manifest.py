"""Manifest readers: JSON Lines, CSV, Parquet and an S3 prefix, row by row with the line numbers an editor shows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from producer.bulk.manifest import CsvManifest, JsonLinesManifest, ParquetManifest, S3PrefixManifest, open_manifest
from producer.errors import InvalidJob


def test_json_lines_rows_keep_editor_line_numbers_and_say_what_is_wrong(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"custom_id": "a", "image_url": "https://x/a.jpg"}\n\n{not json\n[1, 2]\n\xff\xfe\n{"custom_id": "b"}')
    rows = list(JsonLinesManifest(path).rows())
    assert [row.line for row in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[0].fields == {"custom_id": "a", "image_url": "https://x/a.jpg"} and rows[0].error is None
    assert rows[1].fields == {} and rows[1].error is None  # blank: skipped, but counted
    assert rows[2].error is not None and rows[2].error.startswith("not JSON") and rows[2].text == "{not json"
    assert rows[3].error == "not a JSON object"
    assert rows[4].error == "not UTF-8"
    assert rows[5].fields == {"custom_id": "b"}  # the last line needs no newline
    digest, lines = JsonLinesManifest(path).scan()
    assert len(digest) == 64 and lines == 6


def test_an_overlong_line_is_one_invalid_row_and_reading_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from producer.bulk import manifest

    monkeypatch.setattr(manifest, "MAX_LINE_BYTES", 64)
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"custom_id": "x" * 200}) + "\n" + json.dumps({"custom_id": "ok"}) + "\n")
    rows = list(JsonLinesManifest(path).rows())
    assert [row.line for row in rows] == [1, 2]
    assert rows[0].error is not None and "longer than 64 bytes" in rows[0].error
    assert rows[1].fields == {"custom_id": "ok"}


def test_csv_rows_have_typed_cells_and_start_lines(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_text(
        "custom_id,image_url,question,questions,max_new_tokens\n"
        'a,https://x/a.jpg,"What is\nshown?",,\n'
        'b,https://x/b.jpg,,"[""One?"", ""Two?""]",12\n'
        ",,,,\n"
        "c,https://x/c.jpg,,not-a-list,\n"
        "d,https://x/d.jpg\n"
    )
    rows = list(CsvManifest(path).rows())
    assert [row.line for row in rows] == [2, 4, 5, 6, 7]
    assert rows[0].fields == {"custom_id": "a", "image_url": "https://x/a.jpg", "question": "What is\nshown?"}
    assert rows[1].fields == {"custom_id": "b", "image_url": "https://x/b.jpg", "questions": ["One?", "Two?"], "max_new_tokens": 12}
    assert rows[2].fields == {}
    assert rows[3].error is not None and rows[3].error.startswith("questions: not a JSON list")
    assert rows[4].error == "2 cells for 5 columns"


def test_parquet_rows_drop_nulls(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "m.parquet"
    table = pa.table(
        {
            "custom_id": ["a", "b"],
            "image_url": ["https://x/a.jpg", "https://x/b.jpg"],
            "questions": [["One?", "Two?"], None],
        }
    )
    pq.write_table(table, path)
    manifest = open_manifest(str(path))
    assert isinstance(manifest, ParquetManifest)
    rows = list(manifest.rows())
    assert [row.line for row in rows] == [1, 2]
    assert rows[0].fields == {"custom_id": "a", "image_url": "https://x/a.jpg", "questions": ["One?", "Two?"]}
    assert rows[1].fields == {"custom_id": "b", "image_url": "https://x/b.jpg"}
    assert manifest.scan()[1] == 2


def test_an_s3_prefix_lists_its_images_and_resumes_after_a_key(s3_server: Any, bucket: str) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server.url)
    for key in ["incoming/a.jpg", "incoming/b.PNG", "incoming/notes.txt", "incoming/sub/c.webp", "other/d.jpg"]:
        s3.put_object(Bucket=bucket, Key=key, Body=b"x")
    manifest = open_manifest(f"s3://{bucket}/incoming/", s3_client=s3)
    assert isinstance(manifest, S3PrefixManifest) and not manifest.replays
    rows = list(manifest.rows())
    assert [(row.line, row.fields) for row in rows] == [
        (1, {"custom_id": "incoming/a.jpg", "image_url": f"s3://{bucket}/incoming/a.jpg"}),
        (2, {"custom_id": "incoming/b.PNG", "image_url": f"s3://{bucket}/incoming/b.PNG"}),
        (3, {"custom_id": "incoming/sub/c.webp", "image_url": f"s3://{bucket}/incoming/sub/c.webp"}),
    ]
    resumed = list(manifest.rows(after="incoming/b.PNG", after_line=2))
    assert [(row.line, row.position) for row in resumed] == [(3, "incoming/sub/c.webp")]


def test_sources_that_cannot_be_read_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidJob, match="not a readable file"):
        open_manifest(str(tmp_path / "missing.jsonl"))
    with pytest.raises(InvalidJob, match="prefix ending in '/'"):
        open_manifest("s3://bucket/one-object.jpg", s3_client=object())
