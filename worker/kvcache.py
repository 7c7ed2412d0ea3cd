"""A key/value cache that writes each decode step in place instead of copying the whole cache.

Transformers' ``DynamicCache`` grows by ``torch.cat``: every decode step copies every layer's
keys and values, the whole prompt's included, into a new tensor one token longer. For a LLaVA
prompt (~2,000-2,900 image tokens on the 7B, a few hundred on the bench model) that copy is
much of a decode step, and more the longer the prompt: on the bench model's language model at
batch 8 (fp32, 2 cores) a step after a 320-token prompt takes 14.6 ms in place vs 16.3 copying,
after 1,000 tokens 19.9 vs 32.3 ms, after 2,400 tokens 37.8 vs 154 ms (docs/benchmarks/kv-cache/).

:class:`ReservedCache` allocates each layer once, room for the answer included (``reserve``
tokens past the first write), and hands attention views of the filled part, so attention
reads exactly what ``DynamicCache`` would give it and greedy answers are the same token for
token (tests/worker/test_kvcache.py). It never holds more than ``DynamicCache`` holds at its
peak, when ``cat`` keeps the old and the new copy at once.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class ReservedLayer(DynamicLayer):
    """One layer's keys and values in a buffer with room for ``reserve`` more tokens than its first write."""

    def __init__(self, reserve: int) -> None:
        super().__init__()
        self.reserve = reserve
        self.length = 0
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.device = key_states.device
            self.is_initialized = True
        end = self.length + key_states.shape[-2]
        if self._key_buffer is None or end > self._key_buffer.shape[-2]:
            # Only when a caller writes more than it reserved for: correct, at the price of one copy.
            self._grow(key_states, value_states, end + self.reserve)
        assert self._key_buffer is not None and self._value_buffer is not None
        self._key_buffer[..., self.length : end, :].copy_(key_states)
        self._value_buffer[..., self.length : end, :].copy_(value_states)
        self.length = end
        self._expose()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def reset(self) -> None:
        self._key_buffer = self._value_buffer = None
        self.length = 0
        super().reset()

    def crop(self, tokens_to_remove: int) -> None:
        # DynamicLayer's contract: a negative count of tokens to drop from the end.
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, not {tokens_to_remove}")
        if tokens_to_remove and self.is_initialized:
            self.length = max(0, self.length + tokens_to_remove)
            self._expose()

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.length:
            self._key_buffer = self._key_buffer.repeat_interleave(repeats, dim=0)  # type: ignore[union-attr]
            self._value_buffer = self._value_buffer.repeat_interleave(repeats, dim=0)  # type: ignore[union-attr]
            self._expose()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.length:
            self._key_buffer = self._key_buffer[indices, ...]  # type: ignore[index]
            self._value_buffer = self._value_buffer[indices, ...]  # type: ignore[index]
            self._expose()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.length:
            self.batch_select_indices(beam_idx.to(self.device))

    def offload(self) -> None:
        raise NotImplementedError("ReservedCache does not offload: use DynamicCache(offloading=True)")

    def adopt(self, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
        """Take ``keys``/``values`` (room past ``length`` included) as this layer's buffers, without a copy."""
        self.device = keys.device
        self.is_initialized = True
        self._key_buffer, self._value_buffer, self.length = keys, values, length
        self._expose()

    def _grow(self, key_states: torch.Tensor, value_states: torch.Tensor, capacity: int) -> None:
        key_buffer = key_states.new_empty((*key_states.shape[:-2], capacity, key_states.shape[-1]))
        value_buffer = value_states.new_empty((*value_states.shape[:-2], capacity, value_states.shape[-1]))
        if self.length:
            key_buffer[..., : self.length, :].copy_(self.keys)
            value_buffer[..., : self.length, :].copy_(self.values)
        self._key_buffer, self._value_buffer = key_buffer, value_buffer

    def _expose(self) -> None:
        # Views of the filled part: what attention reads, and what DynamicLayer's readers see.
        assert self._key_buffer is not None and self._value_buffer is not None
        self.keys = self._key_buffer[..., : self.length, :]
        self.values = self._value_buffer[..., : self.length, :]


class ReservedCache(DynamicCache):
    """``DynamicCache`` whose full-attention layers are :class:`ReservedLayer`: pass as ``cache=`` to a forward or ``generate``.

    ``reserve``: tokens the cache will be written past its first write (the prompt's, or a
    shared prefix's), e.g. the suffix's columns plus ``max_new_tokens``.
    """

    def __init__(self, config: Any, reserve: int) -> None:
        super().__init__(config=config)
        # Other layer kinds (sliding windows) keep their own bookkeeping; LLaVA-NeXT's Llama and
        # Mistral text models have full-attention layers only.
        self.layers = [ReservedLayer(reserve) if type(layer) is DynamicLayer else layer for layer in self.layers]

    @classmethod
    def from_rows(cls, config: Any, rows: list[list[tuple[torch.Tensor, torch.Tensor]]], *, width: int, reserve: int) -> ReservedCache:
        """A cache of ``len(rows)`` rows: ``rows[r][layer]`` is that row's ``(keys, values)``, shaped (heads, tokens, head_dim).

        Each row is right-aligned in ``width`` columns (the left padding zeros, which the
        attention mask hides), with room for ``reserve`` more: the layout of a left-padded
        prefill, built from prefixes that were computed apart.
        """
        cache = cls(config, reserve=reserve)
        for index, layer in enumerate(cache.layers):
            if not isinstance(layer, ReservedLayer):
                raise ValueError(f"layer {index} is a {type(layer).__name__}: rows can only be assembled into full-attention layers")
            sample_keys, sample_values = rows[0][index]
            heads, _, head_dim = sample_keys.shape
            keys = sample_keys.new_zeros((len(rows), heads, width + reserve, head_dim))
            values = sample_values.new_zeros((len(rows), sample_values.shape[0], width + reserve, sample_values.shape[-1]))
            for row, layers in enumerate(rows):
                row_keys, row_values = layers[index]
                keys[row, :, width - row_keys.shape[1] : width].copy_(row_keys)
                values[row, :, width - row_values.shape[1] : width].copy_(row_values)
            layer.adopt(keys, values, width)
        return cache
