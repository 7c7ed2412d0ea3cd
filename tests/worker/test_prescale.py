"""VQA_IMAGE_PRESCALE (worker/prescale.py): decoding no larger than the model uses keeps its grid and tokens."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from PIL.JpegImagePlugin import JpegImageFile
from pydantic import ValidationError

from bench.prescale import photo, seven_b_prescaler
from producer.errors import ImageRejected
from producer.image_grid import effective_grid, limit_pinpoints, parse_grid
from producer.schema import GenerationSettings, Job, utcnow
from producer.settings import Settings
from tests.support.image_bytes import encode, png_header_bomb
from worker.cancels import RevokedSet
from worker.fetch.images import FetchPolicy, decode_image
from worker.imageshare import SharedImages
from worker.preparing import JobPreparer
from worker.prescale import Prescaler

pytestmark = pytest.mark.timeout(120)
FULL = FetchPolicy()
# (width, height): photos both ways round, panoramas, odd sizes whose fit rounds, and small ones.
EVEN = [(4032, 3024), (3024, 4032), (1920, 1080), (1080, 1920), (640, 480)]  # camera ratios: always prescaled
SIZES = [(4032, 3024), (3024, 4032), (1920, 1080), (1080, 1920), (2000, 1499), (1999, 500), (500, 1601), (1300, 731), (640, 480), (97, 61)]


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> Any:
    from worker.model import VQAModel

    return VQAModel.load(Settings(model=str(tiny_model_dir), quantization="none", device="cpu"))


@pytest.fixture(scope="module")
def seven_b_processor(model: Any) -> Any:
    """The 7B's image processor (bench/preprocess.py's settings) with the tiny tokenizer: its token counts need no weights."""
    from transformers import LlavaNextProcessor

    from bench.preprocess import processor

    return LlavaNextProcessor(image_processor=processor("pil"), tokenizer=model.processor.tokenizer, patch_size=14,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1)


def _encoded(size: tuple[int, int], seed: int) -> bytes:
    return photo(*size, seed=seed)


@pytest.mark.parametrize("grid", [None, "2x1", "1x1"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_prescaled_prompt_has_the_full_paths_tokens_and_tiles(model: Any, size: tuple[int, int], grid: str | None) -> None:
    data = _encoded(size, seed=sum(size))
    prescaled = decode_image(data, FetchPolicy(prescale=model.prescaler()), image_grid=grid)
    full = model.prepare(decode_image(data, FULL), "What is it?", image_grid=grid)
    small = model.prepare(prescaled, "What is it?", image_grid=grid)
    assert small.input_ids.tolist() == full.input_ids.tolist()
    assert small.pixel_values.shape == full.pixel_values.shape
    target = model.prescaler().for_grid(grid).target(*size)
    assert prescaled.size == (target or size)  # None: rounding would change the grid or tokens, so decoded in full
    if size in EVEN:  # the tiny model's largest pinpoint is 96 pixels, its tile 32
        assert target is not None and max(target) <= (32 if grid == "1x1" else 96)


@pytest.mark.parametrize("grid", ["full", "2x2", "2x1", "1x2", "1x1"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_seven_b_geometry_keeps_grid_and_tokens_for_every_grid_a_job_can_ask(seven_b_processor: Any, size: tuple[int, int], grid: str) -> None:
    data = _encoded(size, seed=1)
    # A job narrowing the grid gets the image prescaled for the grid it runs with.
    prescaled = decode_image(data, FetchPolicy(prescale=seven_b_prescaler()), image_grid=grid)
    image_processor = seven_b_processor.image_processor
    full_points = image_processor.image_grid_pinpoints
    image_processor.image_grid_pinpoints = limit_pinpoints(full_points, 336, parse_grid(grid))
    try:
        prompt = "USER: <image>\nWhat is it? ASSISTANT:"
        full = seven_b_processor(images=[decode_image(data, FULL)], text=[prompt], return_tensors="pt")
        small = seven_b_processor(images=[prescaled], text=[prompt], return_tensors="pt")
    finally:
        image_processor.image_grid_pinpoints = full_points
    assert small["input_ids"].shape == full["input_ids"].shape
    assert small["pixel_values"].shape == full["pixel_values"].shape
    target = seven_b_prescaler().for_grid(grid).target(*size)
    assert prescaled.size == (target or size)
    if size in EVEN and min(size) > 1008:
        assert target is not None and max(target) <= (336 if grid == "1x1" else 1008)


@pytest.mark.parametrize(("grid", "decoded"), [(None, (672, 504)), ("full", (672, 504)), ("1x1", (336, 252))])
def test_a_job_asking_for_less_detail_is_prescaled_to_its_own_grid(grid: str | None, decoded: tuple[int, int]) -> None:
    # A 4032x3024 photo on the 7B: 672x504 on its full grid, 336x252 on the one 1x1 tile (the
    # processor's fit for that job), not the full grid's 672x504 for the processor to shrink again.
    data = _encoded((4032, 3024), seed=9)
    assert decode_image(data, FetchPolicy(prescale=seven_b_prescaler()), image_grid=grid).size == decoded


@pytest.mark.parametrize("worker_grid", ["full", "2x1", "1x1"])
def test_a_jobs_prescale_pinpoints_are_the_ones_its_processor_uses(tiny_model_dir: Path, worker_grid: str) -> None:
    from worker.model import VQAModel

    model = VQAModel.load(Settings(model=str(tiny_model_dir), quantization="none", device="cpu", image_grid=worker_grid))
    for asked in (None, "full", "3x3", "2x2", "2x1", "1x2", "1x3", "1x1"):
        assert model.prescaler().for_grid(asked).pinpoints == model.grid_pinpoints(effective_grid(asked, worker_grid)), asked


class _Unrun:
    """A job's first delivery: not cancelled, never run (no Redis, no S3 needed): every key it is asked for is missing."""

    revoked = RevokedSet(ttl_s=60)

    @property
    def client(self) -> _Unrun:
        return self

    def mget(self, names: list[str]) -> list[None]:
        return [None] * len(names)

    def reasons(self, jobs: list[Job], **_: Any) -> dict[str, Any]:
        return {}


