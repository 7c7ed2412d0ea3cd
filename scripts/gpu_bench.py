"""GPU figures for the full llava-v1.6-vicuna-7b architecture with random weights.

    .venv/bin/python scripts/gpu_bench.py                      # on a GPU host: 7B, every variant
    .venv/bin/python scripts/gpu_bench.py --config small       # any machine, seconds: tests the script

Builds ``LlavaNextForConditionalGeneration`` from a config committed in the repo
(bench/llava-v1.6-vicuna-7b-config.json) directly on the device in half precision, so no
checkpoint is downloaded; ``nf4`` replaces every linear layer but ``lm_head`` with a
bitsandbytes ``Linear4bit``, as ``from_pretrained(load_in_4bit=True)`` does. For each variant
(dtype x attention kernel) it measures images/s, prompt tokens/s (prefill) and generated
tokens/s (decode) at batch sizes 1, 2, 4, ... until out of memory (with the worker's KV cache,
worker/kvcache.py, and at ``--share-batch`` also with the ``DynamicCache`` generate makes itself), plus the model card's
one-image-at-a-time loop as the baseline, all in one run; ``--image-grid full,2x2,2x1,1x1``
repeats each variant's sweep at each image-detail setting (fewer tiles, fewer image tokens); and per variant, at the
first grid, ``--questions-per-image`` questions about each of ``--share-batch`` pictures run through the worker's own
engine (``worker.model.VQAModel.generate_batch``) with ``VQA_SHARE_IMAGE_PREFIX`` off and on: questions/s both ways and
how many greedy answers agree. Every answer is forced to the same length (min_new_tokens = max_new_tokens) so random
weights cannot stop early.

The prompt is the model card's; without the Vicuna tokenizer its text part is stood in for by
``--text-tokens`` random ids (about what the card's prompt tokenizes to), and the image part
is exactly the anyres token count the real processor computes for the picture.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from producer.image_grid import limit_pinpoints, parse_grid

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {"7b": ROOT / "bench/llava-v1.6-vicuna-7b-config.json", "small": ROOT / "bench/llava-next-small-config.json"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="7b", help="7b, small, or a config.json path")
    parser.add_argument("--device", default="auto", help="auto (cuda if present, else cpu), cpu, cuda, cuda:N")
    parser.add_argument("--variants", help="comma-separated dtype:attention pairs, e.g. fp16:sdpa,nf4:sdpa "
                        "(default: half precision and nf4, each with sdpa and, where installed, flash_attention_2)")
    parser.add_argument("--batch-sizes", default="1,2,4,8,16,32", help="tried in order until one runs out of memory")
    parser.add_argument("--max-new-tokens", type=int, default=100, help="forced answer length (the card uses 100)")
    parser.add_argument("--text-tokens", type=int, default=50, help="prompt text tokens around the image tokens")
    parser.add_argument("--image-size", default="640x480", help="WxH of the picture (anyres grid and token count follow)")
    parser.add_argument("--repeats", type=int, default=2, help="timed batches per point (after one warm-up)")
    parser.add_argument("--baseline-images", type=int, default=8, help="images through the card's one-at-a-time loop")
    parser.add_argument("--image-grid", default="full", help="comma-separated detail settings, e.g. full,2x2,2x1,1x1 "
                        "(VQA_IMAGE_GRID / a job's image_grid): each variant is swept at each")
    parser.add_argument("--questions-per-image", default="3", help="comma-separated counts for the shared-prefix rows, e.g. 1,3,5 "
                        "(empty: none)")
    parser.add_argument("--share-batch", type=int, default=8, help="the worker's batch size for the shared-prefix rows "
                        "(VQA_MAX_BATCH_SIZE); as many pictures as that, each asked every count's questions")
    parser.add_argument("--out", type=Path, default=ROOT / "docs/benchmarks/gpu", help="gpu_results.{json,md} go here")
    args = parser.parse_args(argv)

    device = _device(args.device)
    config_path = Path(CONFIGS.get(args.config, args.config))
    width, height = (int(v) for v in args.image_size.lower().split("x"))
    variants = _variants(args.variants, device)
    result: dict[str, Any] = {"meta": _meta(args, device, config_path, argv), "variants": []}
    image = _picture(width, height)
    baseline_done = False
    for dtype_name, attn in variants:
        say(f"variant {dtype_name} + {attn}")
        entry: dict[str, Any] = {"dtype": dtype_name, "attention": attn}
        try:
            model, processor, build_s = build(config_path, device=device, dtype_name=dtype_name, attn=attn)
        except (ImportError, RuntimeError, ValueError) as exc:
            entry["error"] = f"{type(exc).__name__}: {exc}"[:500]
            result["variants"].append(entry)
            continue
        entry.update(build_s=round(build_s, 1), weights_gib=round(_weights_bytes(model) / 2**30, 2))
        checkpoint = [list(point) for point in model.config.image_grid_pinpoints]
        for grid in args.image_grid.split(","):
            at_grid: dict[str, Any] = {**entry, "image_grid": grid}
            try:
                # As the worker does (worker/model.py): the processor and the model config take the same pinpoints.
                pinpoints = limit_pinpoints(checkpoint, model.config.vision_config.image_size, parse_grid(grid))
                model.config.image_grid_pinpoints = processor.image_grid_pinpoints = pinpoints
                prompt = _prompt(model, processor, image, text_tokens=args.text_tokens)
                at_grid.update(prompt_tokens=prompt["tokens"], image_tiles=prompt["tiles"],
                               image_tokens=image_token_count(model.config, image.height, image.width))
                if not baseline_done and not dtype_name.startswith("nf4"):
                    # The model card: fp16, one image at a time, preprocessing inside the loop, its own full grid.
                    result["baseline"] = {"dtype": dtype_name, "attention": attn, "image_grid": grid,
                                          **card_loop(model, processor, image, prompt, images=args.baseline_images, new_tokens=args.max_new_tokens)}
                    baseline_done = True
                at_grid["batches"] = sweep(model, prompt, batch_sizes=[int(b) for b in args.batch_sizes.split(",")],
                                           new_tokens=args.max_new_tokens, repeats=args.repeats, compare_cache_at=args.share_batch)
                if grid == args.image_grid.split(",")[0] and args.questions_per_image:
                    at_grid["shared_prefix"] = shared_prefix(
                        model, processor, [int(n) for n in args.questions_per_image.split(",")],
                        quantization="nf4" if dtype_name == "nf4" else "none", width=width, height=height,
                        batch=args.share_batch, text_tokens=args.text_tokens, new_tokens=args.max_new_tokens, rounds=args.repeats)
            except Exception as exc:  # noqa: BLE001 - one variant's failure (a kernel missing on this card) must not cost the others
                at_grid["error"] = f"{type(exc).__name__}: {exc}"[:500]
                say(f"  failed: {at_grid['error']}")
            result["variants"].append(at_grid)
            _write(result, args.out)  # after every point: a run cut short still leaves what it measured
        del model
        _free(device)
    _write(result, args.out)
    print(markdown(result))
    print(f"wrote {args.out}/gpu_results.json and gpu_results.md")
    return 0


START = time.monotonic()


def _write(result: dict[str, Any], out: Path) -> None:
    result["meta"]["duration_s"] = round(time.monotonic() - START, 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_results.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "gpu_results.md").write_text(markdown(result))


def _device(requested: str) -> str:
    if requested == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    return "cuda:0" if requested == "cuda" else requested


def _half(device: str) -> str:
    if device == "cpu":
        return "fp32"  # half precision on CPU is slow and partly unsupported
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def _variants(spec: str | None, device: str) -> list[tuple[str, str]]:
    if spec:
        return [tuple(part.split(":", 1)) for part in spec.split(",")]  # type: ignore[misc]
    from transformers.utils import is_flash_attn_2_available

    kernels = ["sdpa"] + (["flash_attention_2"] if device != "cpu" and is_flash_attn_2_available() else [])
    # fp16 first: the card's own setting, also the baseline's.
    half = "fp16" if device != "cpu" else "fp32"
    dtypes = [half] + (["bf16"] if device != "cpu" and torch.cuda.is_bf16_supported() else []) + ["nf4"]
    return [(d, k) for d in dtypes for k in kernels]


_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def build(config_path: Path, *, device: str, dtype_name: str, attn: str) -> tuple[Any, Any, float]:
    """The architecture with random weights, built in place on the device; nf4 quantized layer by layer."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextImageProcessorPil

    raw = json.loads(config_path.read_text())
    raw.pop("_note", None)
    config = LlavaNextConfig.from_dict(raw)
    side = config.vision_config.image_size
    processor = LlavaNextImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side},
                                           image_grid_pinpoints=config.image_grid_pinpoints)
    compute = _DTYPES[_half(device) if dtype_name == "nf4" else dtype_name]
    start = time.monotonic()
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaNextForConditionalGeneration._from_config(config, dtype=compute, attn_implementation=attn)
    model.eval()
    if dtype_name == "nf4":
        _to_nf4(model, compute, device)
    model.generation_config.pad_token_id = config.text_config.pad_token_id or 0
    model.generation_config.eos_token_id = 2
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return model, processor, time.monotonic() - start


