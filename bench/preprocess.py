"""The GPU host's CPU side: decode + LlavaNext preprocessing per image at the 7B's settings, and what the fetch pool sustains.

    .venv/bin/python -m bench.preprocess --out docs/benchmarks/preprocess    # ~2 min on 2 cores

With the 7B's processor settings (336-pixel tiles, the pinpoints of
bench/llava-v1.6-vicuna-7b-config.json, CLIP mean/std, bicubic; no weights needed), on random-pixel
JPEGs (quality 85):

1. decode and preprocess ms per image from 640x480 to 4032x3024, with the PIL processor and
   (when torchvision imports) the torchvision one; and a draft decode (Pillow's JPEG scale-down,
   kept at least as large as the image's target grid), this bench's own: the product's
   ``VQA_IMAGE_PRESCALE`` drafts and then resizes once (``python -m bench.prescale``);
   and the image's prefix-sharing key, hashed from its preprocessed tiles or from its JPEG bytes;
2. images/s of decode + preprocess that a pool of threads, and of processes, sustains: the image
   processor alone, and the worker's own path (``prepare_image``, on its fetch threads and through
   its ``VQA_PREPROCESS_PROCESSES`` pool, worker/preprocess_pool.py);
3. the stall of a model thread while the pool is busy. The model thread is a STAND-IN (bench-only):
   a pure-Python loop that holds the GIL for ~2 ms per "decode step" the way ``generate``'s Python
   loop does between kernels; its stall is the step time beyond its time with the pool idle.

Prints one line per figure and writes preprocess.json and preprocess.md.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import io
import json
import os
import platform
import shlex
import statistics
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from datetime import UTC, datetime
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from bench.decode import jpeg
from producer.image_grid import FULL
from worker.fetch.images import FetchPolicy, decode_image
from worker.imageprep import ImagePrep
from worker.prefix import image_key, keys_by_source
from worker.preprocess_pool import PreprocessPool

CONFIG = Path(__file__).with_name("llava-v1.6-vicuna-7b-config.json")
SIZES = ((640, 480), (1280, 960), (1920, 1080), (4032, 3024))
# llava-hf/llava-v1.6-vicuna-7b-hf's preprocessor_config.json, less the pinpoints (read from CONFIG).
PROCESSOR_SETTINGS: dict[str, Any] = {
    "size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}, "do_center_crop": True, "do_pad": True,
    "resample": 3, "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
}
_POLICY = FetchPolicy(allowed_hosts=())
POOL_KINDS = ("threads", "processes", "worker threads", "worker processes")


def say(message: str) -> None:
    print(f"[preprocess {time.strftime('%H:%M:%S')}] {message}", flush=True)


def pinpoints() -> list[list[int]]:
    return json.loads(CONFIG.read_text())["image_grid_pinpoints"]


def processor(kind: str) -> Any:
    """The 7B's image processor: ``pil`` (no torchvision needed) or ``torchvision``."""
    from transformers.models.llava_next import image_processing_pil_llava_next as pil_module

    settings = {**PROCESSOR_SETTINGS, "image_grid_pinpoints": pinpoints()}
    if kind == "pil":
        return pil_module.LlavaNextImageProcessorPil(**settings)
    import torchvision  # noqa: F401 - the torchvision backend needs it; ImportError says why it is missing
    from transformers import LlavaNextImageProcessor

    return LlavaNextImageProcessor(**settings)


def draft_decode(data: bytes) -> Image.Image:
    """Pillow's JPEG draft mode: decode at 1/2, 1/4 or 1/8 scale, never below the target grid's size."""
    from transformers.image_processing_utils import select_best_resolution

    image = Image.open(io.BytesIO(data))
    height, width = select_best_resolution((image.height, image.width), pinpoints())
    scale = min(1.0, max(width / image.width, height / image.height))
    image.draft("RGB", (max(1, int(image.width * scale)), max(1, int(image.height * scale))))
    return image.convert("RGB")


