"""The engine contract: what the worker needs from a model, and nothing more.

The consumer and the runner only ever talk to an :class:`Engine`. The Hugging Face
LLaVA-NeXT implementation is :class:`worker.model.VQAModel`; another engine (vLLM on GPU
hosts, a shared-prefix engine) implements the same four things:

    prepare(image, question,    one job's model inputs, built on a fetch thread (thread-safe);
            image_grid=None)    image_grid: the job's own detail request (``full``/``RxC``),
                                which an engine without an anyres grid may ignore
    cost(inputs)                what the job costs a batch: its prompt length in tokens,
                                image tokens included (padding-aware batching groups by it)
    generate_batch(inputs, gen) one batched call; one :class:`Answer` per input, in order
    name, quantization          what records say produced the answer

An engine may also split ``prepare`` into its two parts (:class:`ImageFirstEngine`), so that
jobs about one image in a worker at the same time preprocess the image once
(worker/imageshare.py); prepared inputs may carry an ``image_key`` (a content hash) that the
batcher uses to put one image's questions together (worker/batching.py).

Errors: ``generate_batch`` raises :class:`producer.errors.OutOfMemory` when a batch does not
fit (the runner splits it) and anything else for a batch that breaks the model (the runner
splits it until the culprit stands alone).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from producer.schema import GenerationSettings


@dataclass(frozen=True)
class Answer:
    """One job's answer and what it cost the model."""

    text: str
    prompt_tokens: int  # image tokens included
    image_tokens: int
    generated_tokens: int  # the end-of-sequence token included when the model emitted one


@runtime_checkable
class Engine(Protocol):
    """A loaded model the worker can batch jobs into."""

    @property
    def name(self) -> str: ...

    @property
    def quantization(self) -> str: ...

    def prepare(self, image: Any, question: str, *, image_grid: str | None = None) -> Any:
        """One job's inputs (an image and its question), ready to batch; called on fetch threads.

        ``image_grid`` is the job's request for less image detail (None: the worker's default).
        The worker batches jobs of one effective grid together.
        """
        ...

    def cost(self, inputs: Any) -> int:
        """Prompt tokens of prepared inputs, image tokens included."""
        ...

    def generate_batch(self, inputs: Sequence[Any], generation: GenerationSettings) -> list[Answer]:
        """Answer prepared jobs in one batched call; one Answer per input, in input order."""
        ...


@runtime_checkable
class ImageFirstEngine(Engine, Protocol):
    """An engine whose ``prepare(image, question)`` is ``prepare_question(prepare_image(image), question)``."""

    def prepare_image(self, image: Any, *, image_grid: str | None = None, source: bytes | None = None) -> Any:
        """The image's part of the inputs, shared by every question about it; called on fetch threads.

        ``source``: the encoded bytes ``image`` was decoded from, for an engine that keys images
        by content (hashing them is far cheaper than hashing preprocessed pixels).
        """
        ...

    def prepare_question(self, image_inputs: Any, question: str) -> Any:
        """One job's inputs from the image's part and its question; called on fetch threads."""
        ...
