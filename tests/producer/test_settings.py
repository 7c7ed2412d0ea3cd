from __future__ import annotations

import pytest
from pydantic import ValidationError

from producer.settings import DEFAULT_MODEL, Settings


def test_defaults_are_the_documented_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(__import__("os").environ):
        if name.startswith("VQA_"):
            monkeypatch.delenv(name)
    settings = Settings()
    assert settings.model == DEFAULT_MODEL
    assert settings.quantization == "nf4"
    assert settings.device == "auto"
    assert settings.attn_implementation == "sdpa"
    assert settings.s3_endpoint_url is None
    assert settings.allowed_hosts == []


def test_environment_prefix_and_comma_separated_hosts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VQA_BROKER_URL", "redis://broker:6380/2")
    monkeypatch.setenv("VQA_MAX_BATCH_SIZE", "16")
    monkeypatch.setenv("VQA_MAX_BATCH_DELAY_MS", "25")
    monkeypatch.setenv("VQA_ALLOWED_HOSTS", "minio:9000, 10.0.0.0/8 ,images.internal")
    monkeypatch.setenv("VQA_DEVICE", "cuda:1")
    settings = Settings()
    assert settings.broker_url == "redis://broker:6380/2"
    assert settings.max_batch_size == 16
    assert settings.max_batch_delay_ms == 25
    assert settings.allowed_hosts == ["minio:9000", "10.0.0.0/8", "images.internal"]
    assert settings.device == "cuda:1"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("VQA_QUANTIZATION", "fp4"),
        ("VQA_DEVICE", "gpu"),
        ("VQA_MAX_BATCH_SIZE", "0"),
        ("VQA_ALLOWED_HOSTS", "10.0.0.0/33"),
        ("VQA_VISIBILITY_TIMEOUT", "1"),
    ],
)
def test_bad_values_are_refused(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError):
        Settings()
