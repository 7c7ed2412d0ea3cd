"""bench/scale.py's stand-ins: an Engine by the protocol, and an S3 client the worker's storage and fetch code accept."""

from __future__ import annotations

import pytest
from botocore.exceptions import ClientError

from bench.scale import IMAGE_URL, MemoryS3, QueueOnlyEngine
from producer.schema import GenerationSettings
from worker.engine import Engine
from worker.fetch.download import fetch_s3
from worker.fetch.images import FetchPolicy
from producer.settings import Settings


def test_the_stand_in_engine_is_an_engine_and_answers_every_input() -> None:
    engine = QueueOnlyEngine(batch_s=0.0)
    assert isinstance(engine, Engine)
    answers = engine.generate_batch([engine.prepare(None, "q?")] * 3, GenerationSettings(max_new_tokens=1))
    assert len(answers) == 3 and answers[0].text == "stand-in"


def test_the_memory_s3_serves_the_image_and_keeps_the_first_record() -> None:
    s3 = MemoryS3()
    policy = FetchPolicy.from_settings(Settings(image_s3_buckets=["images"]))
    assert fetch_s3(IMAGE_URL, policy, s3_client=s3, deadline=float("inf")).startswith(b"\x89PNG")
    s3.put_object(Bucket="records", Key="k", Body=b"1", IfNoneMatch="*")
    with pytest.raises(ClientError):
        s3.put_object(Bucket="records", Key="k", Body=b"2", IfNoneMatch="*")
    assert s3.get_object(Bucket="records", Key="k")["Body"].read() == b"1"
    s3.delete_object(Bucket="records", Key="k")
    with pytest.raises(ClientError):
        s3.get_object(Bucket="records", Key="k")
