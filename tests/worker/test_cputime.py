"""The worker's CPU accounting: per-stage totals from each thread's clock, served as counters the benchmark reads."""

from __future__ import annotations

import threading
import time

import pytest
from prometheus_client import generate_latest

from bench.stack import stage_cpu_seconds
from tests.support.clock import ManualClock
from worker.cputime import CpuAccount
from worker.ledger import LedgerStats
from worker.metrics import WorkerMetrics


def test_each_stage_gets_the_cpu_spent_inside_its_block_also_when_it_raises() -> None:
    clock = ManualClock()
    cpu = CpuAccount(clock=clock)
    with cpu.measure("model"):
        clock.now += 1.5
    clock.now += 10  # outside any block: the pipeline's, counted nowhere here
    with pytest.raises(ValueError), cpu.measure("decode"):
        clock.now += 0.25
        raise ValueError("corrupt image")
    with cpu.measure("preprocess"):
        clock.now += 0.5
    with cpu.measure("model"):
        clock.now += 1.0
    assert cpu.seconds() == {"model": 2.5, "decode": 0.25, "preprocess": 0.5}


def test_the_real_clock_counts_only_the_measuring_threads_cpu() -> None:
    cpu = CpuAccount()
    busy_until = time.monotonic() + 0.3

    def spin() -> None:  # another thread's CPU must not land in the stage
        while time.monotonic() < busy_until:
            sum(range(1000))

    other = threading.Thread(target=spin)
    other.start()
    with cpu.measure("model"):
        time.sleep(0.3)  # waiting costs no CPU
    other.join()
    assert cpu.seconds()["model"] < 0.05


def test_the_metrics_serve_the_totals_and_the_benchmark_reads_them_back() -> None:
    clock = ManualClock()
    cpu = CpuAccount(clock=clock)
    metrics = WorkerMetrics(worker="w1", ledger=LedgerStats(), cpu=cpu)
    with cpu.measure("preprocess"):
        clock.now += 0.125
    text = generate_latest(metrics.registry).decode()
    assert 'vqa_preprocess_cpu_seconds_total{worker="w1"} 0.125' in text
    assert stage_cpu_seconds(text) == {"model": 0.0, "decode": 0.0, "preprocess": 0.125}
    with cpu.measure("model"):  # read at scrape time
        clock.now += 2.0
    assert stage_cpu_seconds(generate_latest(metrics.registry).decode())["model"] == 2.0


def test_the_benchmark_refuses_a_worker_without_the_counters() -> None:
    text = generate_latest(WorkerMetrics(worker="w1", ledger=LedgerStats()).registry).decode()
    with pytest.raises(RuntimeError, match="no CPU counters"):
        stage_cpu_seconds(text)
