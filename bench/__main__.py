"""`make bench`: throughput, latency, padding, enqueue rate and worker memory, measured in one run.

    .venv/bin/python -m bench                     # full profile -> docs/benchmarks/
    .venv/bin/python -m bench --profile tiny --out /tmp/bench   # seconds; what the tests run

Every figure comes from the same run on the same machine, so the ratios hold even where the
absolute numbers are noisy. docs/benchmarks/README.md explains each figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.e2e import burst, enqueue_rates, memory_run, open_loop
from bench.model import QUESTION, direct_throughput, load_images, padding_run, write_workloads
from bench.grid import grid_markdown, image_grid_rows
from bench.prefix import end_to_end_sharing, prefix_sharing
from bench.report import markdown, pipeline_cpu_ms, plot, targets
from bench.stack import stack

from producer.schema import GenerationSettings
from producer.settings import Settings


@dataclass(frozen=True)
class Profile:
    model_size: str  # worker/dev/tiny_model.py size used for sections 1-4
    batch_sizes: tuple[int, ...]
    jobs_min: int  # jobs per batch size: max(jobs_min, jobs_per_batch * batch)
    jobs_per_batch: int
    new_tokens: int
    latency_batch: int
    latency_s: float  # per load level
    padding_jobs: int
    padding_batch: int
    padding_e2e: bool
    enqueue_jobs: int
    memory_jobs: int
    memory_batch: int
    memory_new_tokens: int
    prefix_images: int = 4  # images for the shared-prefix section, each asked 1, 2, 3 and 5 questions
    grid_images: int = 16  # images for the image-grid section, at each grid (bench/grid.py)
    target_rounds: int = 1  # rounds of direct / end-to-end / 100 ms at the targets' batch size; the median is reported
    quantization: str = "none"


PROFILES = {
    "full": Profile(model_size="bench", batch_sizes=(1, 2, 4, 8, 16), jobs_min=48, jobs_per_batch=8, new_tokens=16,
                    latency_batch=8, latency_s=40, padding_jobs=64, padding_batch=8, padding_e2e=True,
                    enqueue_jobs=5000, memory_jobs=10_000, memory_batch=16, memory_new_tokens=4, target_rounds=3,
                    prefix_images=16),
    # Seconds, not minutes: the harness's own test. Figures from it mean nothing.
    "tiny": Profile(model_size="tiny", batch_sizes=(4,), jobs_min=12, jobs_per_batch=3, new_tokens=4,
                    latency_batch=4, latency_s=2, padding_jobs=8, padding_batch=4, padding_e2e=False,
                    enqueue_jobs=200, memory_jobs=40, memory_batch=4, memory_new_tokens=4, prefix_images=2, grid_images=4),
}
SECTIONS = ("enqueue", "throughput", "latency", "padding", "prefix", "grid", "memory")
PREFIX_QUESTIONS_PER_IMAGE = (1, 2, 3, 5)
_PADDING_LINE = re.compile(r"padding: (\d+) real / (\d+) padded prompt tokens")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="full")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"), help="where results.{json,md,png} go")
    parser.add_argument("--memory-jobs", type=int, help="jobs for the memory run (full profile: 10000)")
    parser.add_argument("--batch-sizes", help="comma-separated, e.g. 1,8")
    parser.add_argument("--quantization", choices=["none", "nf4", "int8"], help="worker and direct model (default none)")
    parser.add_argument("--torch-threads", type=int, help="torch intra-op threads for the direct runs and the workers (default: "
                        "torch's own). 1 puts all of the model's CPU on the thread that calls it, so the CPU table's pipeline "
                        "column (the worker's CPU beyond its model, decoding and preprocessing) is exact")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)} "
                        "(latency needs throughput, which it then runs too)")
    args = parser.parse_args(argv)
    profile = PROFILES[args.profile]
    if args.memory_jobs is not None:
        profile = replace(profile, memory_jobs=args.memory_jobs)
    if args.batch_sizes:
        profile = replace(profile, batch_sizes=tuple(int(b) for b in args.batch_sizes.split(",")))
    if args.quantization:
        profile = replace(profile, quantization=args.quantization)
    command = " ".join(shlex.quote(part) for part in [sys.executable.replace(os.getcwd() + "/", ""), *sys.argv])
    sections = set(args.sections.split(","))
    if sections - set(SECTIONS):
        parser.error(f"unknown sections: {', '.join(sorted(sections - set(SECTIONS)))}")
    if "latency" in sections:
        sections.add("throughput")
    if args.torch_threads is not None:
        # Read by torch in the workers the bench starts (and by OpenMP/MKL in this process, if torch is not loaded yet).
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[name] = str(args.torch_threads)
    result = run(profile, name=args.profile, command=command, sections=sections, torch_threads=args.torch_threads)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "results.md").write_text(markdown(result))
    drew = plot(result, args.out / "results.png")
    if "grid" in result:
        # A section of its own folder: docs/benchmarks/grid/ beside the main results.
        grid = {"meta": result["meta"], "grid": result["grid"]}
        (args.out / "grid").mkdir(exist_ok=True)
        (args.out / "grid" / "results.json").write_text(json.dumps(grid, indent=2) + "\n")
        (args.out / "grid" / "results.md").write_text(grid_markdown(grid))
        print(grid_markdown(grid))
    print(markdown(result))
    print(f"wrote {args.out}/results.json, results.md" + (", results.png" if drew else " (no plot: pip install matplotlib)"))
    return 0


class LoadSampler:
    """The 1-minute load average every few seconds: how busy the machine was besides us."""

    def __init__(self, every_s: float = 5.0) -> None:
        self.values: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every_s,), daemon=True)
        self._thread.start()

    def _run(self, every_s: float) -> None:
        while True:
            self.values.append(round(os.getloadavg()[0], 2))
            if self._stop.wait(every_s):
                return

    def summary(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join()
        return {"samples": len(self.values), "min": min(self.values), "mean": round(sum(self.values) / len(self.values), 2),
                "max": max(self.values)}


def run(profile: Profile, *, name: str, command: str, sections: set[str], torch_threads: int | None = None) -> dict[str, Any]:
    import torch
    import transformers

    if torch_threads is not None:
        torch.set_num_threads(torch_threads)

    from worker.model import VQAModel
    from worker.dev.tiny_model import build_tiny_model

    started, load = time.monotonic(), LoadSampler()
    result: dict[str, Any] = {"meta": {"profile": name, "command": command, "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
                                       "torch_threads_pinned": torch_threads}}
    gen = GenerationSettings(max_new_tokens=profile.new_tokens, min_new_tokens=profile.new_tokens)
    mem_gen = GenerationSettings(max_new_tokens=profile.memory_new_tokens, min_new_tokens=profile.memory_new_tokens)
    q = profile.quantization
    with tempfile.TemporaryDirectory(prefix="vqa-bench-") as tmp:
        work = Path(tmp)
        say(f"building the {profile.model_size} and tiny models")
        model_dir = str(build_tiny_model(work / "model", size=profile.model_size))  # type: ignore[arg-type]
        tiny_dir = str(build_tiny_model(work / "tiny", size="tiny"))
        sizes = sorted(profile.batch_sizes, key=lambda b: (b == profile.latency_batch, b))  # latency reuses the last worker
        n_jobs = {b: max(profile.jobs_min, profile.jobs_per_batch * b) for b in sizes}
        loads = write_workloads(work / "images", uniform=max(n_jobs.values()), mixed=profile.padding_jobs)
        model = VQAModel.load(Settings(model=model_dir, quantization=q, device=os.environ.get("VQA_DEVICE", "cpu")))
        uniform_images = load_images(work / "images", loads["uniform"].files)
        result["meta"]["model"] = {
            "size": profile.model_size, "quantization": q,
            "parameters_m": round(sum(p.numel() for p in model.model.parameters()) / 1e6, 1),
            "prompt_tokens": model.prepare(uniform_images[0], QUESTION).num_tokens,
        }
        result["meta"]["generation"] = gen.model_dump()
        tag = f"r{int(time.time())}"
        with stack(work / "images") as st:
            if "enqueue" in sections:
                say("enqueue rates")
                result["enqueue"] = enqueue_rates(st.redis.url, jobs=profile.enqueue_jobs)
            result["direct"], result["end_to_end"], result["end_to_end_delay"], points = [], [], [], []
            for b in sizes if "throughput" in sections else ():
                files = loads["uniform"].files[: n_jobs[b]]
                env = st.env(model=model_dir, quantization=q, VQA_MAX_BATCH_SIZE=str(b), VQA_MAX_NEW_TOKENS=str(profile.new_tokens))
                # At the targets' batch size, several rounds back to back: the machine's load moves
                # between the runs of one round, and the median round is steadier than any one.
                rounds = profile.target_rounds if b == profile.latency_batch else 1
                round_points = []
                for r in range(rounds):
                    of = f" (round {r + 1} of {rounds})" if rounds > 1 else ""
                    say(f"batch {b}: direct, {len(files)} images{of}")
                    direct = direct_throughput(model, uniform_images[: n_jobs[b]], batch=b, generation=gen)
                    st.start_worker(env)
                    if r == 0:
                        burst(st, env, files=files[:b], delay_s=0.0, generation=gen, tag=f"{tag}-warm{b}")
                    say(f"batch {b}: end to end{of}")
                    e2e = burst(st, env, files=files, delay_s=0.0, generation=gen, tag=f"{tag}-e2e{b}-{r}")
                    say(f"batch {b}: end to end, 100 ms per image{of}")
                    delayed = burst(st, env, files=files, delay_s=0.1, generation=gen, tag=f"{tag}-delay{b}-{r}")
                    result["direct"].append({**direct, "round": r})
                    result["end_to_end"].append({"batch_size": b, "round": r, **e2e})
                    result["end_to_end_delay"].append({"batch_size": b, "image_delay_s": 0.1, "round": r, **delayed})
                    round_points.append(_point(b, direct, e2e, delayed))
                points.append(_median_point(round_points))
            result["throughput"] = sorted(points, key=lambda p: p["batch_size"])
            if "latency" in sections and profile.latency_batch in sizes:
                result["latency"] = _latency(st, profile, model_dir, points, loads["uniform"].files, gen, tag)
            if "padding" in sections:
                result["padding"] = _padding(st, profile, model, model_dir, work, loads["mixed"].files, gen, tag)
            if "prefix" in sections:
                say(f"shared image prefixes: {profile.prefix_images} images x {PREFIX_QUESTIONS_PER_IMAGE} questions")
                result["prefix"] = prefix_sharing(model, uniform_images[: profile.prefix_images], per_image=PREFIX_QUESTIONS_PER_IMAGE,
                                                  batch=profile.latency_batch, rounds=profile.target_rounds, generation=gen)
                say("shared image prefixes end to end, questions image by image and interleaved across images")
                pb = profile.latency_batch
                result["meta"]["prefix_batch_size"] = pb
                result["prefix_end_to_end"] = end_to_end_sharing(
                    st, st.env(model=model_dir, quantization=q, VQA_MAX_BATCH_SIZE=str(pb), VQA_MAX_NEW_TOKENS=str(profile.new_tokens)),
                    loads["uniform"].files[: profile.prefix_images], per_image=PREFIX_QUESTIONS_PER_IMAGE, generation=gen, tag=f"{tag}-pfx",
                    rounds=profile.target_rounds)
            if "grid" in sections:
                say(f"image grids: {profile.grid_images} images at each of full, 2x2, 2x1, 1x1")
                grid_images = uniform_images[: profile.grid_images]
                result["meta"]["image_size"] = "x".join(str(side) for side in grid_images[0].size)
                result["grid"] = image_grid_rows(model, grid_images, batch=min(8, len(grid_images)), generation=gen)
            if "memory" not in sections:
                return _finish(result, profile, started, load, torch, transformers)
            say(f"memory: {profile.memory_jobs} jobs on the tiny model")
            mem_env = st.env(model=tiny_dir, quantization="none", VQA_MAX_BATCH_SIZE=str(profile.memory_batch),
                             VQA_MAX_NEW_TOKENS=str(profile.memory_new_tokens))
            if name == "tiny":
                mem_env = st.worker_env or mem_env  # one worker for the whole tiny run
            result["memory"] = {"model": "tiny", "batch_size": int(mem_env["VQA_MAX_BATCH_SIZE"]),
                                **memory_run(st, mem_env, files=loads["uniform"].files, jobs=profile.memory_jobs,
                                             generation=mem_gen, tag=f"{tag}-mem")}
    return _finish(result, profile, started, load, torch, transformers)


def _finish(result: dict[str, Any], profile: Profile, started: float, load: LoadSampler, torch: Any, transformers: Any) -> dict[str, Any]:
    result["targets"] = targets(result, at_batch=8 if 8 in profile.batch_sizes else max(profile.batch_sizes))
    result["meta"].update(duration_s=round(time.monotonic() - started, 1), load=load.summary(), host=_host(),
                          versions=_versions(torch, transformers))
    return result


def _point(b: int, direct: dict[str, Any], e2e: dict[str, Any], delayed: dict[str, Any]) -> dict[str, Any]:
    def ratio(a: float | None, c: float | None) -> float | None:
        return None if a is None or not c else round(a / c, 3)

    return {
        "batch_size": b, "direct_ips": direct["images_per_s"], "e2e_ips": e2e["images_per_s"], "delay_ips": delayed["images_per_s"],
        "e2e_ratio": ratio(e2e["images_per_s"], direct["images_per_s"]), "delay_ratio": ratio(delayed["images_per_s"], e2e["images_per_s"]),
        "e2e_mean_batch": e2e["mean_batch_size"], "e2e_utilisation": e2e["model_utilisation"],
        "delay_utilisation": delayed["model_utilisation"],
        "direct_cpu_ms_per_image": direct["cpu_ms_per_image"],
        **{f"e2e_cpu_ms_{name}": ms for name, ms in e2e["cpu_ms_per_job"].items()},
        **{f"e2e_cpu_ms_{stage}": ms for stage, ms in e2e["worker_cpu_ms_per_job"].items()},
        "e2e_cpu_ms_pipeline": pipeline_cpu_ms(e2e),
        "e2e_s3_requests_per_job": e2e["s3_requests_per_job"], "e2e_redis_commands_per_job": e2e["redis_commands_per_job"],
    }


def _median_point(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One point per batch size: the median of each figure over the rounds (ratios: the median of the rounds' ratios)."""
    if len(rounds) == 1:
        return {**rounds[0], "rounds": 1}

    def median(values: list[Any]) -> Any:
        present = sorted(v for v in values if v is not None)
        return present[len(present) // 2] if present else None

    point = {key: median([p[key] for p in rounds]) for key in rounds[0]}
    point["rounds"] = len(rounds)
    point["round_e2e_ratios"] = [p["e2e_ratio"] for p in rounds]
    point["round_delay_ratios"] = [p["delay_ratio"] for p in rounds]
    return point


def _latency(st: Any, profile: Profile, model_dir: str, points: list[dict[str, Any]], files: list[str],
             gen: GenerationSettings, tag: str) -> dict[str, Any]:
    b = profile.latency_batch
    point = next(p for p in points if p["batch_size"] == b)
    capacity = point["e2e_ips"] or point["direct_ips"]
    env = st.env(model=model_dir, quantization=profile.quantization, VQA_MAX_BATCH_SIZE=str(b), VQA_MAX_NEW_TOKENS=str(profile.new_tokens))
    st.start_worker(env)
    settings = Settings(**{k.removeprefix("VQA_").lower(): v for k, v in env.items()})
    runs = []
    for load in (0.5, 0.9):
        say(f"latency at {load:.0%} of {capacity} jobs/s for {profile.latency_s} s")
        run = open_loop(st, env, files=files, rate=load * capacity, duration_s=profile.latency_s, generation=gen, tag=f"{tag}-lat{load}")
        runs.append({"load": load, **run})
    return {
        "batch_size": b, "capacity_per_s": capacity, "runs": runs,
        "settings": f"VQA_MAX_BATCH_SIZE={b}, VQA_MAX_BATCH_DELAY_MS={settings.max_batch_delay_ms}, "
                    f"VQA_MAX_BATCH_TOKENS={settings.max_batch_tokens}, VQA_FETCH_CONCURRENCY={settings.fetch_concurrency}, "
                    f"prefetch {2 * b}",
    }


def _padding(st: Any, profile: Profile, model: Any, model_dir: str, work: Path, files: list[str], gen: GenerationSettings,
             tag: str) -> dict[str, Any]:
    b = profile.padding_batch
    images = load_images(work / "images", files)
    costs = [model.prepare(image, QUESTION).num_tokens for image in images]
    # A budget that never caps the batch size (b x the longest prompt): the gain is grouping alone.
    budget = b * max(costs)
    say(f"padding: {len(files)} mixed images, batch {b}, budget {budget} tokens")
    padding: dict[str, Any] = {"direct": padding_run(model, images, batch=b, max_tokens=budget, generation=gen)}
    if profile.padding_e2e:
        padding["end_to_end"] = {}
        for label, tokens in (("fifo", 0), ("padding_aware", budget)):
            st.stop_worker()  # a fresh worker: its padding counters then cover this burst only
            env = st.env(model=model_dir, quantization=profile.quantization, VQA_MAX_BATCH_SIZE=str(b),
                         VQA_MAX_NEW_TOKENS=str(profile.new_tokens), VQA_MAX_BATCH_TOKENS=str(tokens))
            st.start_worker(env)
            run = burst(st, env, files=files, delay_s=0.0, generation=gen, tag=f"{tag}-pad-{label}")
            found = _PADDING_LINE.findall(st.stop_worker())
            if found:
                real, padded = map(int, found[-1])
                run["padding_efficiency"] = round(real / padded, 4) if padded else None
            padding["end_to_end"][label] = run
    return padding


def _host() -> dict[str, Any]:
    model = platform.processor() or "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"cpus": os.cpu_count(), "cpu_model": model, "platform": platform.platform()}


def _versions(torch: Any, transformers: Any) -> dict[str, str]:
    import celery
    import kombu

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "celery": celery.__version__, "kombu": kombu.__version__, "torch_threads": str(torch.get_num_threads())}


def say(text: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
