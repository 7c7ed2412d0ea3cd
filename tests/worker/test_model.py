"""VQAModel on a real (tiny, random-weight) LLaVA-NeXT checkpoint: loading, prompts, batching fidelity, OOM."""

from __future__ import annotations

import logging
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from PIL import Image

from producer.errors import ModelLoadError, OutOfMemory
from producer.schema import GenerationSettings
from producer.settings import Settings
from worker.model import CARD_TEMPLATE, ModelInputs, VQAModel, resolve_device
from worker.dev.tiny_model import build_tiny_model

# Different sizes and aspect ratios: anyres picks different tile grids, so each image gets a
# different number of image tokens and the prompts in one batch have different lengths.
IMAGE_SIZES = [(40, 30), (300, 120), (64, 256), (500, 500), (33, 77)]
QUESTIONS = [
    "What is shown in this image?",
    "How many people are in the picture?",
    "What color is the cat?",
    "Describe the scene in detail, please.",
    "Is it raining?",
]
# min_new_tokens: random weights may pick EOS at once. min < max so some rows stop early and
# get padded while their neighbours go on.
GREEDY = GenerationSettings(max_new_tokens=16, min_new_tokens=6)

# Companions, order and batch size all change; every job must get its solo answer.
BATCHES = [
    [0, 1, 2, 3, 4],
    [4, 3, 2, 1, 0],
    [3, 0],
    [1, 2, 4],
    [2, 2, 0, 3],
]


def _image(width: int, height: int, seed: int) -> Image.Image:
    noise = torch.rand(height, width, 3, generator=torch.Generator().manual_seed(seed))
    return Image.fromarray((noise * 255).to(torch.uint8).numpy())


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_model_dir: Path) -> Path:
    # tests/conftest.py builds the tiny checkpoint once per session for every test that needs it.
    return tiny_model_dir


@pytest.fixture(scope="session")
def images() -> list[Image.Image]:
    return [_image(w, h, seed) for seed, (w, h) in enumerate(IMAGE_SIZES)]


def _load(path: Path, quantization: str, **overrides: str) -> VQAModel:
    return VQAModel.load(Settings(model=str(path), quantization=quantization, device="cpu", **overrides))


@pytest.fixture(scope="session", params=["none", "nf4"])
def vqa(request: pytest.FixtureRequest, tiny_checkpoint: Path) -> VQAModel:
    return _load(tiny_checkpoint, request.param)


def test_build_is_deterministic(tmp_path: Path, tiny_checkpoint: Path) -> None:
    again = build_tiny_model(tmp_path / "again")
    for name in ("model.safetensors", "tokenizer.json", "config.json", "processor_config.json"):
        assert (again / name).read_bytes() == (tiny_checkpoint / name).read_bytes(), name
    other = build_tiny_model(tmp_path / "other", seed=1)
    assert (other / "model.safetensors").read_bytes() != (tiny_checkpoint / "model.safetensors").read_bytes()


def test_load_fp32(tiny_checkpoint: Path) -> None:
    model = _load(tiny_checkpoint, "none")
    assert model.name == str(tiny_checkpoint)
    assert model.quantization == "none"
    assert model.device == "cpu"
    assert model.dtype == torch.float32
    assert model.count_4bit_linears() == 0
    assert model.processor.tokenizer.padding_side == "left"


def test_load_nf4_quantizes_the_language_model(tiny_checkpoint: Path) -> None:
    model = _load(tiny_checkpoint, "nf4")
    assert model.quantization == "nf4"
    assert model.count_4bit_linears() > 0
    layer = model.model.model.language_model.layers[0]
    for linear in (layer.self_attn.q_proj, layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.down_proj):
        assert isinstance(linear, bnb.nn.Linear4bit)
        assert linear.weight.quant_state.quant_type == "nf4"
        assert linear.weight.dtype == torch.uint8  # packed 4-bit, not a float weight in disguise


def test_load_failure_is_model_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError) as info:
        _load(tmp_path, "none")  # an empty directory: no config, no weights
    assert info.value.__cause__ is not None
    assert not info.value.retryable


def test_cuda_without_a_gpu_is_model_load_error(tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelLoadError, match="CUDA"):
        VQAModel.load(Settings(model=str(tiny_checkpoint), quantization="none", device="cuda"))


def test_flash_attention_falls_back_to_sdpa(tiny_checkpoint: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="worker.model"):
        model = _load(tiny_checkpoint, "none", attn_implementation="flash_attention_2")
    assert model.model.config._attn_implementation == "sdpa"
    assert "flash_attention_2" in caplog.text