def _ms(fn: Any, repeats: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append((time.perf_counter() - start) * 1000)
    return round(statistics.median(times), 1), out


def per_image(images: dict[tuple[int, int], bytes], processors: dict[str, Any], *, repeats: int) -> list[dict[str, Any]]:
    rows = []
    for (width, height), data in images.items():
        decode_ms, image = _ms(lambda data=data: decode_image(data, _POLICY), repeats)
        row: dict[str, Any] = {"size": f"{width}x{height}", "decode_ms": decode_ms}
        for name, proc in processors.items():
            row[f"preprocess_ms_{name}"], out = _ms(lambda proc=proc, image=image: proc(images=image, return_tensors="pt"), repeats)
            if name == "pil":
                row.update(_key_ms(out, data, repeats))
        row["draft_decode_ms"], small = _ms(lambda data=data: draft_decode(data), repeats)
        row["draft_size"] = f"{small.width}x{small.height}"
        row["preprocess_ms_pil_after_draft"], _ = _ms(lambda small=small: processors["pil"](images=small, return_tensors="pt"), repeats)
        say(f"{row}")
        rows.append(row)
    return rows


def _key_ms(out: Any, data: bytes, repeats: int) -> dict[str, Any]:
    """The image's prefix-sharing key (worker/prefix.py): a hash of its preprocessed tiles, or of the bytes fetched."""
    pixels, size = out["pixel_values"][0], out["image_sizes"][0]
    tiles_ms, _ = _ms(lambda: image_key(pixels, size), max(repeats, 5))
    source_ms, _ = _ms(lambda: image_key(pixels, size, source=data, pinpoints=pinpoints()), max(repeats, 5))
    hashed = "bytes" if keys_by_source(pixels, data) else "tiles"
    return {"tiles": int(pixels.shape[0]), "jpeg_kb": round(len(data) / 1024), "key_ms_tiles": tiles_ms,
            "key_ms_source": source_ms, "key_hashes": hashed}


_WORKER_PROCESSOR: Any = None


def _prepare_one(data: bytes) -> int:
    """Decode + preprocess one image with the PIL processor (per process, built once)."""
    global _WORKER_PROCESSOR
    if _WORKER_PROCESSOR is None:
        _WORKER_PROCESSOR = processor("pil")
    out = _WORKER_PROCESSOR(images=decode_image(data, _POLICY), return_tensors="pt")
    return int(out["pixel_values"].shape[1])


def calibrate_spins(step_ms: float = 2.0) -> int:
    """Loop iterations that take ``step_ms`` with the machine otherwise idle (measured once, before any pool starts)."""
    probe, start = 500_000, time.perf_counter()
    for _ in range(probe):
        pass
    return max(1, int(probe * step_ms / 1000 / (time.perf_counter() - start)))


_SPINS: list[int] = []


def _stand_in_model(stop: threading.Event, steps: list[float]) -> None:
    """BENCH-ONLY stand-in for generate's Python loop: holds the GIL ~2 ms per step, records each step's wall time."""
    if not _SPINS:
        _SPINS.append(calibrate_spins())
    spins = _SPINS[0]
    while not stop.is_set():
        start = time.perf_counter()
        for _ in range(spins):
            pass
        steps.append((time.perf_counter() - start) * 1000)


def _model_steps(seconds: float) -> list[float]:
    stop, steps = threading.Event(), []
    thread = threading.Thread(target=_stand_in_model, args=(stop, steps), daemon=True)
    thread.start()
    time.sleep(seconds)
    stop.set()
    thread.join()
    return steps


def worker_prep() -> ImagePrep:
    """The worker's image preparation at the 7B's settings: the image processor above in a ``LlavaNextProcessor``.

    The processor counts each image's tokens with a tokenizer; the 7B's is not here, so the tiny
    checkpoint's stands in (it tokenizes one ``<image>`` placeholder per image: no cost to speak of).
    """
    import tempfile

    from transformers import LlavaNextProcessor

    from worker.dev.tiny_model import build_tiny_model

    with tempfile.TemporaryDirectory() as directory:
        tokenizer = LlavaNextProcessor.from_pretrained(build_tiny_model(Path(directory) / "tiny")).tokenizer
    full = LlavaNextProcessor(image_processor=processor("pil"), tokenizer=tokenizer, patch_size=14,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1)
    return ImagePrep(processor=full, checkpoint_pinpoints=tuple((int(h), int(w)) for h, w in pinpoints()), side=336,
                     image_grid=FULL, keyed=True)


_LOCAL = threading.local()


def _worker_thread_prepare(prep: ImagePrep, data: bytes) -> int:
    """What a fetch thread does without VQA_PREPROCESS_PROCESSES: decode, then prepare_image (its own processor copy)."""
    own = getattr(_LOCAL, "prep", None)
    if own is None:
        own = _LOCAL.prep = dataclasses.replace(prep, processor=copy.deepcopy(prep.processor))
    return own.prepare_image(decode_image(data, _POLICY), source=data).image_tokens


def _pool(kind: str, workers: int, prep: ImagePrep | None) -> tuple[Any, Any, Callable[[], None]]:
    """An executor to keep full, the function it runs per image's bytes, and what shuts it down."""
    if kind in ("threads", "processes"):
        executor = (ThreadPoolExecutor if kind == "threads" else ProcessPoolExecutor)(max_workers=workers)
        return executor, _prepare_one, executor.shutdown
    assert prep is not None
    fetch_threads = ThreadPoolExecutor(max_workers=workers)
    if kind == "worker threads":
        return fetch_threads, functools.partial(_worker_thread_prepare, prep), fetch_threads.shutdown
    # The worker's own VQA_PREPROCESS_PROCESSES pool: its fetch threads wait on the processes.
    processes = PreprocessPool(prep, _POLICY, processes=workers)
    processes.warm()

    def close() -> None:
        fetch_threads.shutdown()
        processes.close()

    return fetch_threads, lambda data: processes.prepare_image(data, image_grid=None)[0].image_tokens, close


def pool_run(kind: str, workers: int, data: list[bytes], *, seconds: float, idle_steps: list[float],
             prep: ImagePrep | None = None) -> dict[str, Any]:
    """Images/s of a pool kept full for ``seconds``, with the stand-in model thread running beside it.

    ``threads``/``processes``: decode + the image processor alone, in a thread or process pool;
    ``worker threads``: the worker's own path on its fetch threads (``prepare_image``: the
    processor with its token count, and the image's prefix key); ``worker processes``: the same
    path through the worker's ``VQA_PREPROCESS_PROCESSES`` pool.
    """
    pool, prepare_one, close = _pool(kind, workers, prep)
    try:
        list(pool.map(prepare_one, data[:workers]))  # warm: processors built, imports done
        stop, steps = threading.Event(), []
        model = threading.Thread(target=_stand_in_model, args=(stop, steps), daemon=True)
        model.start()
        done, start = 0, time.perf_counter()
        futures = [pool.submit(prepare_one, data[i % len(data)]) for i in range(workers * 2)]
        i = len(futures)
        while time.perf_counter() - start < seconds:
            futures.pop(0).result()
            done += 1
            futures.append(pool.submit(prepare_one, data[i % len(data)]))
            i += 1
        elapsed = time.perf_counter() - start
        stop.set()
        model.join()
        for future in futures:
            future.cancel()
    finally:
        close()
    alone = statistics.median(idle_steps)
    stall = sum(max(0.0, s - alone) for s in steps)
    ordered = sorted(steps)
    return {
        "pool": kind, "workers": workers, "images_per_s": round(done / elapsed, 2),
        "model_step_ms_alone_p50": round(alone, 2), "model_step_ms_p50": round(ordered[len(ordered) // 2], 2),
        "model_step_ms_p99": round(ordered[int(len(ordered) * 0.99)], 2),
        # Of each second of the stand-in model's time, how much went to waiting for the GIL or a core.
        "model_stall_ms_per_s": round(stall / elapsed, 1),
        "model_steps_per_s": round(len(steps) / elapsed, 1), "model_steps_per_s_alone": round(1000 / alone, 1),
    }


def markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    names = [k.removeprefix("preprocess_ms_") for k in result["per_image"][0] if k.startswith("preprocess_ms_") and "draft" not in k]
    lines = [
        "# The GPU host's CPU side: decode and LlavaNext preprocessing at the 7B's settings", "",
        f"Run at {meta['started_at']} on {meta['machine']} ({meta['cores']} cores), Python {meta['python']}, "
        f"transformers {meta['transformers']}, Pillow {meta['pillow']}. Command: `{meta['command']}`. "
        "Random-pixel JPEGs, quality 85; medians of "
        f"{meta['repeats']} runs. Processor: 336-pixel tiles, pinpoints {meta['pinpoints']}.", "",
        f"Torchvision processor: {result['torchvision']}.", "",
        "| image | decode ms | " + " | ".join(f"preprocess ms ({n})" for n in names)
        + " | draft decode ms (bench only) | draft size | preprocess ms after draft (pil) |",
        "|---|---:|" + "---:|" * len(names) + "---:|---|---:|",
    ]
    for row in result["per_image"]:
        cells = " | ".join(str(row[f"preprocess_ms_{n}"]) for n in names)
        lines.append(f"| {row['size']} | {row['decode_ms']} | {cells} | {row['draft_decode_ms']} | {row['draft_size']} "
                     f"| {row['preprocess_ms_pil_after_draft']} |")
    lines += ["", "## The image's prefix-sharing key (`VQA_SHARE_IMAGE_PREFIX`, worker/prefix.py `image_key`)", "",
              "ms per image (median of at least 5): blake2b of the preprocessed fp32 tiles, as every image was keyed before "
              "2026-12-04, against the key the worker takes now that it passes the fetched bytes: their blake2b when they "
              "are smaller than the tiles, else the tiles'. Random-pixel JPEGs barely compress, so these files are larger "
              "than a camera's.", "",
              "| image | tiles | JPEG KB | key from the tiles, ms | key with the bytes, ms | hashed |", "|---|---:|---:|---:|---:|---|"]
    lines += [f"| {row['size']} | {row['tiles']} | {row['jpeg_kb']} | {row['key_ms_tiles']} | {row['key_ms_source']} | {row['key_hashes']} |"
              for row in result["per_image"]]
    lines += ["", f"## Fetch pool: decode + preprocess (pil) of {result['pool_mix']}, with a stand-in model thread", "",
              "The model thread is a BENCH-ONLY stand-in: a pure-Python loop holding the GIL ~2 ms per step, as generate's "
              "Python loop does between kernels. Stall: its step time beyond its time alone, per second of the run.", "",
              "| pool | workers | images/s | model step ms alone (p50) | step ms p50 | step ms p99 | stall ms per s | steps/s (alone) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for run in result["pools"]:
        lines.append(f"| {run['pool']} | {run['workers']} | {run['images_per_s']} | {run['model_step_ms_alone_p50']} "
                     f"| {run['model_step_ms_p50']} | {run['model_step_ms_p99']} | {run['model_stall_ms_per_s']} "
                     f"| {run['model_steps_per_s']} ({run['model_steps_per_s_alone']}) |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.preprocess", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/preprocess"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0, help="per pool run")
    parser.add_argument("--workers", default="2,4", help="pool sizes, comma-separated")
    args = parser.parse_args(argv)
    started = datetime.now(UTC).isoformat(timespec="seconds")
    images = {size: jpeg(*size, seed=i) for i, size in enumerate(SIZES)}
    processors = {"pil": processor("pil")}
    try:
        processors["torchvision"] = processor("torchvision")
        torchvision_note = "measured"
    except (ImportError, RuntimeError, OSError) as exc:  # RuntimeError/OSError: a CUDA torchvision beside the CPU torch
        torchvision_note = f"not measured: {exc} (no CPU torchvision for the pinned torch; see torchvision.md)"
    say(f"torchvision processor: {torchvision_note}")
    rows = per_image(images, processors, repeats=args.repeats)
    # The pool's mix: one phone photo per full-HD frame, as a bulk annotation of mixed sources might be.
    mix = [images[(4032, 3024)], images[(1920, 1080)]]
    idle = _model_steps(2.0)
    pools = []
    prep = worker_prep()
    for kind in POOL_KINDS:
        for workers in (int(w) for w in args.workers.split(",")):
            run = pool_run(kind, workers, mix, seconds=args.seconds, idle_steps=idle, prep=prep)
            say(f"{run}")
            pools.append(run)
    result = {
        "meta": run_header("bench.preprocess", argv, started_at=started, repeats=args.repeats, pinpoints=pinpoints()),
        "torchvision": torchvision_note, "per_image": rows, "pool_mix": "4032x3024 and 1920x1080 alternately", "pools": pools,
    }
    write_result(args.out, "preprocess", result, markdown(result))
    return 0


def run_header(module: str, argv: list[str] | None, **extra: Any) -> dict[str, Any]:
    """How a CPU-side run was made: the machine, the versions and the exact command (bench.preprocess, bench.prescale)."""
    import PIL
    import transformers

    return {"machine": platform.processor() or platform.machine(), "cores": os.cpu_count(), "python": platform.python_version(),
            "transformers": transformers.__version__, "pillow": PIL.__version__,
            "command": shlex.join([Path(sys.executable).name, "-m", module, *(argv if argv is not None else sys.argv[1:])]), **extra}


def write_result(out: Path, name: str, result: dict[str, Any], text: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
