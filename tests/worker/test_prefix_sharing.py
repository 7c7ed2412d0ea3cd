"""Shared image prefixes (worker/prefix.py) on the real tiny LLaVA-NeXT, fp32 and nf4: greedy answers equal the solo ones."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from PIL import Image

from producer.schema import GenerationSettings
from producer.settings import Settings
from worker.model import VQAModel
from worker.prefix import group_by_prefix, image_key, prefix_batch, prefix_length, suffix_rows

# Different sizes and aspect ratios: different tile grids, so different prefix lengths.
IMAGE_SIZES = [(40, 30), (300, 120), (64, 256), (500, 500), (33, 77)]
QUESTIONS = [
    "What is shown in this image?",
    "How many people are in the picture?",
    "What color is the cat?",
    "Describe the scene in detail, please.",
    "Is it raining?",
]
GREEDY = GenerationSettings(max_new_tokens=12, min_new_tokens=4)


def _image(width: int, height: int, seed: int) -> Image.Image:
    noise = torch.rand(height, width, 3, generator=torch.Generator().manual_seed(seed))
    return Image.fromarray((noise * 255).to(torch.uint8).numpy())


@pytest.fixture(scope="module", params=["none", "nf4"])
def vqa(request: pytest.FixtureRequest, tiny_model_dir: Path) -> VQAModel:
    return VQAModel.load(Settings(model=str(tiny_model_dir), quantization=request.param, device="cpu", share_image_prefix=True))


def _solo(vqa: VQAModel, items: list) -> list[str]:
    vqa.share_image_prefix = False
    try:
        return [vqa.generate_batch([item], GREEDY)[0].text for item in items]
    finally:
        vqa.share_image_prefix = True


@pytest.mark.parametrize("size", IMAGE_SIZES, ids=[f"{w}x{h}" for w, h in IMAGE_SIZES])
def test_shared_prefix_answers_equal_solo_answers(vqa: VQAModel, size: tuple[int, int]) -> None:
    image = _image(*size, seed=size[0])
    items = [vqa.prepare(image, question) for question in QUESTIONS]
    solo = _solo(vqa, items)
    before = vqa.computed_prompt_tokens
    shared = vqa.generate_batch(items, GREEDY)
    assert [answer.text for answer in shared] == solo
    # The prefix ran once: far fewer prompt tokens than five full prompts.
    computed = vqa.computed_prompt_tokens - before
    prefix = prefix_length(items[0].input_ids, vqa.model.config.image_token_id)
    assert prefix > 0
    assert computed < sum(item.num_tokens for item in items) - 3 * prefix
    # Usage still reports each job's own prompt.
    assert [answer.prompt_tokens for answer in shared] == [item.num_tokens for item in items]


def test_mixed_batch_keeps_order_and_answers(vqa: VQAModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two images with two questions each, one image alone, interleaved: every answer in its place, equal to solo.

    The three prefixes have different lengths (different tile grids), so the one prefill pads
    them; the whole batch still runs as one ``generate``.
    """
    first, second, third = _image(300, 120, 1), _image(64, 256, 2), _image(33, 77, 3)
    items = [
        vqa.prepare(first, QUESTIONS[0]),
        vqa.prepare(second, QUESTIONS[1]),
        vqa.prepare(third, QUESTIONS[2]),
        vqa.prepare(first, QUESTIONS[3]),
        vqa.prepare(second, QUESTIONS[4]),
    ]
    lengths = {prefix_length(item.input_ids, vqa.model.config.image_token_id) for item in items}
    assert len(lengths) == 3
    solo = _solo(vqa, items)
    calls = []
    generate = vqa._generate
    monkeypatch.setattr(vqa, "_generate", lambda inputs, kwargs: calls.append(inputs["input_ids"].shape[0]) or generate(inputs, kwargs))
    assert [answer.text for answer in vqa.generate_batch(items, GREEDY)] == solo
    assert calls == [5]


def test_every_size_twice_in_one_batch_equals_solo(vqa: VQAModel) -> None:
    """Five images of different sizes, two questions each, interleaved in one batch: ten answers equal to solo."""
    images = [_image(*size, seed=size[1]) for size in IMAGE_SIZES]
    items = [vqa.prepare(image, QUESTIONS[(i + q) % len(QUESTIONS)]) for q in range(2) for i, image in enumerate(images)]
    assert [answer.text for answer in vqa.generate_batch(items, GREEDY)] == _solo(vqa, items)


def _prefix(vqa: VQAModel, item: object) -> int:
    return prefix_length(item.input_ids, vqa.model.config.image_token_id)  # type: ignore[attr-defined]


