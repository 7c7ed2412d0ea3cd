"""The LLaVA-NeXT model behind the queue: load it once, answer batches of visual questions.

One loading path for the 7B on the hub and for a local directory (the tiny test checkpoint):
``LlavaNextProcessor`` + ``LlavaNextForConditionalGeneration`` with bitsandbytes quantization.
Importing this module loads nothing; :meth:`VQAModel.load` does, in the worker's start hook.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from transformers import (
    BitsAndBytesConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
)
from transformers.utils import is_flash_attn_2_available

from producer.errors import ModelLoadError, OutOfMemory
from producer.image_grid import FULL, effective_grid, limit_pinpoints, parse_grid
from producer.schema import GenerationSettings
from producer.settings import Settings
from worker.engine import Answer
from worker.imageprep import ImageInputs, ImagePrep, build_image_inputs, grid_pinpoints
from worker.kvcache import ReservedCache
from worker.prescale import Prescaler
from worker.prefix import PrefixGroup, group_by_prefix, prefix_batch, prefix_length, suffix_rows

logger = logging.getLogger(__name__)

# The model card's prompt, used when a checkpoint ships no chat template.
CARD_TEMPLATE = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions. "
    "USER: <image>\n{question} ASSISTANT:"
)


@dataclass(frozen=True)
class ModelInputs:
    """One job preprocessed for the model (prompt tokens and image tiles), ready to batch.

    Built by :meth:`VQAModel.prepare` on a fetch thread, so the model thread only pads and
    stacks. ``num_tokens`` (prompt length, image tokens included) is what padding costs.
    """

    input_ids: torch.Tensor  # (num_tokens,)
    pixel_values: torch.Tensor  # (tiles, 3, side, side)
    image_size: torch.Tensor  # (2,): original height, width
    # Content hash of the pixels when prefix sharing is on (worker/prefix.py), else None.
    image_key: str | None = None
    # The anyres grid it was preprocessed for (the job's image_grid within VQA_IMAGE_GRID) and
    # its pinpoints: the model must unpad its image features from the same ones.
    image_grid: str = FULL
    pinpoints: tuple[tuple[int, int], ...] = ()

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])


# Left padding shifts a prompt right by however much its batch companions need, and attention
# kernels reduce over keys in vector-width chunks counted from the start of the row: a shift
# changes the rounding, and a last-bit change can flip a near-tied greedy token (more so in
# nf4, whose CPU kernel rounds activations to bf16, measured: 1 row in 100 differed). Padding
# every batch, a batch of one included, to a multiple of 16 keeps every shift a multiple of
# the vector width: on CPU the prompt pass is then bit-identical whatever the companions (for
# prompts under the kernels' 512-key tiles). Costs under 16 tokens a row.
PAD_TO_MULTIPLE_OF = 16


class VQAModel:
    """A loaded processor + model pair that turns (image, question) lists into answers: the Hugging Face engine.

    Implements :class:`worker.engine.ImageFirstEngine`. Build it with :meth:`load`. :meth:`generate` runs one batched ``model.generate`` call;
    with greedy decoding each answer is the one that job would get alone, up to floating-point
    near-ties (kernels round differently for different batch shapes; see the tests).
    """

    def __init__(
        self,
        *,
        name: str,
        processor: LlavaNextProcessor,
        model: LlavaNextForConditionalGeneration,
        quantization: str,
        device: str,
        dtype: torch.dtype,
        share_image_prefix: bool = False,
        image_grid: str = FULL,
        checkpoint_pinpoints: Sequence[Sequence[int]] | None = None,
    ) -> None:
        self.name = name
        self.processor = processor
        self.model = model
        self.quantization = quantization
        self.device = device
        self.dtype = dtype
        self.share_image_prefix = share_image_prefix
        # The worker's VQA_IMAGE_GRID: a job may ask for less, never more (producer/image_grid.py).
        self.image_grid = image_grid
        # The checkpoint's own pinpoints, before any limit: each job's grid is cut from these.
        self._checkpoint_pinpoints = [list(point) for point in (checkpoint_pinpoints or model.config.image_grid_pinpoints)]
        self._grid_pinpoints: dict[str, tuple[tuple[int, int], ...]] = {}
        # The last shared batch's last image prefix, per layer (keys, values): a batch boundary
        # that splits an image's questions costs no second prefill of it (model thread only).
        self._carried: dict[tuple[Any, ...], list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._carry_in: dict[tuple[Any, ...], list[tuple[torch.Tensor, torch.Tensor]]] = {}
        # Fast tokenizers must not be used from two threads at once: each thread gets a copy.
        self._local = threading.local()
        # Prompt tokens the model was given vs. what padding made it compute (model thread only).
        self.real_tokens = 0
        self.padded_tokens = 0
        # Prompt tokens the language model actually ran over: a shared image prefix counts once.
        self.computed_prompt_tokens = 0

    @classmethod
    def load(cls, settings: Settings) -> VQAModel:
        """Load ``settings.model`` (hub id or local directory); raise :class:`ModelLoadError` on failure."""
        device = resolve_device(settings.device)
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ModelLoadError(f"device {settings.device!r} requested but CUDA is not available")
        dtype = _compute_dtype(device)
        attn = _attn_implementation(settings.attn_implementation, device)
        try:
            processor = LlavaNextProcessor.from_pretrained(settings.model)
            model = LlavaNextForConditionalGeneration.from_pretrained(
                settings.model,
                quantization_config=_quantization_config(settings.quantization, dtype),
                dtype=dtype,
                attn_implementation=attn,
                device_map={"": device},
            )
        except Exception as exc:  # anything from the hub, safetensors, bitsandbytes or CUDA
            raise ModelLoadError(f"cannot load model {settings.model!r}: {exc}") from exc
        model.eval()
        _prepare_tokenizer(processor)
        checkpoint_pinpoints = [list(point) for point in model.config.image_grid_pinpoints]
        apply_image_grid(processor, model, settings.image_grid)
        return cls(
            name=settings.model,
            processor=processor,
            model=model,
            quantization=settings.quantization,
            device=device,
            dtype=dtype,
            share_image_prefix=settings.share_image_prefix,
            image_grid=settings.image_grid,
            checkpoint_pinpoints=checkpoint_pinpoints,
        )

    def build_prompt(self, question: str) -> str:
        """The full prompt for one question: the checkpoint's chat template, else the card's."""
        # A literal image token in user text would count as a second image placeholder and make
        # the whole batch fail (tokens and image features no longer match).
        question = question.replace(self.processor.image_token, "")
        if getattr(self.processor, "chat_template", None):
            conversation = [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
            ]
            return self.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        return CARD_TEMPLATE.format(question=question)

    def generate(
        self,
        images: list[Image.Image],
        questions: list[str],
        generation: GenerationSettings,
    ) -> list[str]:
        """Answer ``questions[i]`` about ``images[i]`` in one batched call; answers in input order."""
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} questions")
        if not images:
            return []
        return self.generate_prepared([self.prepare(image, q) for image, q in zip(images, questions, strict=True)], generation)

    def prepare(self, image: Image.Image, question: str, *, image_grid: str | None = None) -> ModelInputs:
        """Preprocess one job (thread-safe; the worker runs it on the fetch pool, off the model thread).

        ``image_grid`` is the job's own request (``full`` or ``RxC``; None: the worker's
        ``VQA_IMAGE_GRID``); the job gets at most the worker's grid.
        """
        return self.prepare_question(self.prepare_image(image, image_grid=image_grid), question)

    def prepare_image(self, image: Image.Image, *, image_grid: str | None = None, source: bytes | None = None) -> ImageInputs:
        """The image's part of a job's inputs (tiles, placeholder count), the same for every question about it at one grid.

        ``source``: the encoded bytes ``image`` was decoded from (the worker's fetch passes
        them); when they are smaller than the tiles, the image's key for prefix sharing is their
        hash rather than the tiles' (worker/prefix.py ``image_key``).
        """
        grid = effective_grid(image_grid, self.image_grid)
        # This thread's own copy: the tiles and the <image> token count follow the job's grid
        # without touching what other fetch threads (or the model thread) see.
        return build_image_inputs(self._processor(), image, grid=grid, pinpoints=self.grid_pinpoints(grid),
                                  keyed=self.share_image_prefix, source=source)

    def image_prep(self) -> ImagePrep:
        """What a preprocessing process needs to prepare images as :meth:`prepare_image` does (worker/preprocess_pool.py)."""
        return ImagePrep(
            processor=self.processor, checkpoint_pinpoints=tuple((int(h), int(w)) for h, w in self._checkpoint_pinpoints),
            side=self.model.config.vision_config.image_size, image_grid=self.image_grid, keyed=self.share_image_prefix,
        )

    def prepare_question(self, image: ImageInputs, question: str) -> ModelInputs:
        """One job's inputs from its image's part: what ``processor(images, text)`` gives, the tiles not copied."""
        processor = self._processor()
        token = processor.image_token
        prompt = self.build_prompt(question).replace(token, token * image.image_tokens)
        return ModelInputs(
            input_ids=processor.tokenizer(prompt, return_tensors="pt")["input_ids"][0],
            pixel_values=image.pixel_values,
            image_size=image.image_size,
            image_key=image.image_key,
            image_grid=image.image_grid,
            pinpoints=image.pinpoints,
        )

    def _processor(self) -> LlavaNextProcessor:
        processor = getattr(self._local, "processor", None)
        if processor is None:
            processor = self._local.processor = copy.deepcopy(self.processor)
        return processor

    def prescaler(self) -> Prescaler:
        """This processor's geometry for ``VQA_IMAGE_PRESCALE``: decode images no larger than it will use.

        On the worker's pinpoints (after ``VQA_IMAGE_GRID``); the fetch stage narrows it to each
        job's own ``image_grid`` (``Prescaler.for_grid``), the pinpoints ``prepare_image`` uses.
        """
        image_processor = self.processor.image_processor
        return Prescaler(
            pinpoints=tuple(tuple(point) for point in image_processor.image_grid_pinpoints),
            side=image_processor.crop_size["height"],
            patch=self.processor.patch_size,
            resample=int(image_processor.resample),
        )

    def grid_pinpoints(self, image_grid: str) -> tuple[tuple[int, int], ...]:
        """The checkpoint's pinpoints that fit ``image_grid`` (an effective grid: ``full`` or ``RxC``)."""
        found = self._grid_pinpoints.get(image_grid)
        if found is None:
            found = self._grid_pinpoints[image_grid] = grid_pinpoints(self._checkpoint_pinpoints, self.model.config.vision_config.image_size, image_grid)
        return found

    def cost(self, inputs: ModelInputs) -> int:
        """Prompt tokens, image tokens included: what the job adds to a padded batch."""
        return inputs.num_tokens

    def generate_prepared(self, items: list[ModelInputs], generation: GenerationSettings) -> list[str]:
        """Answer prepared jobs in one batched call; the answers' text in input order."""
        return [answer.text for answer in self.generate_batch(items, generation)]

    def generate_batch(self, items: Sequence[ModelInputs], generation: GenerationSettings) -> list[Answer]:
        """The engine's batched call (worker/engine.py): one Answer per prepared job, in input order.

        With prefix sharing on, jobs of the batch about one image continue from one prefill of
        that image (worker/prefix.py); the others run as one padded batch.
        """
        if not items:
            return []
        kwargs = _generate_kwargs(generation, self.processor.tokenizer)
        rows: dict[int, torch.Tensor] = {}
        # What the last call carried is offered to this one only: at most one image prefix is
        # held between batches.
        self._carry_in, self._carried = self._carried, {}
        try:
            with torch.inference_mode():
                # The worker batches jobs of one grid together; a mixed list (a direct caller)
                # runs one grid at a time, as the config holds one list of pinpoints.
                for pinpoints, indices in _by_pinpoints(items).items():
                    self._use_pinpoints(pinpoints)
                    rows.update(self._generate_rows(items, indices, kwargs))
        except BaseException as exc:
            self._carried = {}  # the batch will be split or retried: nothing of it is held on to
            # torch.OutOfMemoryError (= torch.cuda.OutOfMemoryError) is a RuntimeError
            if not (isinstance(exc, RuntimeError) and _is_out_of_memory(exc)):
                raise
            _release_cached_memory()
            raise OutOfMemory(f"out of memory generating a batch of {len(items)}: {exc}") from exc
        finally:
            self._carry_in = {}
        new_tokens = [rows[i] for i in range(len(items))]
        texts = self.processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        image_token = self.model.config.image_token_id
        eos = self.processor.tokenizer.eos_token_id
        return [
            Answer(
                text=text.strip(),
                prompt_tokens=item.num_tokens,
                image_tokens=int((item.input_ids == image_token).sum()),
                generated_tokens=_generated_length(row, eos),
            )
            for item, text, row in zip(items, texts, new_tokens, strict=True)
        ]

    def _use_pinpoints(self, pinpoints: tuple[tuple[int, int], ...]) -> None:
        # The model unpads image features from its config's pinpoints (LlavaNext's
        # pack_image_features and image_size_to_num_patches): they must be the ones the batch's
        # tokens were counted with. Only the model thread runs the model, so setting them here
        # is seen by nothing else.
        pinpoints = pinpoints or self.grid_pinpoints(effective_grid(None, self.image_grid))
        self.model.config.image_grid_pinpoints = [list(point) for point in pinpoints]

    def _generate_rows(self, items: Sequence[ModelInputs], indices: list[int], kwargs: dict[str, Any]) -> dict[int, torch.Tensor]:
        """Each of ``items[indices]``'s new tokens, by index; jobs about one image share its prefill when sharing is on."""
        groups: list[PrefixGroup] = []
        alone = list(indices)
        if self.share_image_prefix:
            keys = [self._prefix_key(items[i]) for i in indices]
            found, unkeyed = group_by_prefix(keys)
            # Only worth two model calls when some image has 2+ questions, or its prefix was
            # carried from the last batch; then every keyed job joins the shared call (a single
            # question is a group of one), so the batch still runs as one generate.
            carried = {key[:2] for key in self._carry_in}
            if any(len(group.indices) > 1 for group in found) or any(key in carried for key in keys if key is not None):
                groups = [PrefixGroup(tuple(indices[i] for i in group.indices), group.prefix_len) for group in found]
                alone = [indices[i] for i in unkeyed]
        rows: dict[int, torch.Tensor] = {}
        if alone:
            rows.update(zip(alone, self._generate_padded([items[i] for i in alone], kwargs), strict=True))
        if groups:
            rows.update(self._generate_shared(items, groups, kwargs))
        return rows

    def _prefix_key(self, item: ModelInputs) -> tuple[str, tuple[int, ...]] | None:
        if item.image_key is None:
            return None
        length = prefix_length(item.input_ids, self.model.config.image_token_id)
        if not length or length >= item.num_tokens:
            return None  # nothing to share, or no question after the image to continue with
        return item.image_key, tuple(item.input_ids[:length].tolist())

    def _generate_padded(self, items: Sequence[ModelInputs], kwargs: dict[str, Any]) -> list[torch.Tensor]:
        """One padded batch through generate; each row's new tokens."""
        inputs: dict[str, Any] = {name: tensor.to(self.model.device) for name, tensor in self._collate(items).items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        inputs["cache"] = self._new_cache(reserve=kwargs["max_new_tokens"])
        self.computed_prompt_tokens += int(inputs["input_ids"].numel())
        output = self._generate(inputs, kwargs)
        # With left padding every row's prompt ends at the same column: the rest is the answer.
        return list(output[:, inputs["input_ids"].shape[1] :].cpu())

    def _generate_shared(self, items: Sequence[ModelInputs], groups: list[PrefixGroup], kwargs: dict[str, Any]) -> dict[int, torch.Tensor]:
        """Prefill each group's image prefix once (one forward for all), then every question from its row of that cache.

        A prefix carried from the previous batch (an image whose questions the batch boundary
        split) is not computed again; this batch's last prefix is carried to the next.
        """
        device = self.model.device
        pad = self.processor.tokenizer.pad_token_id
        firsts = [items[group.indices[0]] for group in groups]
        keys = [self._carry_key(item, group.prefix_len) for item, group in zip(firsts, groups, strict=True)]
        prefixes = [item.input_ids[: group.prefix_len] for item, group in zip(firsts, groups, strict=True)]
        # The layout every question's cache row takes: its prefix right-aligned in the widest's columns.
        prefix_ids, prefix_mask, _ = prefix_batch(prefixes, pad)
        members = [(row, index, group.prefix_len) for row, group in enumerate(groups) for index in group.indices]
        input_ids, attention_mask = suffix_rows(prefix_ids, prefix_mask, [(row, items[index].input_ids[length:]) for row, index, length in members], pad)
        states = {row: self._carry_in[key] for row, key in enumerate(keys) if key in self._carry_in}
        fresh = [row for row in range(len(groups)) if row not in states]
        if fresh:
            states.update(self._prefill([firsts[row] for row in fresh], [prefixes[row] for row in fresh], fresh))
        # Kept apart from this batch's cache (a copy, so the rest of it can be freed): the next
        # batch may hold more questions about this batch's last image.
        self._carried = {keys[-1]: [(k.clone(), v.clone()) for k, v in states[len(groups) - 1]]}
        cache = ReservedCache.from_rows(
            self.model.config.get_text_config(), [states[row] for row, _, _ in members], width=prefix_ids.shape[1],
            reserve=input_ids.shape[1] - prefix_ids.shape[1] + kwargs["max_new_tokens"],  # the suffixes' columns and the answers
        )
        del states  # views of the prefill's cache: free it before generate allocates its own
        self.computed_prompt_tokens += len(members) * (input_ids.shape[1] - prefix_ids.shape[1])
        inputs = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device), "cache": cache}
        # generate feeds only the columns past the cache; no image tokens are left there, so no pixels.
        output = self._generate(inputs, kwargs)
        return {index: row for (_, index, _), row in zip(members, output[:, input_ids.shape[1] :].cpu(), strict=True)}

    def _prefill(self, firsts: list[ModelInputs], prefixes: list[torch.Tensor], rows: list[int]) -> dict[int, list[tuple[torch.Tensor, torch.Tensor]]]:
        """One forward over ``prefixes`` (left-padded together); each one's keys and values per layer, by ``rows``."""
        device = self.model.device
        prefix_ids, prefix_mask, position_ids = prefix_batch(prefixes, self.processor.tokenizer.pad_token_id)
        cache = self._new_cache(reserve=0)
        self.model(
            input_ids=prefix_ids.to(device),
            attention_mask=prefix_mask.to(device),
            position_ids=position_ids.to(device),
            pixel_values=_stack_tiles([item.pixel_values for item in firsts]).to(device, self.dtype),
            image_sizes=torch.stack([item.image_size for item in firsts]).to(device),
            cache=cache,
            use_cache=True,
            logits_to_keep=1,  # the prefixes' logits are never read
        )
        self.computed_prompt_tokens += int(prefix_ids.numel())
        width = prefix_ids.shape[1]
        return {
            row: [(layer.keys[position, :, width - len(prefix) :], layer.values[position, :, width - len(prefix) :]) for layer in cache.layers]
            for position, (row, prefix) in enumerate(zip(rows, prefixes, strict=True))
        }

    def _carry_key(self, item: ModelInputs, prefix_len: int) -> tuple[Any, ...]:
        # What determines a prefix's keys and values: its pixels, its tokens, and the pinpoints
        # the model unpads the image features with.
        return item.image_key, tuple(item.input_ids[:prefix_len].tolist()), item.pinpoints

    def _new_cache(self, *, reserve: int) -> ReservedCache:
        return ReservedCache(self.model.config.get_text_config(), reserve=reserve)

    def _collate(self, items: Sequence[ModelInputs]) -> dict[str, torch.Tensor]:
        """What the processor gives for a batch: prompts left-padded to a multiple of 16, tiles zero-padded."""
        longest = _round_up(max(item.num_tokens for item in items), PAD_TO_MULTIPLE_OF)
        input_ids = torch.full((len(items), longest), self.processor.tokenizer.pad_token_id, dtype=items[0].input_ids.dtype)
        attention_mask = torch.zeros((len(items), longest), dtype=torch.long)
        for row, item in enumerate(items):
            input_ids[row, longest - item.num_tokens :] = item.input_ids
            attention_mask[row, longest - item.num_tokens :] = 1
        self.real_tokens += sum(item.num_tokens for item in items)
        self.padded_tokens += len(items) * longest
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "pixel_values": _stack_tiles([item.pixel_values for item in items]),
            "image_sizes": torch.stack([item.image_size for item in items]),
        }

    def _generate(self, inputs: Any, kwargs: dict[str, Any]) -> torch.Tensor:
        # The one place the model runs.
        return self.model.generate(**inputs, **kwargs)

    def count_4bit_linears(self) -> int:
        """How many layers are bitsandbytes ``Linear4bit`` (0 unless loaded with nf4)."""
        import bitsandbytes as bnb  # only needed here; a CPU/none deployment may lack its kernels

        return sum(isinstance(module, bnb.nn.Linear4bit) for module in self.model.modules())


