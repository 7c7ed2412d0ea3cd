"""An image's part of a job's model inputs, built apart from the model's weights.

The fetch threads build it through :meth:`worker.model.VQAModel.prepare_image`; with
``VQA_PREPROCESS_PROCESSES`` worker processes build it (worker/preprocess_pool.py) from an
:class:`ImagePrep`, which holds the processor and the grid settings and pickles, since it holds
nothing of the model. One function, :func:`build_image_inputs`, does the work for both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from producer.image_grid import FULL, effective_grid, limit_pinpoints, parse_grid
from worker.prefix import image_key


@dataclass(frozen=True)
class ImageInputs:
    """An image preprocessed for the model before any question: what the jobs about it share."""

    pixel_values: torch.Tensor  # (tiles, 3, side, side)
    image_size: torch.Tensor  # (2,): original height, width
    image_tokens: int  # what the prompt's <image> placeholder expands to for this image
    image_key: str | None = None
    image_grid: str = FULL  # the effective grid it was preprocessed for, and its pinpoints
    pinpoints: tuple[tuple[int, int], ...] = ()


def grid_pinpoints(checkpoint_pinpoints: Sequence[Sequence[int]], side: int, image_grid: str) -> tuple[tuple[int, int], ...]:
    """The checkpoint's pinpoints that fit ``image_grid`` (an effective grid: ``full`` or ``RxC``) at tile ``side``."""
    kept = limit_pinpoints([list(point) for point in checkpoint_pinpoints], side, parse_grid(image_grid))
    return tuple((int(height), int(width)) for height, width in kept)


def build_image_inputs(processor: Any, image: Image.Image, *, grid: str, pinpoints: tuple[tuple[int, int], ...], keyed: bool,
                       source: bytes | None = None) -> ImageInputs:
    """``image``'s tiles and <image> token count at ``pinpoints``; its prefix-sharing key when ``keyed``.

    ``processor`` is the caller's own copy (its pinpoints are set here); ``source`` the encoded
    bytes the image was decoded from, which the key may hash instead of the tiles (worker/prefix.py).
    """
    processor.image_processor.image_grid_pinpoints = [list(point) for point in pinpoints]
    # The processor's own path, on a prompt that is only the placeholder: it counts this
    # image's anyres tokens exactly as for a full prompt.
    encoded = processor(images=[image], text=[processor.image_token], return_tensors="pt")
    pixel_values, image_size = encoded["pixel_values"][0], encoded["image_sizes"][0]
    return ImageInputs(
        pixel_values=pixel_values,
        image_size=image_size,
        image_tokens=int((encoded["input_ids"][0] == processor.image_token_id).sum()),
        image_key=image_key(pixel_values, image_size, source=source, pinpoints=pinpoints) if keyed else None,
        image_grid=grid,
        pinpoints=pinpoints,
    )


@dataclass(frozen=True)
class ImagePrep:
    """What preparing an image needs of an engine, for a process of its own: the processor and the grid settings."""

    processor: Any  # LlavaNextProcessor, after VQA_IMAGE_GRID
    checkpoint_pinpoints: tuple[tuple[int, int], ...]
    side: int  # the vision tower's tile side
    image_grid: str  # the worker's VQA_IMAGE_GRID: a job may ask for less
    keyed: bool  # VQA_SHARE_IMAGE_PREFIX: compute each image's key

    def prepare_image(self, image: Image.Image, *, image_grid: str | None = None, source: bytes | None = None) -> ImageInputs:
        """As ``VQAModel.prepare_image`` (one thread per process: the processor is used as it is)."""
        grid = effective_grid(image_grid, self.image_grid)
        return build_image_inputs(self.processor, image, grid=grid, pinpoints=grid_pinpoints(self.checkpoint_pinpoints, self.side, grid),
                                  keyed=self.keyed, source=source)
