"""The CPU benchmark package behind ``make bench`` (``python -m bench``); model configs beside it.

    __main__   the run: profiles, sections, output files
    model      direct (model-only) throughput and padding workloads
    e2e        end-to-end bursts, open-loop latency, enqueue rates, worker memory
    stack      the private stack a run starts (Redis, S3 API, image servers, workers)
    report     results.md and results.png

``scripts/gpu_bench.py`` is the GPU script for the 7B shape; it reads the configs here.
"""
