"""Mutation fuzzing of decode_image: every outcome is an RGB image or one of our typed refusals.

A deterministic loop applies thousands of seeded mutations (bit flips, byte stomps,
truncations, splices between formats, slice deletions and duplications) to valid files of
every allowed format; hypothesis then explores edits of its own. Nothing else may escape:
no Pillow exception, no warning (pytest turns warnings into errors), no hang.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from producer.errors import ImageRejected
from tests.support.image_bytes import fuzz_seeds
from worker.fetch.images import FetchPolicy, decode_image

pytestmark = pytest.mark.timeout(120)

SEEDS = fuzz_seeds()
NAMES = sorted(SEEDS)
# Mutated headers may claim large sizes; a small cap keeps each decode cheap.
POLICY = FetchPolicy(max_pixels=1_000_000)
DECODE_CODES = {"not_an_image", "unsupported_format", "corrupt_image", "image_too_many_pixels"}
MUTATIONS_PER_SEED = 1500


def outcome(data: bytes) -> str:
    """'ok' or the refusal code; anything else raised propagates and fails the test."""
    try:
        image = decode_image(data, POLICY)
    except ImageRejected as exc:
        assert exc.code in DECODE_CODES, exc
        assert exc.message
        return exc.code
    assert image.mode == "RGB"
    assert image.width * image.height <= POLICY.max_pixels
    return "ok"


def _position(rng: random.Random, data: bytes) -> int:
    # Half the edits land in the first 64 bytes, where headers and sizes live.
    limit = min(len(data), 64) if rng.random() < 0.5 else len(data)
    return rng.randrange(max(limit, 1))


def _flip_bits(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        out[_position(rng, data)] ^= 1 << rng.randrange(8)
    return bytes(out)


def _stomp_bytes(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        out[_position(rng, data)] = rng.choice((0x00, 0xFF, 0x7F, 0x80, 0x01, rng.randrange(256)))
    return bytes(out)


def _truncate(rng: random.Random, data: bytes) -> bytes:
    return data[: rng.randrange(len(data))]


def _splice(rng: random.Random, data: bytes) -> bytes:
    other = SEEDS[rng.choice(NAMES)]
    cut = rng.randrange(1, len(data))
    start = rng.randrange(len(other))
    return data[:cut] + other[start : start + rng.randint(1, 256)] + data[cut:]


def _delete_slice(rng: random.Random, data: bytes) -> bytes:
    start = rng.randrange(len(data))
    return data[:start] + data[start + rng.randint(1, 64) :]


def _duplicate_slice(rng: random.Random, data: bytes) -> bytes:
    start = rng.randrange(len(data))
    piece = data[start : start + rng.randint(1, 128)]
    return data[:start] + piece * rng.randint(2, 50) + data[start:]


MUTATORS: list[Callable[[random.Random, bytes], bytes]] = [
    _flip_bits,
    _stomp_bytes,
    _truncate,
    _splice,
    _delete_slice,
    _duplicate_slice,
]


@pytest.mark.parametrize("name", NAMES)
def test_seed_decodes(name: str) -> None:
    assert outcome(SEEDS[name]) == "ok"


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_mutations(name: str) -> None:
    rng = random.Random(f"vqa-{name}")
    seen: dict[str, int] = {}
    for round_ in range(MUTATIONS_PER_SEED):
        mutator = MUTATORS[round_ % len(MUTATORS)]
        data = mutator(rng, SEEDS[name])
        if rng.random() < 0.3 and len(data) > 2:  # stack a second mutation now and then
            data = rng.choice(MUTATORS)(rng, data)
        try:
            code = outcome(data)
        except Exception as exc:
            raise AssertionError(f"{name} round {round_} ({mutator.__name__}): {exc!r}; data={data[:80]!r}") from exc
        seen[code] = seen.get(code, 0) + 1
    # The mutations must exercise the decoder, not only the sniffer.
    assert seen.get("ok", 0) + seen.get("corrupt_image", 0) > MUTATIONS_PER_SEED // 10, seen


FUZZ_SETTINGS = settings(
    max_examples=1500,
    deadline=None,
    derandomize=True,  # the same examples on every run: CI does not flake
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@FUZZ_SETTINGS
@given(
    name=st.sampled_from(NAMES),
    edits=st.lists(st.tuples(st.integers(min_value=0, max_value=4095), st.integers(0, 255)), max_size=12),
    keep=st.one_of(st.none(), st.integers(min_value=0, max_value=4096)),
)
def test_hypothesis_edits(name: str, edits: list[tuple[int, int]], keep: int | None) -> None:
    data = bytearray(SEEDS[name])
    for position, value in edits:
        data[position % len(data)] = value
    outcome(bytes(data[:keep] if keep is not None else data))


MAGICS = [b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"GIF87a", b"RIFF\x00\x00\x00\x00WEBPVP8 ", b"RIFF\x00\x00\x00\x00WEBPVP8L", b"RIFF\x00\x00\x00\x00WEBPVP8X", b"BM\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x28\x00\x00\x00"]


@FUZZ_SETTINGS
@given(magic=st.sampled_from(MAGICS), tail=st.binary(max_size=512))
def test_hypothesis_random_bodies_behind_real_magic(magic: bytes, tail: bytes) -> None:
    outcome(magic + tail)