def _to_nf4(model: Any, compute: torch.dtype, device: str) -> None:
    import bitsandbytes as bnb

    targets = [(name, module) for name, module in model.named_modules() if isinstance(module, torch.nn.Linear) and name != "lm_head"]
    for name, linear in targets:
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        new = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None, compute_dtype=compute,
                                quant_type="nf4", device="meta")
        new.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4")
        if linear.bias is not None:
            new.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
        setattr(parent, name.rsplit(".", 1)[-1], new.to(device))  # moving a Params4bit quantizes it
    gc.collect()


def _picture(width: int, height: int, seed: int = 0) -> Image.Image:
    image = Image.new("RGB", (width, height), ((40 + 37 * seed) % 256, (120 + 91 * seed) % 256, 200))
    ImageDraw.Draw(image).rectangle([width // 4, height // 4, width // 2, height // 2], fill=(250, 200, (10 + 53 * seed) % 256))
    return image


def _prompt(model: Any, processor: Any, image: Image.Image, *, text_tokens: int) -> dict[str, Any]:
    """input_ids of the card's prompt shape: <s>, text, the image's anyres tokens, text."""
    pixels = processor([image], return_tensors="pt")
    n_image = image_token_count(model.config, image.height, image.width)
    vocab = model.config.text_config.vocab_size
    text = torch.randint(3, min(vocab, model.config.image_token_id) - 1, (text_tokens,), generator=torch.Generator().manual_seed(0))
    split = text_tokens * 3 // 4  # the system prompt and "USER:" come before the image, the question after
    ids = torch.cat([torch.tensor([1]), text[:split], torch.full((n_image,), model.config.image_token_id), text[split:]])
    return {"input_ids": ids, "pixel_values": pixels["pixel_values"][0], "image_size": pixels["image_sizes"][0],
            "tokens": int(ids.shape[0]), "tiles": int(pixels["pixel_values"].shape[1])}


def image_token_count(config: Any, height: int, width: int) -> int:
    """LlavaNextProcessor's count: base tile + unpadded anyres grid + one newline per row (CLS dropped)."""
    from transformers.image_processing_utils import select_best_resolution

    side, patch = config.vision_config.image_size, config.vision_config.patch_size
    best_h, best_w = select_best_resolution([height, width], config.image_grid_pinpoints)
    per_side = side // patch
    # Mirrors LlavaNextProcessor._get_unpadded_features (tests/test_bench_harness.py checks it).
    rows, cols = per_side * (best_h // side), per_side * (best_w // side)
    if width / height > cols / rows:
        rows -= 2 * ((rows - int(round(height * (cols / width), 7))) // 2)
    else:
        cols -= 2 * ((cols - int(round(width * (rows / height), 7))) // 2)
    return rows * cols + rows + per_side * per_side


def _inputs(prompt: dict[str, Any], batch: int, device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {
        "input_ids": prompt["input_ids"].unsqueeze(0).repeat(batch, 1).to(device),
        "attention_mask": torch.ones(batch, prompt["tokens"], dtype=torch.long, device=device),
        "pixel_values": prompt["pixel_values"].unsqueeze(0).repeat(batch, 1, 1, 1, 1).to(device, dtype),
        "image_sizes": prompt["image_size"].unsqueeze(0).repeat(batch, 1).to(device),
    }


def _timed_generate(model: Any, inputs: dict[str, torch.Tensor], new_tokens: int, *, kv_cache: str = "reserved") -> float:
    """One generate; ``kv_cache`` "reserved" is the worker's in-place cache (worker/kvcache.py), "dynamic" the one generate makes itself."""
    from worker.kvcache import ReservedCache

    device = inputs["input_ids"].device
    cache = {"cache": ReservedCache(model.config.get_text_config(), reserve=new_tokens)} if kv_cache == "reserved" else {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(**inputs, **cache, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def sweep(model: Any, prompt: dict[str, Any], *, batch_sizes: list[int], new_tokens: int, repeats: int,
          compare_cache_at: int | None = None) -> list[dict[str, Any]]:
    """Images/s, prefill tokens/s and decode tokens/s per batch size, until out of memory.

    With the worker's KV cache; at batch ``compare_cache_at`` also with Transformers' own
    ``DynamicCache`` (a copy of the whole cache per decode step), for the difference.
    """
    device = str(model.device)
    dtype = next(p.dtype for p in model.parameters() if p.dtype.is_floating_point)
    rows: list[dict[str, Any]] = []
    for batch in batch_sizes:
        say(f"  batch {batch}")
        try:
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats(device)
            inputs = _inputs(prompt, batch, device, dtype)
            _timed_generate(model, inputs, new_tokens)  # warm-up
            full = min(_timed_generate(model, inputs, new_tokens) for _ in range(repeats))
            prefill = min(_timed_generate(model, inputs, 1) for _ in range(repeats))
            peak = torch.cuda.max_memory_allocated(device) if device.startswith("cuda") else None  # the worker's cache's
            dynamic = min(_timed_generate(model, inputs, new_tokens, kv_cache="dynamic") for _ in range(repeats)) if batch == compare_cache_at else None
        except torch.OutOfMemoryError:
            rows.append({"batch_size": batch, "oom": True})
            _free(device)
            break
        decode = full - prefill  # not positive when noise made the one-token runs the slower: no decode rate then
        row = {
            "batch_size": batch,
            "ms_per_batch": round(1000 * full, 1),
            "images_per_s": round(batch / full, 3),
            "prefill_ms": round(1000 * prefill, 1),
            "prompt_tokens_per_s": round(batch * prompt["tokens"] / prefill, 1),
            "generated_tokens_per_s": round(batch * (new_tokens - 1) / decode, 1) if decode > 0 else None,
        }
        if dynamic is not None:
            row["images_per_s_dynamic_cache"] = round(batch / dynamic, 3)
        if peak is not None:
            row["peak_memory_gib"] = round(peak / 2**30, 2)
        rows.append(row)
        del inputs
    return rows


class _IdsTokenizer:
    """Bench-only stand-in for the Vicuna tokenizer the 7B shape is built without: what the worker's engine asks of one.

    An answer "decodes" to its token ids, so answers compare exactly; nothing is made up.
    """

    def __init__(self, pad_token_id: int, eos_token_id: int) -> None:
        self.pad_token_id, self.eos_token_id = pad_token_id, eos_token_id

    def batch_decode(self, rows: list[torch.Tensor], skip_special_tokens: bool = True) -> list[str]:
        return [" ".join(str(int(t)) for t in row) for row in rows]


def shared_prefix(model: Any, processor: Any, counts: list[int], *, quantization: str, width: int, height: int, batch: int,
                  text_tokens: int, new_tokens: int, rounds: int) -> list[dict[str, Any]]:
    """Per count of questions per image: questions/s through the worker's engine with prefix sharing off and on.

    ``batch`` pictures (one size, different pixels), each asked ``count`` questions (the same prompt up to
    the end of the image, a different question after it), in batches of ``batch`` formed image by image
    as the worker's batcher forms them; ``rounds`` off/on pairs, the order alternating; best round each way.
    """
    from types import SimpleNamespace

    from producer.schema import GenerationSettings
    from worker.model import ModelInputs, VQAModel
    from worker.prefix import image_key, prefix_length

    dtype = next(p.dtype for p in model.parameters() if p.dtype.is_floating_point)
    pad = model.generation_config.pad_token_id
    tokenizer = _IdsTokenizer(pad, model.generation_config.eos_token_id)
    engine = VQAModel(name="gpu_bench", processor=SimpleNamespace(tokenizer=tokenizer), model=model,  # type: ignore[arg-type]
                      quantization=quantization, device=str(model.device), dtype=dtype,
                      checkpoint_pinpoints=model.config.image_grid_pinpoints)
    pinpoints = tuple((int(h), int(w)) for h, w in model.config.image_grid_pinpoints)
    images = []
    for seed in range(batch):
        prompt = _prompt(model, processor, _picture(width, height, seed), text_tokens=text_tokens)
        ids = prompt["input_ids"]
        cut = prefix_length(ids, model.config.image_token_id)  # the prompt up to the end of the image
        images.append((ids[:cut], ids[cut:], prompt, image_key(prompt["pixel_values"], prompt["image_size"])))
    generation = GenerationSettings(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    vocab = min(model.config.text_config.vocab_size, model.config.image_token_id) - 1
    rows = []
    for count in counts:
        say(f"  shared prefix: {count} questions per image, batch {batch}")
        jobs = []
        for prefix, tail, prompt, key in images:
            for q in range(count):
                # A different question per index (the same one for every image), then the prompt's own end.
                question = torch.randint(3, vocab, (8,), generator=torch.Generator().manual_seed(1000 + q))
                jobs.append(ModelInputs(input_ids=torch.cat([prefix, question, tail]), pixel_values=prompt["pixel_values"],
                                        image_size=prompt["image_size"], image_key=key, pinpoints=pinpoints))
        batches = [jobs[start : start + batch] for start in range(0, len(jobs), batch)]
        timings: dict[bool, list[float]] = {False: [], True: []}
        answers: dict[bool, list[str]] = {}
        tokens: dict[bool, float] = {}
        for round_ in range(rounds):
            for shared in ((False, True) if round_ % 2 == 0 else (True, False)):
                engine.share_image_prefix = shared
                engine.generate_batch(batches[0], generation)  # warm-up
                before = engine.computed_prompt_tokens
                start = time.perf_counter()
                got = [answer.text for chunk in batches for answer in engine.generate_batch(chunk, generation)]
                timings[shared].append(time.perf_counter() - start)
                answers[shared] = got
                tokens[shared] = (engine.computed_prompt_tokens - before) / len(jobs)
        off, on = len(jobs) / min(timings[False]), len(jobs) / min(timings[True])
        rows.append({
            "questions_per_image": count, "images": batch, "questions": len(jobs), "batch": batch,
            "questions_per_s_without": round(off, 3), "questions_per_s_with": round(on, 3), "speedup": round(on / off, 3),
            "prompt_tokens_per_question_without": round(tokens[False], 1), "prompt_tokens_per_question_with": round(tokens[True], 1),
            "answers_agreeing": sum(a == b for a, b in zip(answers[False], answers[True], strict=True)),
        })
    return rows


def card_loop(model: Any, processor: Any, image: Image.Image, prompt: dict[str, Any], *, images: int, new_tokens: int) -> dict[str, Any]:
    """The model card's loop: per image, preprocess, move to the device, generate alone."""
    device = str(model.device)
    dtype = next(p.dtype for p in model.parameters() if p.dtype.is_floating_point)

    def one() -> None:
        pixels = processor([image], return_tensors="pt")
        single = {**prompt, "pixel_values": pixels["pixel_values"][0], "image_size": pixels["image_sizes"][0]}
        _timed_generate(model, _inputs(single, 1, device, dtype), new_tokens, kv_cache="dynamic")  # the card's plain generate

    one()  # warm-up
    start = time.perf_counter()
    for _ in range(images):
        one()
    seconds = time.perf_counter() - start
    return {"images": images, "seconds": round(seconds, 2), "images_per_s": round(images / seconds, 3),
            "generated_tokens_per_s": round(images * new_tokens / seconds, 1)}


def _weights_bytes(model: Any) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters()) + sum(b.numel() * b.element_size() for b in model.buffers())


def _free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def _meta(args: argparse.Namespace, device: str, config_path: Path, argv: list[str] | None) -> dict[str, Any]:
    import transformers

    versions = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
                "cuda": torch.version.cuda}
    for package in ("bitsandbytes", "flash_attn"):
        try:
            versions[package] = __import__(package).__version__
        except Exception:  # noqa: BLE001 - absent or broken: say so, do not fail the run
            versions[package] = None
    card = torch.cuda.get_device_name(device) if device.startswith("cuda") else f"cpu ({platform.processor() or platform.machine()})"
    return {
        "command": " ".join(shlex.quote(p) for p in ["python", "scripts/gpu_bench.py", *(sys.argv[1:] if argv is None else argv)]),
        "device": device, "card": card, "versions": versions,
        "config": str(config_path.relative_to(ROOT)) if config_path.is_relative_to(ROOT) else str(config_path),
        "config_sha256": hashlib.sha256(config_path.read_bytes()).hexdigest()[:16],
        "max_new_tokens": args.max_new_tokens, "text_tokens": args.text_tokens, "image_size": args.image_size,
        "repeats": args.repeats, "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    lines = [f"# GPU benchmark: {meta['card']}", "", f"Command: `{meta['command']}`  ",
             f"Config {meta['config']} (sha256 {meta['config_sha256']}), versions {meta['versions']}.  ",
             f"Picture {meta['image_size']}, {meta['max_new_tokens']} new tokens forced per answer; took {meta.get('duration_s', '?')} s.", ""]
    base = result.get("baseline")
    if base:
        lines += [f"Model card loop (one image at a time, {base['dtype']}, {base['attention']}): **{base['images_per_s']} images/s**, "
                  f"{base['generated_tokens_per_s']} generated tokens/s.", ""]
    lines += ["| dtype | attention | grid | image tokens | batch | images/s | x card | prompt tok/s | generated tok/s | prefill ms | peak GiB "
              "| images/s, DynamicCache |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for v in result["variants"]:
        where = f"| {v['dtype']} | {v['attention']} | {v.get('image_grid', 'full')} | {v.get('image_tokens', '')} "
        if "error" in v:  # beside what it measured before the failure, if anything
            lines.append(f"{where}| - | {v['error']} | | | | | | |")
        for row in v.get("batches", []):
            if row.get("oom"):
                lines.append(f"{where}| {row['batch_size']} | out of memory | | | | | | |")
                continue
            speedup = round(row["images_per_s"] / base["images_per_s"], 2) if base else ""
            lines.append(f"{where}| {row['batch_size']} | {row['images_per_s']} | {speedup} "
                         f"| {row['prompt_tokens_per_s']} | {row['generated_tokens_per_s']} | {row['prefill_ms']} | {row.get('peak_memory_gib', '')} "
                         f"| {row.get('images_per_s_dynamic_cache', '')} |")
    shared = [(v, row) for v in result["variants"] for row in v.get("shared_prefix", [])]
    if shared:
        lines += ["", "Shared image prefixes, through the worker's engine (`VQA_SHARE_IMAGE_PREFIX` off / on; best of the rounds "
                  "each way; batches formed image by image):", "",
                  "| dtype | attention | questions/image | questions | batch | q/s without | q/s with | speedup "
                  "| prompt tokens/question without | with | greedy answers agreeing |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for v, row in shared:
            lines.append(f"| {v['dtype']} | {v['attention']} | {row['questions_per_image']} | {row['questions']} | {row['batch']} "
                         f"| {row['questions_per_s_without']} | {row['questions_per_s_with']} | {row['speedup']}x "
                         f"| {row['prompt_tokens_per_question_without']} | {row['prompt_tokens_per_question_with']} "
                         f"| {row['answers_agreeing']}/{row['questions']} |")
    return "\n".join(lines) + "\n"


def say(text: str) -> None:
    print(f"[gpu_bench {time.strftime('%H:%M:%S')}] {text}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
