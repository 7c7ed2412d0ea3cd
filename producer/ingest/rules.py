"""Ingest rules (``VQA_INGEST_RULES``): which new objects become which jobs.

The file is a JSON (or YAML) list of rules::

    [{"bucket": "photos", "prefix": "incoming/", "suffix": ".jpg",
      "questions": ["What is shown?", "Is there a person?"],
      "max_new_tokens": 64, "webhook_url": "https://hooks.example.com/vqa", "priority": "low"}]

Every rule that matches an object adds its questions; one job per question.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from producer.errors import InvalidJob
from producer.keys import PRIORITIES
from producer.schema import MAX_NEW_TOKENS_LIMIT, MAX_QUESTION_LENGTH, GenerationSettings
from producer.settings import Settings


class IngestRule(BaseModel):
    """One rule: objects of ``bucket`` whose key starts with ``prefix`` and ends with ``suffix``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    bucket: str = Field(min_length=3, max_length=63)
    prefix: str = ""
    suffix: str = ""
    questions: list[str] = Field(min_length=1, max_length=32)
    max_new_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS_LIMIT)
    generation: GenerationSettings | None = None
    webhook_url: str | None = None
    priority: str = "default"
    expires_in: str | None = None

    @field_validator("questions")
    @classmethod
    def _questions(cls, value: list[str]) -> list[str]:
        for question in value:
            if not question.strip() or len(question) > MAX_QUESTION_LENGTH:
                raise ValueError(f"each question is 1-{MAX_QUESTION_LENGTH} characters, not blank")
        return value

    @field_validator("priority")
    @classmethod
    def _priority(cls, value: str) -> str:
        if value not in PRIORITIES:
            raise ValueError(f"priority must be one of {', '.join(PRIORITIES)}")
        return value

    def matches(self, bucket: str, key: str) -> bool:
        return bucket == self.bucket and key.startswith(self.prefix) and key.endswith(self.suffix)


def load_rules(settings: Settings) -> list[IngestRule]:
    """The rules of ``VQA_INGEST_RULES`` (none when unset); InvalidJob names what is wrong.

    A rule's bucket must be one the workers may read (``VQA_IMAGE_S3_BUCKETS``): otherwise every
    job it made would fail at fetch time, so the API refuses to start instead.
    """
    if settings.ingest_rules is None:
        return []
    path = Path(settings.ingest_rules)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidJob(f"VQA_INGEST_RULES: cannot read {path}: {exc}") from exc
    raw = _parse(text, yaml_file=path.suffix.lower() in (".yaml", ".yml"))
    if not isinstance(raw, list):
        raise InvalidJob("VQA_INGEST_RULES: the file must hold a list of rules")
    rules: list[IngestRule] = []
    for number, item in enumerate(raw, start=1):
        try:
            rule = IngestRule.model_validate(item)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'rule'}: {e['msg']}" for e in exc.errors(include_url=False, include_input=False))
            raise InvalidJob(f"VQA_INGEST_RULES: rule {number}: {problems}") from exc
        if rule.bucket not in settings.image_s3_buckets:
            raise InvalidJob(f"VQA_INGEST_RULES: rule {number}: bucket {rule.bucket!r} is not in VQA_IMAGE_S3_BUCKETS, so workers could not read its images")
        rules.append(rule)
    return rules


def _parse(text: str, *, yaml_file: bool) -> Any:
    if yaml_file:
        try:
            import yaml
        except ImportError as exc:
            raise InvalidJob("VQA_INGEST_RULES: a YAML rules file needs PyYAML (pip install pyyaml), or write it as JSON") from exc
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise InvalidJob(f"VQA_INGEST_RULES: not YAML: {exc}") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidJob(f"VQA_INGEST_RULES: not JSON ({exc.msg}, line {exc.lineno})") from exc
