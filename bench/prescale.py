"""VQA_IMAGE_PRESCALE: the CPU it saves at the 7B's settings, and how often greedy answers change.

    .venv/bin/python -m bench.prescale --out docs/benchmarks/prescale    # ~5 min on 2 cores

1. ms per image of decode + preprocess, full path vs. prescaled (Pillow's JPEG draft decode at
   1/2, 1/4 or 1/8, one resize to the processor's target), with the 7B's processor settings
   (bench/preprocess.py's; no weights needed), per typical photo size;
2. fidelity on the bench model (worker/dev/tiny_model.py size "bench", fp32 on CPU): greedy answers
   to the same question about each of ``--photos`` photo-like JPEGs, decoded in full vs. prescaled;
   also checks that every prompt has the same token count and tile grid both ways.

The photos are synthetic but photo-like (seeded): smooth gradients, filled shapes, a blur and
sensor-like noise, JPEG quality 90, in sizes from 640x480 to 4032x3024 (portrait included).
Random pixels would be the wrong test: their detail is all above the frequencies a resize keeps.
Prints one line per figure and writes prescale.json and prescale.md.
"""

from __future__ import annotations

import argparse
import io
import random
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from bench.preprocess import run_header, write_result
from worker.fetch.images import FetchPolicy, decode_image
from worker.prescale import Prescaler

# (width, height) of the fidelity set, in turn: camera, phone (both ways), HD and web sizes.
PHOTO_SIZES = ((640, 480), (1024, 768), (1280, 960), (1920, 1080), (1600, 1200), (2048, 1536), (3024, 4032), (4032, 3024))
TIMED_SIZES = ((640, 480), (1280, 960), (1920, 1080), (2048, 1536), (4032, 3024))
QUESTION = "What is shown in this image?"
_FULL = FetchPolicy()


def say(message: str) -> None:
    print(f"[prescale {time.strftime('%H:%M:%S')}] {message}", flush=True)


