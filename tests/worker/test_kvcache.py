"""worker/kvcache.py: the in-place cache holds what DynamicCache holds, and generate answers the same through it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import DynamicCache, LlavaNextForConditionalGeneration
from transformers.cache_utils import DynamicLayer

from producer.schema import GenerationSettings
from producer.settings import Settings
from worker.kvcache import ReservedCache, ReservedLayer
from worker.model import VQAModel

from tests.worker.test_prefix_sharing import IMAGE_SIZES, QUESTIONS, _image


def _states(tokens: int, seed: int, rows: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 2, tokens, 4, generator=generator), torch.randn(rows, 2, tokens, 4, generator=generator)


@pytest.mark.parametrize("reserve", [0, 2, 64], ids=["no-room", "short-room", "room"])
def test_layer_holds_what_concatenation_holds(reserve: int) -> None:
    layer = ReservedLayer(reserve)
    written = [_states(tokens, seed) for seed, tokens in enumerate([5, 1, 3, 1, 1])]
    for keys, values in written:
        got_keys, got_values = layer.update(keys, values)
    assert torch.equal(got_keys, torch.cat([keys for keys, _ in written], dim=-2))
    assert torch.equal(got_values, torch.cat([values for _, values in written], dim=-2))
    assert layer.get_seq_length() == 11


def test_layer_selects_rows_and_crops_like_dynamic_layer() -> None:
    reserved, dynamic = ReservedLayer(8), DynamicLayer()
    for layer in (reserved, dynamic):
        layer.update(*_states(6, 0))
        layer.batch_select_indices(torch.tensor([2, 0, 0, 1]))
        layer.update(*_states(1, 1, rows=4))  # one decode step for the four rows
        layer.crop(-2)
    assert torch.equal(reserved.keys, dynamic.keys) and torch.equal(reserved.values, dynamic.values)
    assert reserved.get_seq_length() == dynamic.get_seq_length() == 5


def test_decode_steps_write_in_place() -> None:
    layer = ReservedLayer(reserve=4)
    layer.update(*_states(6, 0))
    buffer = layer.keys.untyped_storage().data_ptr()
    for step in range(4):
        layer.update(*_states(1, step + 1))
    assert layer.keys.untyped_storage().data_ptr() == buffer  # no copy of the prompt per step


@pytest.fixture(scope="module", params=["none", "nf4"])
def vqa(request: pytest.FixtureRequest, tiny_model_dir: Path) -> VQAModel:
    return VQAModel.load(Settings(model=str(tiny_model_dir), quantization=request.param, device="cpu", share_image_prefix=False))


def test_generate_answers_the_same_through_either_cache(vqa: VQAModel) -> None:
    items = [vqa.prepare(_image(*size, seed=i), QUESTIONS[i % len(QUESTIONS)]) for i, size in enumerate(IMAGE_SIZES)]
    inputs = vqa._collate(items)
    inputs["pixel_values"] = inputs["pixel_values"].to(vqa.dtype)
    model: LlavaNextForConditionalGeneration = vqa.model
    kwargs = {"max_new_tokens": 12, "min_new_tokens": 12, "do_sample": False, "pad_token_id": vqa.processor.tokenizer.pad_token_id}
    with torch.inference_mode():
        dynamic = model.generate(**inputs, cache=DynamicCache(config=model.config.get_text_config()), **kwargs)
        reserved = model.generate(**inputs, cache=ReservedCache(model.config.get_text_config(), reserve=12), **kwargs)
    assert torch.equal(dynamic, reserved)
    # And what the worker's engine answers is that same greedy output.
    answers = vqa.generate_batch(items, GenerationSettings(max_new_tokens=12, min_new_tokens=12))
    width = inputs["input_ids"].shape[1]
    assert [answer.text for answer in answers] == [text.strip() for text in vqa.processor.tokenizer.batch_decode(dynamic[:, width:], skip_special_tokens=True)]