@pytest.mark.parametrize("split_size", [(300, 120), (33, 77)], ids=["split-longer", "split-shorter"])
def test_an_image_split_across_two_batches_is_prefilled_once(vqa: VQAModel, split_size: tuple[int, int]) -> None:
    """A batch boundary splits image B's questions: the second batch continues from the first batch's prefill of B.

    B's prefix is longer than C's in one case and shorter in the other, so the carried rows are
    re-aligned to the second batch's padding both ways; every answer still equals the solo one.
    """
    a, b, c = _image(64, 256, 1), _image(*split_size, 2), _image(500, 500, 3)
    first = [vqa.prepare(a, QUESTIONS[0]), vqa.prepare(a, QUESTIONS[1]), vqa.prepare(b, QUESTIONS[2])]
    second = [vqa.prepare(b, QUESTIONS[3]), vqa.prepare(b, QUESTIONS[4]), vqa.prepare(c, QUESTIONS[0])]
    assert _prefix(vqa, first[2]) != _prefix(vqa, second[2])
    solo = _solo(vqa, first + second)
    got = [answer.text for answer in vqa.generate_batch(first, GREEDY)]
    before = vqa.computed_prompt_tokens
    got += [answer.text for answer in vqa.generate_batch(second, GREEDY)]
    assert got == solo
    # The second batch's prefill ran over C's prefix alone; each question then adds the suffix columns.
    suffix_columns = max(item.num_tokens - _prefix(vqa, item) for item in second)
    assert vqa.computed_prompt_tokens - before == _prefix(vqa, second[2]) + 3 * suffix_columns


