"""Shared image prefixes: questions about one image pay for the image once.

A LLaVA-NeXT prompt is ``system text + <image> x N + question + "ASSISTANT:"``; the image
tokens are ~95% of a short-answer prompt. Jobs in one batch whose prompts agree up to the end
of the image (same pixels, same template) share that prefix: the vision tower and the
language model run over it once (one Transformers ``DynamicCache``), the cache is repeated
once per question, and the questions' suffixes continue from it in one batched ``generate``.

Suffixes have different lengths, so each row is ``prefix + padding + suffix``: the padding
sits in the middle, masked out, and generate's position ids (attention-mask cumsum) still
count the suffix on from the end of the prefix, as in the job's own prompt.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch


def image_key(pixel_values: torch.Tensor, image_size: torch.Tensor) -> str:
    """Content hash of preprocessed pixels: the same bytes under different URLs share a prefix."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr((tuple(pixel_values.shape), str(pixel_values.dtype), image_size.tolist())).encode())
    digest.update(pixel_values.contiguous().numpy().tobytes())
    return digest.hexdigest()


def prefix_length(input_ids: torch.Tensor, image_token_id: int) -> int:
    """Tokens up to and including the last image token (0 when the prompt holds no image)."""
    positions = (input_ids == image_token_id).nonzero()
    return int(positions[-1, 0]) + 1 if len(positions) else 0


@dataclass(frozen=True)
class PrefixGroup:
    """Indices (into a batch) of items that share one image prefix."""

    indices: tuple[int, ...]
    prefix_len: int


def group_by_prefix(keys: Sequence[tuple[str, tuple[int, ...]] | None]) -> tuple[list[PrefixGroup], list[int]]:
    """Split a batch into groups of 2+ items with one (image key, prefix tokens) and the rest (indices)."""
    by_key: dict[tuple[str, tuple[int, ...]], list[int]] = {}
    alone: list[int] = []
    for index, key in enumerate(keys):
        if key is None:
            alone.append(index)
        else:
            by_key.setdefault(key, []).append(index)
    groups = []
    for key, indices in by_key.items():
        if len(indices) > 1:
            groups.append(PrefixGroup(indices=tuple(indices), prefix_len=len(key[1])))
        else:
            alone.extend(indices)
    return groups, sorted(alone)


def suffix_rows(
    prefix: torch.Tensor, suffixes: Sequence[torch.Tensor], pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``prefix + padding + suffix`` rows and their attention mask (padding masked out)."""
    longest = max(int(suffix.shape[0]) for suffix in suffixes)
    width = int(prefix.shape[0]) + longest
    input_ids = torch.full((len(suffixes), width), pad_token_id, dtype=prefix.dtype)
    attention_mask = torch.zeros((len(suffixes), width), dtype=torch.long)
    input_ids[:, : prefix.shape[0]] = prefix
    attention_mask[:, : prefix.shape[0]] = 1
    for row, suffix in enumerate(suffixes):
        input_ids[row, width - suffix.shape[0] :] = suffix
        attention_mask[row, width - suffix.shape[0] :] = 1
    return input_ids, attention_mask
