"""How much image detail LLaVA-NeXT may use: the anyres grid limit behind ``VQA_IMAGE_GRID``.

LLaVA-NeXT splits an image into tiles on the best of the checkpoint's ``image_grid_pinpoints``
(resolutions in multiples of the vision tower's side) plus one downscaled base tile; every tile
costs image tokens. A limit ``RxC`` keeps only the pinpoints of at most R tiles high and C tiles
wide, so fewer tokens per image at the price of fine detail. ``full`` keeps the checkpoint's list.
Pure Python, so the settings can validate the value without importing torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

FULL = "full"
_GRID = re.compile(r"^([1-9][0-9]?)x([1-9][0-9]?)$")


@dataclass(frozen=True)
class GridLimit:
    """At most ``rows`` tiles high and ``cols`` tiles wide."""

    rows: int
    cols: int


def parse_grid(value: str) -> GridLimit | None:
    """``full`` -> None (no limit); ``RxC`` (e.g. ``2x1``: 2 tiles high, 1 wide) -> a GridLimit."""
    text = value.strip().lower()
    if text == FULL:
        return None
    match = _GRID.match(text)
    if not match:
        raise ValueError(f"image grid must be 'full' or RxC with R, C in 1..99 (e.g. 2x1, 1x1), not {value!r}")
    return GridLimit(rows=int(match.group(1)), cols=int(match.group(2)))


def limit_pinpoints(pinpoints: list[list[int]], side: int, limit: GridLimit | None) -> list[list[int]]:
    """The checkpoint's pinpoints ([height, width] pairs) that fit ``limit`` tiles of ``side`` pixels.

    When none fits (``1x1``: the 7B has no single-tile pinpoint), one ``side x side`` pinpoint
    is left: the image is then one grid tile plus the base tile, the least LLaVA-NeXT can take.
    """
    if limit is None:
        return [list(point) for point in pinpoints]
    kept = [list(point) for point in pinpoints if point[0] <= limit.rows * side and point[1] <= limit.cols * side]
    return kept or [[side, side]]


def grid_text(limit: GridLimit | None) -> str:
    """The canonical spelling of a limit: ``full`` or ``RxC``."""
    return FULL if limit is None else f"{limit.rows}x{limit.cols}"


def intersect(first: GridLimit | None, second: GridLimit | None) -> GridLimit | None:
    """The tighter of two limits on each side (None = no limit)."""
    if first is None:
        return second
    if second is None:
        return first
    return GridLimit(rows=min(first.rows, second.rows), cols=min(first.cols, second.cols))


def effective_grid(requested: str | None, worker_default: str) -> str:
    """The grid a job runs with: what it asked for (None: nothing) within the worker's ``VQA_IMAGE_GRID``.

    A job may ask for less detail than the worker's default, never more: ``full`` on a ``2x1``
    worker is ``2x1``, ``1x1`` on a ``full`` worker is ``1x1``, ``1x3`` on a ``2x1`` one ``1x1``.
    """
    worker = parse_grid(worker_default)
    if requested is None:
        return grid_text(worker)
    return grid_text(intersect(parse_grid(requested), worker))