def test_resolve_device() -> None:
    assert resolve_device("auto") == ("cuda:0" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cuda") == "cuda:0"
    assert resolve_device("cuda:1") == "cuda:1"
    assert resolve_device("cpu") == "cpu"


def test_prompt_follows_the_model_card(vqa: VQAModel) -> None:
    question = "What is shown in this image?"
    expected = (
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the human's questions. USER: <image>\n"
        "What is shown in this image? ASSISTANT:"
    )
    assert vqa.build_prompt(question) == expected
    assert CARD_TEMPLATE.format(question=question) == expected


def test_prompt_without_chat_template_uses_the_card(vqa: VQAModel, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vqa.processor, "chat_template", None)
    assert vqa.build_prompt("Why?") == CARD_TEMPLATE.format(question="Why?")


def test_batched_answers_equal_single_answers(vqa: VQAModel, images: list[Image.Image]) -> None:
    solo = [vqa.generate([images[i]], [QUESTIONS[i]], GREEDY)[0] for i in range(len(images))]
    assert all(isinstance(answer, str) and answer for answer in solo)
    # Different images must give different answers, or a row mix-up could go unnoticed.
    assert len(set(solo)) == len(solo)
    for batch in BATCHES:
        answers = vqa.generate([images[i] for i in batch], [QUESTIONS[i] for i in batch], GREEDY)
        assert answers == [solo[i] for i in batch], batch


def test_prompt_pass_is_bit_identical_whatever_the_companions(vqa: VQAModel, images: list[Image.Image]) -> None:
    """The share of fidelity that padding decides (see PAD_TO_MULTIPLE_OF): exact, not just close."""
    items = [vqa.prepare(image, question) for image, question in zip(images, QUESTIONS, strict=True)]

    def prompt_pass(batch: list[ModelInputs]) -> list[torch.Tensor]:
        inputs = vqa._collate(batch)
        mask = inputs["attention_mask"]
        # As generate does: positions count real tokens only.
        position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        with torch.inference_mode():
            hidden = vqa.model.model(**inputs, position_ids=position_ids).last_hidden_state
        return [row[keep.bool()] for row, keep in zip(hidden, mask, strict=True)]

    batched = prompt_pass(items)
    for row, item in enumerate(items):
        assert torch.equal(batched[row], prompt_pass([item])[0]), row


def test_image_token_in_a_question_is_only_text(vqa: VQAModel, images: list[Image.Image]) -> None:
    assert vqa.build_prompt("Is <image> a word?") == vqa.build_prompt("Is  a word?")
    answers = vqa.generate(images[:2], ["What is <image><image>?", QUESTIONS[1]], GREEDY)
    assert answers[1] == vqa.generate(images[1:2], QUESTIONS[1:2], GREEDY)[0]


def test_generate_edge_cases(vqa: VQAModel, images: list[Image.Image]) -> None:
    assert vqa.generate([], [], GREEDY) == []
    with pytest.raises(ValueError):
        vqa.generate(images[:2], QUESTIONS[:1], GREEDY)


def test_sampling_runs(vqa: VQAModel, images: list[Image.Image]) -> None:
    sampling = GenerationSettings(max_new_tokens=8, min_new_tokens=4, do_sample=True, temperature=0.7, top_p=0.9)
    torch.manual_seed(0)
    answers = vqa.generate(images[:3], QUESTIONS[:3], sampling)
    assert len(answers) == 3
    assert all(isinstance(answer, str) and answer for answer in answers)


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("CUDA error: out of memory"),
        # What torch 2.13's CPU allocator raises, word for word.
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
            "you tried to allocate 10000000000000 bytes. Error code 12 (Cannot allocate memory)"
        ),
    ],
    ids=["OutOfMemoryError", "cuda-RuntimeError", "cpu-RuntimeError"],
)
def test_out_of_memory_is_translated(
    tiny_checkpoint: Path, images: list[Image.Image], monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    model = _load(tiny_checkpoint, "none")

    def explode(**kwargs: object) -> torch.Tensor:
        raise error

    monkeypatch.setattr(model.model, "generate", explode)
    with pytest.raises(OutOfMemory) as info:
        model.generate(images[:2], QUESTIONS[:2], GREEDY)
    assert info.value.__cause__ is error
    assert info.value.retryable


def test_other_runtime_errors_are_not_out_of_memory(
    tiny_checkpoint: Path, images: list[Image.Image], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _load(tiny_checkpoint, "none")

    def explode(**kwargs: object) -> torch.Tensor:
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(model.model, "generate", explode)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        model.generate(images[:1], QUESTIONS[:1], GREEDY)
