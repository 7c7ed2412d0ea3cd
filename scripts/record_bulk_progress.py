"""Record what `vqa bulk submit` shows while a run runs, as text, for the README (docs/bulk-progress.txt).

    .venv/bin/python scripts/record_bulk_progress.py [--jobs 300] [--out docs/bulk-progress.txt]

A private stack (redis-server, S3 API server, image server, one worker on the tiny model), a
manifest of sample images with two invalid lines, and the progress display of `vqa bulk submit`
(producer/bulk/progress.py) drawn into a recording console: the live bar at a few moments, the
one-line summaries shown when stderr is not a terminal, and the first lines of the results file.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.stack import stack  # noqa: E402
from producer.bulk.progress import ProgressDisplay, summary  # noqa: E402
from tests.support.images import write_sample_images  # noqa: E402
from worker.dev.tiny_model import build_tiny_model  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bulk-progress.txt")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vqa-progress-") as tmp:
        work = Path(tmp)
        images = work / "images"
        images.mkdir()
        names = sorted(write_sample_images(images))
        model = str(build_tiny_model(work / "tiny", size="tiny"))
        with stack(images, delays=(0.0,)) as bench:
            env = bench.env(model=model, VQA_MAX_BATCH_SIZE="8", VQA_MAX_NEW_TOKENS="8", VQA_MAX_BATCH_DELAY_MS="50")
            bench.start_worker(env)
            manifest = work / "photos.jsonl"
            lines = [json.dumps({"custom_id": f"photo-{i:04d}", "image_url": f"{bench.image_urls[0.0]}/{names[i % len(names)]}"})
                     for i in range(args.jobs)]
            lines[7] = '{"custom_id": "photo-0007", "image_url": '  # cut short
            lines[20] = json.dumps({"custom_id": "photo-0003", "image_url": f"{bench.image_urls[0.0]}/tiny.png"})
            manifest.write_text("\n".join(lines) + "\n")
            text = record(bench.client(env), manifest, work)
    args.out.write_text(text)
    print(text)
    return 0


def record(client: object, manifest: Path, work: Path) -> str:
    live = Console(file=io.StringIO(), force_terminal=True, width=120, color_system=None)
    display = ProgressDisplay(io.StringIO(), live=True, console=live)
    frames: list[str] = []
    summaries: list[str] = []
    run = client.bulk(str(manifest), questions=["What is shown?"], window=64, on_invalid=lambda line, reason: summaries.append(
        f"line {line}: invalid, skipped: {reason}"))  # type: ignore[attr-defined]
    marks = [0.25, 0.6]
    last_line = 0.0
    while True:
        status = run.status()
        rate = display.update(status)
        total = status.estimated_total() or 1
        if marks and status.counts.finished >= marks[0] * total:
            marks.pop(0)
            frames.append(_frame(display))
        if time.monotonic() - last_line >= 2.0:
            last_line = time.monotonic()
            summaries.append(summary(status, rate))
        if status.ended:
            break
        time.sleep(0.5)
    frames.append(_frame(display))
    display.close()
    out = work / "results.jsonl"
    run.results(out)
    run.close()
    head = out.read_text().splitlines()[:2]
    return "\n".join(["# live bar (a terminal)", *frames, "", "# not a terminal", *summaries, "", "# results.jsonl", *head, ""])


def _frame(display: ProgressDisplay) -> str:
    snap = Console(file=io.StringIO(), width=120, color_system=None, record=True)
    assert display._bar is not None
    snap.print(display._bar.get_renderable())
    return snap.export_text().rstrip()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    raise SystemExit(main())
