"""Shared image prefixes: questions about one image pay for the image once.

A LLaVA-NeXT prompt is ``system text + <image> x N + question + "ASSISTANT:"``; the image
tokens are ~95% of a short-answer prompt. Jobs in one batch whose prompts agree up to the end
of the image (same pixels, same template) share that prefix. A batch runs in two model calls
whatever its images: one forward over each distinct prefix (left-padded to the longest, the
vision tower and the language model once per image), then a cache of one row per question,
its image's prefix right-aligned in it (worker/kvcache.py, ``ReservedCache.from_rows``), from
which every question's suffix continues in one batched ``generate``. The batch's last prefix is
kept for the next batch (worker/model.py): when a batch boundary splits an image's questions,
the rest continue from it without a second prefill.

Suffixes have different lengths, so each row is ``padding + prefix + padding + suffix``: the
padding is masked out, and generate's position ids (attention-mask cumsum) still count the
suffix on from the end of its prefix, as in the job's own prompt.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch


def image_key(pixel_values: torch.Tensor, image_size: torch.Tensor, *, source: bytes | None = None,
              pinpoints: Sequence[Sequence[int]] = ()) -> str:
    """Content hash of an image as the model sees it: the same bytes under different URLs share a prefix.

    The hash costs ~1 ms of CPU per MB, and the 7B's five 336-pixel fp32 tiles are 6.8 MB (~7 ms
    a photo, docs/benchmarks/preprocess/prefix-key/). So ``source``, the encoded bytes the pixels
    were decoded from (the worker's fetch has them), is hashed instead when it is the smaller, with
    the grid's ``pinpoints``: one worker decodes and preprocesses the same bytes at one grid to the
    same pixels. The same bytes always take the same branch, so they always get the same key.
    """
    digest = hashlib.blake2b(digest_size=16)
    shape = (tuple(pixel_values.shape), str(pixel_values.dtype), image_size.tolist())
    if source is not None and keys_by_source(pixel_values, source):
        digest.update(repr(("source", shape, [list(point) for point in pinpoints])).encode())
        digest.update(source)
    else:
        digest.update(repr(shape).encode())
        # A view of the tensor's memory: tobytes() would copy megabytes first.
        digest.update(memoryview(pixel_values.contiguous().numpy()).cast("B"))
    return digest.hexdigest()


def keys_by_source(pixel_values: torch.Tensor, source: bytes) -> bool:
    """Whether :func:`image_key` hashes ``source`` rather than the tiles: the smaller of the two."""
    return len(source) < pixel_values.nelement() * pixel_values.element_size()


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
    """Group a batch by (image key, prefix tokens), in first-seen order; the indices without a key apart."""
    by_key: dict[tuple[str, tuple[int, ...]], list[int]] = {}
    unkeyed: list[int] = []
    for index, key in enumerate(keys):
        if key is None:
            unkeyed.append(index)
        else:
            by_key.setdefault(key, []).append(index)
    groups = [PrefixGroup(indices=tuple(indices), prefix_len=len(key[1])) for key, indices in by_key.items()]
    return groups, unkeyed


def prefix_batch(prefixes: Sequence[torch.Tensor], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prefixes left-padded to the longest: input ids, attention mask and position ids for one forward.

    The position ids are explicit because a plain forward (unlike ``generate``) counts positions
    from the first column, padding included: a shorter prefix must still start at 0.
    """
    width = max(int(prefix.shape[0]) for prefix in prefixes)
    input_ids = torch.full((len(prefixes), width), pad_token_id, dtype=prefixes[0].dtype)
    attention_mask = torch.zeros((len(prefixes), width), dtype=torch.long)
    for row, prefix in enumerate(prefixes):
        input_ids[row, width - prefix.shape[0] :] = prefix
        attention_mask[row, width - prefix.shape[0] :] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids, attention_mask, position_ids


def suffix_rows(
    prefix_ids: torch.Tensor, prefix_mask: torch.Tensor, rows: Sequence[tuple[int, torch.Tensor]], pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One ``prefix + padding + suffix`` row per ``(prefix row, suffix)`` and the attention mask (padding masked out).

    ``prefix_ids``/``prefix_mask`` are :func:`prefix_batch`'s; the rows' prefix part must be what
    the cache holds for them, so generate feeds only the suffix columns past it.
    """
    longest = max(int(suffix.shape[0]) for _, suffix in rows)
    width = int(prefix_ids.shape[1]) + longest
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=prefix_ids.dtype)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, (prefix_row, suffix) in enumerate(rows):
        input_ids[row, : prefix_ids.shape[1]] = prefix_ids[prefix_row]
        attention_mask[row, : prefix_ids.shape[1]] = prefix_mask[prefix_row]
        input_ids[row, width - suffix.shape[0] :] = suffix
        attention_mask[row, width - suffix.shape[0] :] = 1
    return input_ids, attention_mask