def photo(width: int, height: int, *, seed: int, quality: int = 90) -> bytes:
    """A seeded photo-like JPEG: gradient sky and ground, shapes, a blur, then fine noise."""
    rng = random.Random(seed)
    # Drawn at a quarter size and enlarged: smooth edges and gradients, as a lens gives.
    w, h = max(8, width // 4), max(8, height // 4)
    top, bottom = [tuple(rng.randrange(256) for _ in range(3)) for _ in range(2)]
    ramp = np.linspace(0.0, 1.0, h)[:, None, None]
    base = (np.array(top) * (1 - ramp) + np.array(bottom) * ramp) * np.ones((1, w, 1))
    image = Image.fromarray(base.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randrange(4, 12)):
        x0, y0 = rng.randrange(w), rng.randrange(h)
        box = [x0, y0, x0 + rng.randrange(4, w // 2 + 5), y0 + rng.randrange(4, h // 2 + 5)]
        color = tuple(rng.randrange(256) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=color)
    image = image.filter(ImageFilter.GaussianBlur(1.0)).resize((width, height), Image.Resampling.BICUBIC)
    noise = np.random.default_rng(seed).integers(-6, 7, size=(height, width, 3), dtype=np.int16)
    pixels = np.clip(np.asarray(image, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(out, "JPEG", quality=quality)
    return out.getvalue()


def seven_b_prescaler() -> Prescaler:
    from bench.preprocess import PROCESSOR_SETTINGS, pinpoints

    return Prescaler(pinpoints=tuple(map(tuple, pinpoints())), side=PROCESSOR_SETTINGS["crop_size"]["height"], patch=14,
                     resample=PROCESSOR_SETTINGS["resample"])


def _ms(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return round(statistics.median(times), 1)


def timings(*, repeats: int) -> list[dict[str, Any]]:
    """Decode + preprocess ms per image, full vs. prescaled, at the 7B's processor settings."""
    from bench.preprocess import processor

    proc = processor("pil")
    prescaled = FetchPolicy(prescale=seven_b_prescaler())
    rows = []
    for i, (width, height) in enumerate(TIMED_SIZES):
        data = photo(width, height, seed=1000 + i)
        row: dict[str, Any] = {"size": f"{width}x{height}"}
        for name, policy in (("full", _FULL), ("prescaled", prescaled)):
            image = decode_image(data, policy)
            row[f"{name}_decode_ms"] = _ms(lambda policy=policy: decode_image(data, policy), repeats)
            row[f"{name}_preprocess_ms"] = _ms(lambda image=image: proc(images=image, return_tensors="pt"), repeats)
            row[f"{name}_decoded_size"] = f"{image.width}x{image.height}"
            row[f"{name}_tiles"] = int(proc(images=image, return_tensors="pt")["pixel_values"].shape[1])
        row["saved_ms"] = round(row["full_decode_ms"] + row["full_preprocess_ms"] - row["prescaled_decode_ms"] - row["prescaled_preprocess_ms"], 1)
        say(f"{row}")
        rows.append(row)
    return rows


def fidelity(*, photos: int, batch: int, max_new_tokens: int) -> dict[str, Any]:
    """Greedy answers on the bench model, full vs. prescaled decode, over ``photos`` JPEGs."""
    from producer.schema import GenerationSettings
    from producer.settings import Settings
    from worker.dev.tiny_model import build_tiny_model
    from worker.model import VQAModel

    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_model(Path(tmp) / "bench", size="bench", seed=0)
        model = VQAModel.load(Settings(model=str(path), quantization="none", device="cpu", share_image_prefix=False))
    prescaled = FetchPolicy(prescale=model.prescaler())
    generation = GenerationSettings(max_new_tokens=max_new_tokens)
    per_size: dict[str, dict[str, int]] = {}
    changed, same_tokens, shrunk, examples = 0, 0, 0, []
    for start in range(0, photos, batch):
        datas = [(i, PHOTO_SIZES[i % len(PHOTO_SIZES)]) for i in range(start, min(photos, start + batch))]
        encoded = [(i, size, photo(*size, seed=i)) for i, size in datas]
        full = [model.prepare(decode_image(data, _FULL), QUESTION) for _, _, data in encoded]
        small_images = [decode_image(data, prescaled) for _, _, data in encoded]
        small = [model.prepare(image, QUESTION) for image in small_images]
        answers_full = model.generate_prepared(full, generation)
        answers_small = model.generate_prepared(small, generation)
        for (i, size, _), a, b, f, s, image in zip(encoded, answers_full, answers_small, full, small, small_images, strict=True):
            key = f"{size[0]}x{size[1]}"
            counts = per_size.setdefault(key, {"photos": 0, "changed": 0, "prescaled": 0})
            counts["photos"] += 1
            counts["prescaled"] += image.size != size
            shrunk += image.size != size
            same_tokens += f.num_tokens == s.num_tokens and f.pixel_values.shape == s.pixel_values.shape
            if a != b:
                changed += 1
                counts["changed"] += 1
                if len(examples) < 5:
                    examples.append({"photo": i, "size": key, "full": a, "prescaled": b})
        say(f"{min(photos, start + batch)}/{photos} photos: {changed} answers changed, {shrunk} prescaled")
    return {
        "photos": photos, "prescaled": shrunk, "changed": changed, "change_rate": round(changed / photos, 4),
        "same_tokens_and_tiles": same_tokens, "max_new_tokens": max_new_tokens, "batch": batch,
        "pinpoints": [list(p) for p in model.prescaler().pinpoints], "per_size": per_size, "examples": examples,
    }


def markdown(result: dict[str, Any]) -> str:
    meta, fid = result["meta"], result["fidelity"]
    lines = [
        "# VQA_IMAGE_PRESCALE: CPU saved and answers changed", "",
        f"Run at {meta['started_at']} on {meta['machine']} ({meta['cores']} cores), Python {meta['python']}, "
        f"transformers {meta['transformers']}, Pillow {meta['pillow']}. Command: `{meta['command']}`. "
        "Seeded photo-like JPEGs (gradients, shapes, blur, noise; quality 90).", "",
        f"## Decode + preprocess at the 7B's processor settings (medians of {meta['repeats']})", "",
        "| image | full: decode ms | full: preprocess ms | prescaled: decoded to | prescaled: decode ms | prescaled: preprocess ms "
        "| tiles (full / prescaled) | saved ms per image |",
        "|---|---:|---:|---|---:|---:|---|---:|",
    ]
    for row in result["timings"]:
        lines.append(f"| {row['size']} | {row['full_decode_ms']} | {row['full_preprocess_ms']} | {row['prescaled_decoded_size']} "
                     f"| {row['prescaled_decode_ms']} | {row['prescaled_preprocess_ms']} | {row['full_tiles']} / {row['prescaled_tiles']} "
                     f"| {row['saved_ms']} |")
    lines += [
        "", f"## Greedy answers on the bench model (fp32, pinpoints {fid['pinpoints']}, up to {fid['max_new_tokens']} new tokens)", "",
        f"{fid['photos']} photos, {fid['prescaled']} of them prescaled (the others the processor would not shrink, or rounding "
        f"would change their grid). Same token count and tile grid both ways: {fid['same_tokens_and_tiles']} of {fid['photos']}. "
        f"**Answers changed: {fid['changed']} of {fid['photos']} ({fid['change_rate']:.1%}).**", "",
        "| image | photos | prescaled | answers changed |", "|---|---:|---:|---:|",
    ]
    for size, counts in fid["per_size"].items():
        lines.append(f"| {size} | {counts['photos']} | {counts['prescaled']} | {counts['changed']} |")
    if fid["examples"]:
        lines += ["", "Examples of changed answers (random-weight model: the words mean nothing, only whether they differ):", ""]
        lines += [f"- photo {e['photo']} ({e['size']}): full `{e['full']}` / prescaled `{e['prescaled']}`" for e in fid["examples"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.prescale", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/prescale"))
    parser.add_argument("--photos", type=int, default=320)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    started = datetime.now(UTC).isoformat(timespec="seconds")
    result = {
        "meta": run_header("bench.prescale", argv, started_at=started, repeats=args.repeats),
        "timings": timings(repeats=args.repeats),
        "fidelity": fidelity(photos=args.photos, batch=args.batch, max_new_tokens=args.max_new_tokens),
    }
    write_result(args.out, "prescale", result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