def apply_image_grid(processor: LlavaNextProcessor, model: LlavaNextForConditionalGeneration, image_grid: str) -> None:
    """Limit the anyres grid (``VQA_IMAGE_GRID``) on the processor and the model config together.

    The processor counts an image's tokens from its pinpoints and the model unpads the image
    features from the config's: both must be the same list or the batch's tokens and features
    no longer match.
    """
    side = model.config.vision_config.image_size
    pinpoints = limit_pinpoints(model.config.image_grid_pinpoints, side, parse_grid(image_grid))
    processor.image_processor.image_grid_pinpoints = pinpoints
    model.config.image_grid_pinpoints = [list(point) for point in pinpoints]


def _stack_tiles(tiles: Sequence[torch.Tensor]) -> torch.Tensor:
    """Images' tiles in one tensor, zero-padded to the most tiles (the model reads each image's count from its size)."""
    most = max(int(t.shape[0]) for t in tiles)
    stacked = tiles[0].new_zeros((len(tiles), most, *tiles[0].shape[1:]))
    for row, t in enumerate(tiles):
        stacked[row, : t.shape[0]] = t
    return stacked


def _by_pinpoints(items: Sequence[ModelInputs]) -> dict[tuple[tuple[int, int], ...], list[int]]:
    """Indices of ``items`` by the pinpoints they were preprocessed with, in first-seen order."""
    groups: dict[tuple[tuple[int, int], ...], list[int]] = {}
    for index, item in enumerate(items):
        groups.setdefault(item.pinpoints, []).append(index)
    return groups