class _Sizes:
    """An engine without an image-first split: records the size of each image it is given."""

    name, quantization = "sizes", "none"

    def prepare(self, image: Image.Image, question: str, *, image_grid: str | None = None) -> tuple[int, int]:
        return image.size

    def cost(self, inputs: Any) -> int:
        return 1


@pytest.mark.parametrize("shared", [False, True], ids=["alone", "shared"])
@pytest.mark.parametrize("split", [True, False], ids=["image-first", "whole"])
def test_the_fetch_stage_prescales_each_job_for_its_own_grid(
    model: Any, monkeypatch: pytest.MonkeyPatch, shared: bool, split: bool
) -> None:
    data = _encoded((4032, 3024), seed=10)
    monkeypatch.setattr("worker.preparing.fetch_bytes", lambda url, policy, s3_client=None: data)
    engine = model if split else _Sizes()
    unrun = _Unrun()
    preparer = JobPreparer(
        engine=engine, store=None, counters=unrun, cancels=unrun, policy=FetchPolicy(prescale=model.prescaler()),  # type: ignore[arg-type]
        s3_client=None, images=SharedImages(max_entries=4) if shared else None,
    )
    sizes = {}
    held = []  # keep each shared image for the next job, as jobs in the worker at once do
    for grid in (None, "1x1"):
        job = Job(job_id=f"job-{grid}", image_url="https://images.example/photo.jpg", question="What?", model="m",
                  generation=GenerationSettings(), submitted_at=utcnow(), image_grid=grid)
        prepared = preparer(job)
        assert prepared.error is None
        held.append(prepared)
        # The image the engine got, (width, height): the model's image_sizes are (height, width).
        sizes[grid] = tuple(reversed(prepared.inputs.image_size.tolist())) if split else prepared.inputs
    assert sizes == {None: model.prescaler().target(4032, 3024), "1x1": model.prescaler().for_grid("1x1").target(4032, 3024)}
    assert sizes[None] != sizes["1x1"]


