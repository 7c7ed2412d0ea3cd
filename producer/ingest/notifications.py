"""S3 event notifications (MinIO's webhook target and AWS S3's event message) into jobs.

Both send ``{"Records": [...]}`` with ``eventName``, ``s3.bucket.name`` and ``s3.object``
(``key`` URL-encoded with ``+`` for spaces, ``eTag``, ``versionId``); MinIO names its events
``s3:ObjectCreated:Put``, AWS ``ObjectCreated:Put``. Only created objects make jobs: delete
events and objects no rule matches are acknowledged and ignored.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus

from producer.errors import InvalidJob
from producer.ingest.rules import IngestRule

MAX_RECORDS = 1000


@dataclass(frozen=True)
class CreatedObject:
    """One new object a notification announced."""

    bucket: str
    key: str
    version: str  # versionId, else eTag, else sequencer: what tells two writes of one key apart

    @property
    def image_url(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


@dataclass(frozen=True)
class IngestRequest:
    """One job to submit for a notification: the request mapping ``VQAClient.build_request`` takes, and its lane."""

    request: dict[str, Any]
    priority: str


def created_objects(payload: object) -> tuple[list[CreatedObject], int]:
    """The objects created per the notification, and how many records were ignored (deletes and others).

    Raises InvalidJob for a body that is no S3 notification. An AWS ``s3:TestEvent`` (no
    ``Records``) is a notification with no objects.
    """
    if not isinstance(payload, Mapping):
        raise InvalidJob("an S3 notification is a JSON object with Records")
    if "Records" not in payload:
        if payload.get("Event") == "s3:TestEvent":
            return [], 0
        raise InvalidJob("an S3 notification is a JSON object with Records")
    records = payload["Records"]
    if not isinstance(records, list):
        raise InvalidJob("Records must be a list")
    if len(records) > MAX_RECORDS:
        raise InvalidJob(f"at most {MAX_RECORDS} Records per notification")
    objects: list[CreatedObject] = []
    ignored = 0
    for number, record in enumerate(records, start=1):
        found = _created(record, number)
        if found is None:
            ignored += 1
        else:
            objects.append(found)
    return objects, ignored


def _created(record: object, number: int) -> CreatedObject | None:
    if not isinstance(record, Mapping):
        raise InvalidJob(f"Records[{number}]: not an object")
    name = record.get("eventName")
    if not isinstance(name, str):
        raise InvalidJob(f"Records[{number}]: eventName missing")
    if not name.removeprefix("s3:").startswith("ObjectCreated:"):
        return None  # ObjectRemoved, replication, lifecycle...: nothing to answer
    s3 = record.get("s3")
    bucket = s3.get("bucket") if isinstance(s3, Mapping) else None
    obj = s3.get("object") if isinstance(s3, Mapping) else None
    bucket_name = bucket.get("name") if isinstance(bucket, Mapping) else None
    raw_key = obj.get("key") if isinstance(obj, Mapping) else None
    if not isinstance(bucket_name, str) or not bucket_name or not isinstance(raw_key, str) or not raw_key:
        raise InvalidJob(f"Records[{number}]: s3.bucket.name and s3.object.key are required")
    assert isinstance(obj, Mapping)
    version = next((str(obj[field]) for field in ("versionId", "eTag", "sequencer") if obj.get(field)), "")
    return CreatedObject(bucket=bucket_name, key=unquote_plus(raw_key), version=version)


def requests_for(objects: list[CreatedObject], rules: list[IngestRule]) -> tuple[list[IngestRequest], int]:
    """One job request per (object, matching rule, question), and how many objects matched no rule."""
    requests: list[IngestRequest] = []
    unmatched = 0
    for obj in objects:
        matching = [rule for rule in rules if rule.matches(obj.bucket, obj.key)]
        if not matching:
            unmatched += 1
        for rule in matching:
            requests.extend(IngestRequest(request=_request(obj, rule, question), priority=rule.priority) for question in rule.questions)
    return requests, unmatched


def _request(obj: CreatedObject, rule: IngestRule, question: str) -> dict[str, Any]:
    generation = rule.generation.model_dump() if rule.generation is not None else {}
    asked = {**generation, "max_new_tokens": rule.max_new_tokens}
    request: dict[str, Any] = {"image_url": obj.image_url, "question": question, "idempotency_key": object_key(obj, question, asked)}
    if generation:
        request["generation"] = generation
    if rule.max_new_tokens is not None:
        request["max_new_tokens"] = rule.max_new_tokens
    if rule.webhook_url is not None:
        request["webhook_url"] = rule.webhook_url
    if rule.expires_in is not None:
        request["expires_in"] = rule.expires_in
    return request


def object_key(obj: CreatedObject, question: str, generation: Mapping[str, Any]) -> str:
    """The idempotency key of one question about one version of an object: a replayed notification makes the same job.

    Hashed: an S3 key alone may be 1,024 bytes, more than an idempotency key may be.
    """
    content = json.dumps([obj.bucket, obj.key, obj.version, question.strip(), dict(generation)], sort_keys=True, separators=(",", ":"))
    return "s3-object:" + hashlib.sha256(content.encode()).hexdigest()
