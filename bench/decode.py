"""Image decodes per second through ``worker.fetch.images.decode_image`` with N threads, as the fetch pool runs them.

    .venv/bin/python -m bench.decode --threads 1,8 --seconds 5 --out docs/benchmarks/decode-after.json

Random-pixel JPEGs (quality 85) at two photo sizes, made once per run; each thread decodes them
round-robin for ``--seconds``. Prints one line per (size, threads) and writes the JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import shlex
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from PIL import Image

from worker.fetch.images import FetchPolicy, decode_image

SIZES = ((640, 480), (1920, 1080))


def jpeg(width: int, height: int, *, seed: int) -> bytes:
    """Random pixels: the worst case for a JPEG decoder, and the same bytes on every run."""
    image = Image.frombytes("RGB", (width, height), random.Random(seed).randbytes(width * height * 3))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=85)
    return out.getvalue()


def decodes_per_s(data: list[bytes], *, threads: int, seconds: float) -> float:
    policy = FetchPolicy()
    counts = [0] * threads
    stop = threading.Event()

    def work(index: int) -> None:
        i = index
        while not stop.is_set():
            decode_image(data[i % len(data)], policy)
            counts[index] += 1
            i += 1

    pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    started = time.perf_counter()
    for thread in pool:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in pool:
        thread.join()
    return sum(counts) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.decode", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", default="1,8", help="comma-separated thread counts")
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    parser.add_argument("--out", type=Path, help="write the results here as JSON")
    args = parser.parse_args()
    results: list[dict[str, Any]] = []
    for width, height in SIZES:
        data = [jpeg(width, height, seed=seed) for seed in range(4)]
        for threads in (int(part) for part in args.threads.split(",")):
            rate = decodes_per_s(data, threads=threads, seconds=args.seconds)
            results.append({"size": f"{width}x{height}", "threads": threads, "decodes_per_s": round(rate, 1)})
            print(f"{width}x{height}  threads={threads}  {rate:.1f} decodes/s", flush=True)
    if args.out:
        meta = {
            "command": " ".join(shlex.quote(part) for part in ["python", "-m", "bench.decode", *sys.argv[1:]]),
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "pillow": Image.__version__,
        }
        args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