def test_a_carried_prefix_lasts_one_batch_and_a_failed_batch_drops_it(vqa: VQAModel, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = _image(64, 256, 4), _image(300, 120, 5)
    vqa.generate_batch([vqa.prepare(a, QUESTIONS[0]), vqa.prepare(a, QUESTIONS[1])], GREEDY)
    assert len(vqa._carried) == 1
    vqa.generate_batch([vqa.prepare(b, QUESTIONS[0])], GREEDY)  # nothing to share: a plain batch, nothing carried on
    assert vqa._carried == {}
    vqa.generate_batch([vqa.prepare(b, QUESTIONS[0]), vqa.prepare(b, QUESTIONS[1])], GREEDY)
    assert len(vqa._carried) == 1
    monkeypatch.setattr(vqa, "_generate", lambda inputs, kwargs: (_ for _ in ()).throw(RuntimeError("kernel fault")))
    with pytest.raises(RuntimeError, match="kernel fault"):
        vqa.generate_batch([vqa.prepare(b, QUESTIONS[2]), vqa.prepare(b, QUESTIONS[3])], GREEDY)
    assert vqa._carried == {}


def test_same_bytes_share_a_key_different_bytes_do_not(vqa: VQAModel) -> None:
    a = vqa.prepare(_image(64, 64, 5), "What is it?")
    b = vqa.prepare(_image(64, 64, 5), "Where is it?")  # another decode of the same pixels
    c = vqa.prepare(_image(64, 64, 6), "What is it?")
    assert a.image_key == b.image_key != c.image_key
    groups, unkeyed = group_by_prefix([vqa._prefix_key(item) for item in (a, b, c)])
    assert [group.indices for group in groups] == [(0, 1), (2,)]
    assert unkeyed == []


def _png(image: Image.Image, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", **options)
    return buffer.getvalue()


def test_with_its_source_bytes_an_image_is_keyed_by_them_and_its_grid(vqa: VQAModel) -> None:
    """The worker passes the fetched bytes: two decodes of them share a key, other bytes or another grid do not."""
    original = Image.linear_gradient("L").convert("RGB").resize((300, 120))  # smooth: its PNG is smaller than its tiles
    data = _png(original)
    first, second = (vqa.prepare_image(Image.open(io.BytesIO(data)).convert("RGB"), source=data) for _ in range(2))
    assert len(data) < first.pixel_values.nelement() * first.pixel_values.element_size()
    assert first.image_key is not None and first.image_key == second.image_key
    assert first.image_key != vqa.prepare_image(original).image_key  # keyed by the bytes, not the pixels
    other_bytes = _png(original, compress_level=1)  # the same pixels, encoded otherwise
    assert other_bytes != data and vqa.prepare_image(original, source=other_bytes).image_key != first.image_key
    assert vqa.prepare_image(original, source=data, image_grid="1x1").image_key != first.image_key
    # Sharing from such keys still answers as each job alone.
    items = [vqa.prepare_question(part, question) for part, question in zip((first, second), QUESTIONS[:2], strict=True)]
    before = vqa.computed_prompt_tokens
    shared = [answer.text for answer in vqa.generate_batch(items, GREEDY)]
    assert vqa.computed_prompt_tokens - before < sum(item.num_tokens for item in items)  # one prefill for both
    assert shared == _solo(vqa, items)


def test_the_key_hashes_whichever_is_smaller_the_bytes_or_the_tiles() -> None:
    size, tiles = torch.tensor([20, 10]), torch.rand(2, 3, 8, 8)  # 1,536 bytes of tiles
    other_tiles = torch.rand(2, 3, 8, 8)
    small, large = b"x" * 100, b"y" * 5000
    # Small bytes: the key follows them (the tiles are not read), and the grid.
    assert image_key(tiles, size, source=small) == image_key(other_tiles, size, source=small)
    assert image_key(tiles, size, source=small) != image_key(tiles, size, source=small, pinpoints=[[16, 8]])
    assert image_key(tiles, size, source=small) != image_key(tiles, size, source=b"z" * 100)
    # Large bytes: the tiles are hashed, as without bytes.
    assert image_key(tiles, size, source=large) == image_key(tiles, size) != image_key(other_tiles, size, source=large)


def test_sharing_off_computes_no_key(tiny_model_dir: Path) -> None:
    vqa = VQAModel.load(Settings(model=str(tiny_model_dir), quantization="none", device="cpu", share_image_prefix=False))
    assert vqa.prepare(_image(40, 30, 0), "What?").image_key is None


def test_prefix_batch_left_pads_and_counts_positions_from_each_prefix() -> None:
    ids, mask, positions = prefix_batch([torch.tensor([7, 8, 9]), torch.tensor([5])], pad_token_id=0)
    assert ids.tolist() == [[7, 8, 9], [0, 0, 5]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert positions.tolist() == [[0, 1, 2], [0, 0, 0]]


def test_suffix_rows_pad_between_prefix_and_suffix() -> None:
    prefix_ids, prefix_mask, _ = prefix_batch([torch.tensor([7, 8, 9]), torch.tensor([5])], pad_token_id=0)
    ids, mask = suffix_rows(prefix_ids, prefix_mask, [(0, torch.tensor([1])), (0, torch.tensor([2, 3, 4])), (1, torch.tensor([6, 6]))], pad_token_id=0)
    assert ids.tolist() == [[7, 8, 9, 0, 0, 1], [7, 8, 9, 2, 3, 4], [0, 0, 5, 0, 6, 6]]
    assert mask.tolist() == [[1, 1, 1, 0, 0, 1], [1, 1, 1, 1, 1, 1], [0, 0, 1, 0, 1, 1]]


def test_group_by_prefix_in_first_seen_order() -> None:
    key = ("img", (1, 2))
    groups, unkeyed = group_by_prefix([key, None, ("other", (1, 2, 3)), key])
    assert [(group.indices, group.prefix_len) for group in groups] == [((0, 3), 2), ((2,), 3)]
    assert unkeyed == [1]


def test_no_image_with_two_questions_runs_the_plain_padded_batch(vqa: VQAModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sharing on, but every image asked once: one padded generate with the images' pixels, no separate prefill."""
    items = [vqa.prepare(_image(40, 30, seed), QUESTIONS[seed]) for seed in range(3)]
    solo = _solo(vqa, items)
    calls = []
    generate = vqa._generate
    monkeypatch.setattr(vqa, "_generate", lambda inputs, kwargs: calls.append(sorted(inputs)) or generate(inputs, kwargs))
    assert [answer.text for answer in vqa.generate_batch(items, GREEDY)] == solo
    assert calls == [["attention_mask", "cache", "image_sizes", "input_ids", "pixel_values"]]


@pytest.mark.parametrize("size", IMAGE_SIZES, ids=[f"{w}x{h}" for w, h in IMAGE_SIZES])
def test_image_part_then_question_equals_the_processors_own_inputs(vqa: VQAModel, size: tuple[int, int]) -> None:
    """prepare_image + prepare_question (one image part for many questions) give processor(images, text)'s tokens and tiles."""
    image = _image(*size, seed=7)
    part = vqa.prepare_image(image)
    for question in [*QUESTIONS, "A literal <image> in the text"]:
        full = vqa.processor(images=[image], text=[vqa.build_prompt(question)], return_tensors="pt")
        inputs = vqa.prepare_question(part, question)
        assert torch.equal(inputs.input_ids, full["input_ids"][0])
        assert torch.equal(inputs.pixel_values, full["pixel_values"][0])
        assert inputs.pixel_values is part.pixel_values  # shared, not copied per question