def test_jobs_asking_for_the_same_effective_grid_share_one_image(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a 2x1 worker None, "full" and "2x1" all run at 2x1: one load of the image for the three, another for 1x1."""
    loads = []
    data = _encoded((640, 480), seed=11)
    monkeypatch.setattr("worker.preparing.fetch_bytes", lambda url, policy, s3_client=None: loads.append(url) or data)
    unrun = _Unrun()
    preparer = JobPreparer(
        engine=_Sizes(), store=None, counters=unrun, cancels=unrun, policy=FetchPolicy(prescale=seven_b_prescaler()),  # type: ignore[arg-type]
        s3_client=None, images=SharedImages(max_entries=8), image_grid="2x1",
    )
    held = []
    for grid in (None, "full", "2x1", "1x1"):
        job = Job(job_id=f"job-{grid}", image_url="https://images.example/photo.jpg", question="What?", model="m",
                  generation=GenerationSettings(), submitted_at=utcnow(), image_grid=grid)
        held.append(preparer(job))
        assert held[-1].error is None
    assert len(loads) == 2


def test_draft_decodes_a_phone_photo_at_reduced_scale(monkeypatch: pytest.MonkeyPatch) -> None:
    drafts: list[Any] = []
    original = JpegImageFile.draft

    def spy(self: JpegImageFile, mode: str | None, size: tuple[int, int] | None) -> Any:
        result = original(self, mode, size)
        drafts.append((size, self.size))
        return result

    monkeypatch.setattr(JpegImageFile, "draft", spy)
    image = decode_image(_encoded((4032, 3024), seed=3), FetchPolicy(prescale=seven_b_prescaler()))
    assert image.size == (672, 504) and image.mode == "RGB"
    assert drafts == [((672, 504), (1008, 756))]  # 1/4 scale: the smallest still at least the target


def test_exif_rotated_photo_is_prescaled_upright() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait
    stored = Image.open(io.BytesIO(_encoded((4032, 3024), seed=4)))
    data = encode(stored, "JPEG", quality=90, exif=exif.tobytes())
    assert decode_image(data, FULL).size == (3024, 4032)
    assert decode_image(data, FetchPolicy(prescale=seven_b_prescaler())).size == (504, 672)


def test_non_jpeg_is_resized_once_without_a_draft() -> None:
    png = encode(Image.open(io.BytesIO(_encoded((2000, 1500), seed=5))), "PNG")
    # transformers' own float rounding: 1500 * (672 / 2000) = 504.00000000000006, so 505 rows.
    assert decode_image(png, FetchPolicy(prescale=seven_b_prescaler())).size == (672, 505)


@pytest.mark.parametrize("mode", ["L", "CMYK"])
def test_grey_and_cmyk_jpegs_are_prescaled_to_rgb(mode: str) -> None:
    data = encode(Image.open(io.BytesIO(_encoded((2016, 1512), seed=8))).convert(mode), "JPEG", quality=90)
    image = decode_image(data, FetchPolicy(prescale=seven_b_prescaler()))
    assert image.mode == "RGB" and image.size == seven_b_prescaler().target(2016, 1512)


def test_an_image_the_processor_would_enlarge_is_left_alone() -> None:
    data = _encoded((640, 480), seed=6)
    assert decode_image(data, FetchPolicy(prescale=seven_b_prescaler())).tobytes() == decode_image(data, FULL).tobytes()


def _jpeg_claiming(width: int, height: int) -> bytes:
    """A small JPEG whose frame header (SOF0) claims ``width`` x ``height``: a decompression bomb's header."""
    data = bytearray(encode(Image.new("RGB", (16, 16), (10, 20, 30)), "JPEG", quality=80))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


@pytest.mark.parametrize("data", [_jpeg_claiming(60000, 60000), png_header_bomb(50000, 50000)], ids=["jpeg", "png"])
def test_bombs_are_refused_before_any_draft(data: bytes) -> None:
    with pytest.raises(ImageRejected) as caught:
        decode_image(data, FetchPolicy(prescale=seven_b_prescaler()))
    assert caught.value.code == "image_too_many_pixels"


def test_pixel_cap_counts_the_full_size_not_the_prescaled_one() -> None:
    data = _encoded((2000, 1500), seed=7)  # 3 megapixels, prescaled to 672x504 = 0.3
    with pytest.raises(ImageRejected) as caught:
        decode_image(data, FetchPolicy(max_pixels=1_000_000, prescale=seven_b_prescaler()))
    assert caught.value.code == "image_too_many_pixels"


def test_setting_is_validated_and_off_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().image_prescale is False
    monkeypatch.setenv("VQA_IMAGE_PRESCALE", "true")
    on = Settings()
    assert on.image_prescale is True
    monkeypatch.setenv("VQA_IMAGE_PRESCALE", "maybe")
    with pytest.raises(ValidationError, match="image_prescale"):
        Settings()
    prescaler = seven_b_prescaler()
    assert FetchPolicy.from_settings(on, prescale=prescaler).prescale is prescaler
    assert FetchPolicy.from_settings(Settings(image_prescale=False), prescale=prescaler).prescale is None


def test_worker_puts_the_engines_prescaler_on_its_fetch_policy_only_when_asked(model: Any) -> None:
    from worker.main import _fetch_policy

    assert _fetch_policy(Settings(image_prescale=True), model).prescale == model.prescaler()
    assert _fetch_policy(Settings(image_prescale=False), model).prescale is None
    assert _fetch_policy(Settings(image_prescale=True), object()).prescale is None  # an engine without one: full decode


@pytest.mark.parametrize("options", [{"pinpoints": ()}, {"side": 0}, {"patch": 0}])
def test_prescaler_refuses_a_broken_geometry(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Prescaler(**{"pinpoints": ((336, 672),), "side": 336, "patch": 14, "resample": 3, **options})
