"""VQA_IMAGE_GRID: a smaller anyres grid gives fewer image tokens, on the real tiny checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image
from pydantic import ValidationError

from producer.image_grid import GridLimit, limit_pinpoints, parse_grid
from producer.schema import GenerationSettings
from producer.settings import Settings
from worker.model import VQAModel

# A wide, a tall and a large square image: with the full grid each gets a multi-tile grid.
SIZES = [(300, 120), (64, 256), (500, 500)]
SHORT = GenerationSettings(max_new_tokens=4, min_new_tokens=2)


def _tokens_per_image(model_dir: Path, image_grid: str) -> list[int]:
    model = VQAModel.load(Settings(model=str(model_dir), quantization="none", device="cpu", image_grid=image_grid))
    assert model.processor.image_processor.image_grid_pinpoints == model.model.config.image_grid_pinpoints
    images = [Image.new("RGB", size, color=(i * 60, 90, 200)) for i, size in enumerate(SIZES)]
    answers = model.generate_batch([model.prepare(image, "What is it?") for image in images], SHORT)
    assert all(answer.generated_tokens >= 2 for answer in answers)
    return [answer.image_tokens for answer in answers]


def test_smaller_grids_give_fewer_image_tokens(tiny_model_dir: Path) -> None:
    full = _tokens_per_image(tiny_model_dir, "full")
    tall = _tokens_per_image(tiny_model_dir, "2x1")
    single = _tokens_per_image(tiny_model_dir, "1x1")
    for f, t, s in zip(full, tall, single, strict=True):
        assert s < f and s <= t <= f
    # The square image gets the 2x2 grid at full detail; a 2x1 limit takes that away.
    assert tall[2] < full[2]


def test_parse_and_limit() -> None:
    assert parse_grid("full") is None
    assert parse_grid(" 2X1 ") == GridLimit(rows=2, cols=1)
    points = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]
    assert limit_pinpoints(points, 32, GridLimit(2, 1)) == [[64, 32]]
    assert limit_pinpoints(points, 32, GridLimit(3, 3)) == points
    assert limit_pinpoints(points, 32, GridLimit(1, 1)) == [[32, 32]]
    assert limit_pinpoints(points, 32, None) == points


@pytest.mark.parametrize("value", ["", "2", "0x1", "2x", "2*1", "big"])
def test_invalid_grid_is_a_clear_settings_error(value: str) -> None:
    with pytest.raises(ValidationError, match="image grid must be 'full' or RxC"):
        Settings(image_grid=value)


def test_grid_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VQA_IMAGE_GRID", "1X1")
    assert Settings().image_grid == "1x1"
