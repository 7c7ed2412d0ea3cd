"""A real LLaVA-NeXT checkpoint with random weights, small enough to build and run anywhere.

Tests and benchmarks load it through exactly the path the 7B takes (``VQAModel.load`` on a
directory): the same classes, anyres tiling, processor, chat template and bitsandbytes
quantization. Only the sizes and the weights are made up, so answers are word salad.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    PreTrainedTokenizerFast,
)

SYSTEM_PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)

# Renders the model card's template: "<system> USER: <image>\n<question> ASSISTANT:".
# Images come before the text whatever their order in the message, as in the llava-hf templates.
CHAT_TEMPLATE = (
    "{%- set system = '" + SYSTEM_PROMPT.replace("'", "\\'") + "' -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}{%- set system = messages[0]['content'] -%}"
    "{%- else -%}{%- set system = messages[0]['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join(' ') -%}{%- endif -%}"
    "{%- set messages = messages[1:] -%}"
    "{%- endif -%}"
    "{{ system }}"
    "{%- for message in messages -%}"
    "{{ ' ' + message['role'].upper() + ': ' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}"
    "{%- for item in message['content'] | selectattr('type', 'equalto', 'image') -%}{{ '<image>\\n' }}{%- endfor -%}"
    "{%- for item in message['content'] | selectattr('type', 'equalto', 'text') -%}{{ item['text'] }}{%- endfor -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{{ '</s>' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ ' ASSISTANT:' }}{%- endif -%}"
)

# Enough varied English for BPE to reach the vocabulary size below, so generated ids decode to
# word pieces. Changing this text changes every tiny checkpoint: treat it as part of the format.
_CORPUS = """\
A chat between a curious human and an artificial intelligence assistant.
The assistant gives helpful, detailed, and polite answers to the human's questions.
USER: What is shown in this image? ASSISTANT: The image shows a red bus parked on a busy city street.
USER: How many people are in the picture? ASSISTANT: There are three people standing near the window.
USER: What color is the cat? ASSISTANT: The cat is black with white paws and green eyes.
USER: Is it raining? ASSISTANT: No, the sky is clear and the sun is shining over the hills.
A small brown dog sleeps on a blue blanket beside the fireplace in a quiet living room.
Two children play football in the park while their parents watch from a wooden bench.
The kitchen table holds a bowl of oranges, a loaf of bread, a knife and a glass of milk.
An old lighthouse stands on the rocky coast, and waves crash against the stones below.
A woman in a yellow raincoat rides a bicycle across the bridge during the morning rush.
The chart compares monthly sales for four products; the highest bar belongs to March.
A plate of spaghetti with tomato sauce, basil leaves and grated cheese sits on the counter.
Snow covers the mountains, and a narrow trail leads through the pine forest to a cabin.
The sign says the museum opens at nine o'clock and closes at five in the afternoon.
A large airplane takes off from the runway while a truck drives along the service road.
There is a laptop, a notebook, a pen and a cup of coffee on the desk near the lamp.
The photograph was taken at night; street lights reflect on the wet pavement and cars.
Horses graze in a green field surrounded by a white fence under a cloudy gray sky.
A man holds an umbrella and waits for the train at the station with his suitcase.
The receipt lists eggs, butter, flour, sugar, apples and a bottle of olive oil.
Birds fly over the lake at sunset, and a fisherman sits quietly in a small boat.
The screen displays a map with a route from the airport to the hotel downtown.
Yes. No. Maybe. One, two, three, four, five, six, seven, eight, nine, ten, eleven, twelve.
Left, right, top, bottom, center, corner, front, behind, above, under, inside, outside.
Red, orange, yellow, green, blue, purple, pink, brown, black, white, gray, silver, gold.
Circle, square, triangle, rectangle, line, arrow, letter, number, word, sentence, label.
Happy, sad, calm, busy, empty, crowded, bright, dark, old, new, large, tiny, tall, short.
The teacher writes an equation on the blackboard and the students copy it carefully.
Vegetables at the market include carrots, potatoes, onions, peppers and fresh lettuce.
A giraffe stretches its long neck to reach the leaves at the top of an acacia tree.
The soccer player kicks the ball toward the goal as the goalkeeper jumps to the left.
Please describe the scene, count the objects, read the text and explain what happens next.
Clearly, probably, certainly, perhaps, however, therefore, because, although, whenever.
Elephants, zebras, lions, monkeys, penguins, dolphins, turtles, rabbits, squirrels, owls.
Kitchen, bedroom, bathroom, garden, garage, office, school, hospital, restaurant, library.
Walking, running, jumping, swimming, reading, writing, cooking, eating, driving, smiling.
Mountains, rivers, oceans, deserts, islands, valleys, beaches, forests, glaciers, volcanoes.
"""

_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2 as in the Llama/Vicuna vocabulary
_ADDED_TOKENS = ["<image>", "<pad>"]  # appended after the trained vocabulary, as in llava-hf


@dataclass(frozen=True)
class _Shape:
    vocab_size: int
    vision_hidden: int
    vision_intermediate: int
    vision_layers: int
    vision_heads: int
    image_size: int
    patch_size: int
    text_hidden: int
    text_intermediate: int
    text_layers: int
    text_heads: int
    init_std: float


# Every linear dimension is a multiple of 64: bitsandbytes quantizes nf4 in blocks of 64.
# init_std is larger than the usual 0.02 so logits are spread out and the answer depends on
# the image: near-ties between random logits would make greedy decoding fragile.
_SHAPES: dict[str, _Shape] = {
    "tiny": _Shape(
        vocab_size=1024,
        vision_hidden=64,
        vision_intermediate=128,
        vision_layers=2,
        vision_heads=2,
        image_size=32,
        patch_size=8,
        text_hidden=128,
        text_intermediate=256,
        text_layers=2,
        text_heads=4,
        init_std=0.1,
    ),
    "bench": _Shape(
        vocab_size=1024,
        vision_hidden=256,
        vision_intermediate=1024,
        vision_layers=4,
        vision_heads=4,
        image_size=112,
        patch_size=14,
        text_hidden=512,
        text_intermediate=1536,
        text_layers=4,
        text_heads=8,
        init_std=0.05,
    ),
}


def build_tiny_model(path: str | Path, *, size: Literal["tiny", "bench"] = "tiny", seed: int = 0) -> Path:
    """Write a random-weight LLaVA-NeXT checkpoint (model, processor, tokenizer) to ``path``.

    The same ``size`` and ``seed`` always give the same weights and tokenizer.
    """
    shape = _SHAPES[size]
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = _build_tokenizer(shape.vocab_size)
    processor = LlavaNextProcessor(
        image_processor=_build_image_processor(shape),
        tokenizer=tokenizer,
        patch_size=shape.patch_size,
        vision_feature_select_strategy="default",
        # CLIP prepends a CLS token; the processor must count it as the model does.
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    model = _build_model(shape, tokenizer, seed)

    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def _build_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    trained_size = vocab_size - len(_ADDED_TOKENS)
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    # Metaspace like Llama's SentencePiece: "▁" marks word starts, so pieces decode with spaces.
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    bpe.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=trained_size, special_tokens=_SPECIAL_TOKENS, show_progress=False)
    bpe.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    if bpe.get_vocab_size() != trained_size:
        raise RuntimeError(f"tokenizer corpus too small: {bpe.get_vocab_size()} of {trained_size} tokens")
    bpe.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
        model_max_length=4096,
    )
    if len(tokenizer) != vocab_size:
        raise RuntimeError(f"tokenizer has {len(tokenizer)} tokens, expected {vocab_size}")
    return tokenizer


def _build_image_processor(shape: _Shape) -> LlavaNextImageProcessorPil:
    side = shape.image_size
    return LlavaNextImageProcessorPil(
        size={"shortest_edge": side},
        crop_size={"height": side, "width": side},
        image_grid_pinpoints=_pinpoints(side),
    )


def _pinpoints(side: int) -> list[list[int]]:
    # The 7B's pinpoints (336 * [1x2, 2x1, 2x2, 3x1, 1x3]) scaled to our tile size.
    return [[side, 2 * side], [2 * side, side], [2 * side, 2 * side], [3 * side, side], [side, 3 * side]]


def _build_model(shape: _Shape, tokenizer: PreTrainedTokenizerFast, seed: int) -> LlavaNextForConditionalGeneration:
    side = shape.image_size
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=shape.vision_hidden,
            intermediate_size=shape.vision_intermediate,
            num_hidden_layers=shape.vision_layers,
            num_attention_heads=shape.vision_heads,
            image_size=side,
            patch_size=shape.patch_size,
            projection_dim=shape.vision_hidden,
        ),
        text_config=LlamaConfig(
            vocab_size=shape.vocab_size,
            hidden_size=shape.text_hidden,
            intermediate_size=shape.text_intermediate,
            num_hidden_layers=shape.text_layers,
            num_attention_heads=shape.text_heads,
            num_key_value_heads=shape.text_heads,
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
            initializer_range=shape.init_std,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=_pinpoints(side),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )
    # Fork the RNG so building a model does not reseed the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaNextForConditionalGeneration(config)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval()