def resolve_device(device: str) -> str:
    """``auto`` means the first GPU when there is one, else the CPU."""
    if device == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        return "cuda:0"
    return device


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _compute_dtype(device: str) -> torch.dtype:
    if device == "cpu":
        # Half precision on CPU is slow and poorly supported.
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _attn_implementation(requested: str, device: str) -> str:
    if requested == "flash_attention_2" and (device == "cpu" or not is_flash_attn_2_available()):
        logger.warning("flash_attention_2 requested but not available on %s; falling back to sdpa", device)
        return "sdpa"
    return requested


def _quantization_config(quantization: str, dtype: torch.dtype) -> BitsAndBytesConfig | None:
    if quantization == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def _prepare_tokenizer(processor: LlavaNextProcessor) -> None:
    tokenizer = processor.tokenizer
    # Left padding: every prompt then ends where generation starts, in the same column.
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        # Padded positions are masked out, so which token fills them does not matter.
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token


def _generate_kwargs(generation: GenerationSettings, tokenizer: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "max_new_tokens": generation.max_new_tokens,
        "min_new_tokens": generation.min_new_tokens,
        "do_sample": generation.do_sample,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if generation.do_sample:
        kwargs["temperature"] = generation.temperature
        kwargs["top_p"] = generation.top_p
        # The job's settings are the whole sampling spec: no hidden top-k=50 from transformers' defaults.
        kwargs["top_k"] = 0
    return kwargs


def _generated_length(row: torch.Tensor, eos_token_id: int | None) -> int:
    """Tokens the model generated for one row: up to and including its first end-of-sequence (the rest is padding)."""
    if eos_token_id is not None:
        ends = (row == eos_token_id).nonzero()
        if len(ends):
            return int(ends[0, 0]) + 1
    return int(row.shape[0])


def _is_out_of_memory(exc: RuntimeError) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    # The CPU allocator and some CUDA/MPS paths raise a plain RuntimeError.
    message = str(exc).lower()
    return any(text in message for text in ("out of memory", "can't allocate memory", "cannot allocate memory"))


def _release_cached_memory() -> None:
    # Give the failed batch's blocks back so a smaller retry can fit.
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
