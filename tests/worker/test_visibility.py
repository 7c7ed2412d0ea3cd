"""The visibility timeout rule: long enough for the prefetch buffer, the batch and the retries."""

from __future__ import annotations

import pytest

from producer.settings import Settings
from worker import visibility


def test_budget_adds_batch_delay_buffered_batches_and_retries() -> None:
    settings = Settings(max_batch_delay_ms=500, max_attempts=3, fetch_timeout_s=10)
    budget = visibility.hold_budget_s(settings, batch_s=20)
    # 0.5 delay + 3 batches x 20 s + 3 fetches x 10 s + backoffs (1 + 2) + 2 store allowance
    assert budget == pytest.approx(0.5 + 60 + 30 + 3 + 2)


def test_default_settings_pass_for_minute_long_batches() -> None:
    assert visibility.check(Settings(), batch_s=60) is None


def test_a_short_timeout_is_reported_with_the_numbers() -> None:
    warning = visibility.check(Settings(visibility_timeout=30), batch_s=20)
    assert warning is not None and "VQA_VISIBILITY_TIMEOUT=30" in warning and "run twice" in warning
