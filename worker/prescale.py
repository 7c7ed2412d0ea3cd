"""Decode and shrink a photo only as far as LLaVA-NeXT will use it (``VQA_IMAGE_PRESCALE``).

LLaVA-NeXT resizes every image to fit the best of its grid pinpoints (at most 1008 pixels on a
side for the 7B) before it cuts tiles, so a 12-megapixel phone photo is decoded and then mostly
thrown away. With a :class:`Prescaler` on the fetch policy, ``decode_image`` asks for a JPEG at
the smallest of Pillow's 1/2, 1/4, 1/8 decode scales that is still at least that fit
(``Image.draft``), then resizes once to exactly the size the processor would resize the
original to. The processor's own resize is then a copy, and its tile grid, its token count
and the model's unpadding are those of the full-resolution path: an image for which rounding
would change any of them (or one the processor would enlarge) is decoded in full, as before.
A job asking for less detail (its ``image_grid``) is prescaled for the grid it runs with
(:meth:`Prescaler.for_grid`), so a ``1x1`` job's photo is decoded to its 1x1 fit, not the
worker's full grid's.

Pixels change slightly (a decode at reduced scale, one resize from a smaller image), so greedy
answers can change: docs/benchmarks/prescale/ has the measured rate, and the setting stays off
by default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from producer.image_grid import limit_pinpoints, parse_grid

Size = tuple[int, int]  # (height, width), as the processor counts them


@dataclass(frozen=True)
class Prescaler:
    """The processor's geometry: what ``decode_image`` needs to decode an image no larger than used.

    ``pinpoints`` are the worker's ([height, width] pairs, after ``VQA_IMAGE_GRID``); ``side``
    the tile side, ``patch`` the vision tower's patch size, ``resample`` the processor's Pillow
    filter. :meth:`target` is for a job that runs on these pinpoints; :meth:`for_grid` gives the
    geometry of a job asking for less detail.
    """

    pinpoints: tuple[Size, ...]
    side: int
    patch: int
    resample: int
    _narrowed: dict[str, Prescaler] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        points = tuple((int(h), int(w)) for h, w in self.pinpoints)
        if not points or self.side < 1 or self.patch < 1:
            raise ValueError("a prescaler needs pinpoints, a tile side and a patch size")
        object.__setattr__(self, "pinpoints", points)
        object.__setattr__(self, "_narrowed", {})

    def for_grid(self, image_grid: str | None) -> Prescaler:
        """The geometry for a job asking for ``image_grid`` (``full``/``RxC``; None: the worker's own).

        The worker's pinpoints within the job's limit: the pinpoints the processor uses for the
        job (its effective grid, the job's request within ``VQA_IMAGE_GRID``), as narrowing the
        checkpoint's pinpoints by both limits at once keeps the same ones.
        """
        if image_grid is None:
            return self
        found = self._narrowed.get(image_grid)
        if found is None:
            points = limit_pinpoints([list(p) for p in self.pinpoints], self.side, parse_grid(image_grid))
            found = Prescaler(pinpoints=tuple((h, w) for h, w in points), side=self.side, patch=self.patch, resample=self.resample)
            self._narrowed[image_grid] = found  # fetch threads racing here build equal values: no lock needed
        return found

    def target(self, width: int, height: int) -> tuple[int, int] | None:
        """The (width, height) to decode an upright ``width`` x ``height`` image to, or None to decode it in full."""
        best = best_resolution((height, width), self.pinpoints)
        fit = fit_size((height, width), best)
        if fit[0] >= height or fit[1] >= width:
            return None  # the processor keeps or enlarges it: nothing to save
        if best_resolution(fit, self.pinpoints) != best or self._unpadded(fit, best) != self._unpadded((height, width), best):
            return None  # rounding would change the grid or the token count: keep the full path
        return fit[1], fit[0]

    def _unpadded(self, size: Size, best: Size) -> Size:
        """Feature rows and columns the model keeps for an image of ``size`` on the grid ``best`` (LLaVA-NeXT's unpadding)."""
        height, width = size
        rows, cols = best[0] // self.side * (self.side // self.patch), best[1] // self.side * (self.side // self.patch)
        if width / height > cols / rows:
            padding = (rows - int(round(height * (cols / width), 7))) // 2
            return rows - 2 * padding, cols
        padding = (cols - int(round(width * (rows / height), 7))) // 2
        return rows, cols - 2 * padding


def best_resolution(size: Size, pinpoints: tuple[Size, ...]) -> Size:
    """``transformers``' select_best_resolution: the pinpoint keeping the most pixels, then the least waste."""
    height, width = size
    best, most, least_waste = pinpoints[0], 0, float("inf")
    for h, w in pinpoints:
        scale = min(w / width, h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        waste = w * h - effective
        if effective > most or (effective == most and waste < least_waste):
            best, most, least_waste = (h, w), effective, waste
    return best


def fit_size(size: Size, target: Size) -> Size:
    """``transformers``' get_patch_output_size: ``size`` scaled to fit ``target``, aspect ratio kept."""
    height, width = size
    scale_w, scale_h = target[1] / width, target[0] / height
    # The same float arithmetic as transformers, so the same rounding.
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target[0]), target[1]
    return target[0], min(math.ceil(width * scale_h), target[1])
