"""The consumer batches only jobs whose fetch is done, keeps the model fed, hands back unfinished fetches on shutdown, and survives its own bugs."""

from __future__ import annotations

import gc
import threading
import time
import weakref
from typing import Any

import pytest

from producer.schema import Job
from producer.settings import Settings
from tests.support.consumer import FakeChannel, FakeRunner, NoCancels, delivery
from worker.broker import Delivery
from worker.consumer import BatchingConsumer
from worker.jobs import Prepared


def _job(name: str) -> Job:
    from producer.schema import GenerationSettings, utcnow

    return Job(job_id=f"id-{name}", image_url=f"https://images.example/{name}", question="What?", model="m",
               generation=GenerationSettings(max_new_tokens=4), submitted_at=utcnow())


def _until(condition: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_slow_fetch_does_not_hold_a_batch_and_is_handed_back_on_shutdown() -> None:
    slow_gate = threading.Event()
    prepared: set[str] = set()

    def prepare(job: Job) -> Prepared:
        name = job.image_url.rsplit("/", 1)[-1]
        if name.startswith("slow"):
            slow_gate.wait(10)
        prepared.add(name)
        return Prepared(inputs=object(), cost=100)

    runner = FakeRunner()
    settings = Settings(max_batch_size=2, max_batch_delay_ms=0)
    channel = FakeChannel()
    consumer = BatchingConsumer(settings=settings, runner=runner, prepare=prepare, stopping=threading.Event(), broker=channel, cancels=NoCancels())  # type: ignore[arg-type]
    consumer._model_thread.start()
    consumer._writer_thread.start()
    messages = {name: delivery(_job(name)) for name in ["slow.png", "a.png", "b.png", "c.png", "d.png"]}
    for message in messages.values():
        consumer._on_delivery(message)
    _until(lambda: {"a.png", "b.png", "c.png", "d.png"} <= prepared)

    consumer._tick()
    _until(lambda: len(runner.batches) == 1)
    assert runner.batches[0] == ["a.png", "b.png"]  # the slow download arrived first but is not waited for
    consumer._tick()  # a complete batch is queued behind the running one
    assert consumer._in_flight == 2 and consumer._batches.qsize() == 1 and consumer._handed == 2

    consumer.stop()
    shutdown = threading.Thread(target=consumer._shutdown)
    shutdown.start()
    tag = {name: message.tag for name, message in messages.items()}
    _until(lambda: tag["d.png"] in channel.requeued)  # hands back first, then waits for the running batch
    runner.release.set()
    shutdown.join(10)
    # Still downloading, or queued but never started: handed back. The running batch finished.
    assert channel.requeued == {tag["slow.png"], tag["c.png"], tag["d.png"]}
    assert channel.acked == {tag["a.png"], tag["b.png"]}
    slow_gate.set()


class _Inputs:
    """Stands in for a job's preprocessed tensors; a weak reference tells when it is freed."""


def test_a_finished_job_frees_its_inputs_without_waiting_for_the_garbage_collector() -> None:
    # Reference counting alone must free a settled job's pixel values: a cycle through the
    # job would keep them until a full collection, which is rare beside a loaded model, and
    # the worker's memory would grow with every job (found by the memory benchmark).
    freed_check: list[weakref.ref[_Inputs]] = []

    def prepare(job: Job) -> Prepared:
        inputs = _Inputs()
        freed_check.append(weakref.ref(inputs))
        return Prepared(inputs=inputs, cost=100)

    runner = FakeRunner()
    runner.release.set()
    channel = FakeChannel()
    consumer = BatchingConsumer(settings=Settings(max_batch_size=2, max_batch_delay_ms=0), runner=runner,  # type: ignore[arg-type]
                                prepare=prepare, stopping=threading.Event(), broker=channel, cancels=NoCancels())
    consumer._model_thread.start()
    consumer._writer_thread.start()
    messages = [delivery(_job(f"{i}.png")) for i in range(6)]
    gc.disable()
    try:
        for message in messages:
            consumer._on_delivery(message)
        _until(lambda: (consumer._tick(), len(channel.acked))[1] == len(messages))
        del message
        assert len(freed_check) == len(messages)
        _until(lambda: all(ref() is None for ref in freed_check))
    finally:
        gc.enable()
        consumer.stop()
        consumer._shutdown()


def _running(consumer: BatchingConsumer) -> threading.Thread:
    thread = threading.Thread(target=consumer.run, name="consumer")
    thread.start()
    return thread


def test_an_unexpected_error_in_the_loop_is_logged_and_the_loop_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    runner = FakeRunner()
    runner.release.set()
    channel = FakeChannel([delivery(_job(f"{i}.png")) for i in range(4)])
    consumer = BatchingConsumer(settings=Settings(max_batch_size=2, max_batch_delay_ms=0), runner=runner,  # type: ignore[arg-type]
                                prepare=lambda job: Prepared(inputs=object(), cost=1), stopping=threading.Event(), broker=channel, cancels=NoCancels())
    real_tick, failures = consumer._tick, [2]

    def tick() -> None:
        if failures[0]:
            failures[0] -= 1
            raise RuntimeError("a bug in the loop")
        real_tick()

    consumer._tick = tick  # type: ignore[method-assign]
    thread = _running(consumer)
    try:
        _until(lambda: len(channel.acked) == 4)
    finally:
        consumer.stop()
        thread.join(10)
    assert "unexpected error in the consumer loop" in caplog.text and "RuntimeError: a bug in the loop" in caplog.text


def test_a_loop_that_dies_still_hands_its_messages_back() -> None:
    channel = FakeChannel([delivery(_job(f"{i}.png")) for i in range(3)])
    gate = threading.Event()

    def prepare(job: Job) -> Prepared:
        gate.wait(10)  # the jobs are held, still fetching, when the loop dies
        return Prepared(inputs=object(), cost=1)

    consumer = BatchingConsumer(settings=Settings(max_batch_size=8, max_batch_delay_ms=0, shutdown_grace_s=1), runner=FakeRunner(),  # type: ignore[arg-type]
                                prepare=prepare, stopping=threading.Event(), broker=channel, cancels=NoCancels())
    real_receive = consumer._receive

    def receive() -> int:
        if len(consumer.ledger) == 3:
            raise KeyboardInterrupt  # not an Exception: the loop ends
        return real_receive()

    consumer._receive = receive  # type: ignore[method-assign]
    errors: list[BaseException] = []

    def run() -> None:
        try:
            consumer.run()
        except BaseException as exc:  # noqa: BLE001 - checked below
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(10)
    gate.set()
    assert errors and isinstance(errors[0], KeyboardInterrupt)
    assert channel.requeued == {f"tag-id-{i}.png" for i in range(3)}  # handed back, not left for the visibility timeout


def test_a_rejected_entry_is_dead_lettered_and_its_neighbours_run() -> None:
    runner = FakeRunner()
    runner.release.set()
    good = delivery(_job("ok.png"))
    channel = FakeChannel([Delivery(tag="junk", raw=b"\x00 not a message"), good])
    consumer = BatchingConsumer(settings=Settings(max_batch_size=1, max_batch_delay_ms=0), runner=runner,  # type: ignore[arg-type]
                                prepare=lambda job: Prepared(inputs=object(), cost=1), stopping=threading.Event(), broker=channel, cancels=NoCancels())
    thread = _running(consumer)
    try:
        _until(lambda: good.tag in channel.acked)
    finally:
        consumer.stop()
        thread.join(10)
    [(tag, reason)] = channel.dead
    assert tag == "junk" and "not JSON" in reason


class _CountingChannel(FakeChannel):
    def __init__(self) -> None:
        super().__init__()
        self.pops: list[float] = []

    def pop(self, limit: int) -> list[Delivery]:
        self.pops.append(time.monotonic())
        return super().pop(limit)


def test_a_busy_model_looks_at_an_empty_queue_less_often() -> None:
    """An empty queue is polled every 50 ms while the model idles; while it is busy, a job taken now would wait
    for the running batch anyway: the pause doubles up to half that batch's run time (issue 14: each look costs CPU)."""
    runner = FakeRunner()
    runner.stats.last_batch_s = 0.5
    channel = _CountingChannel()
    consumer = BatchingConsumer(settings=Settings(), runner=runner, prepare=lambda job: Prepared(inputs=object(), cost=1),  # type: ignore[arg-type]
                                stopping=threading.Event(), broker=channel, cancels=NoCancels())  # type: ignore[arg-type]

    def pauses(looks: int) -> list[float]:
        channel.pops.clear()
        while len(channel.pops) < looks:
            if consumer._receive() == 0:
                time.sleep(max(consumer._next_pop - time.monotonic(), 0.0))
        return [round(later - earlier, 2) for earlier, later in zip(channel.pops, channel.pops[1:])]

    idle = pauses(4)
    assert all(0.04 <= pause < 0.15 for pause in idle), idle  # no doubling: the third would be 0.2
    consumer._handed = 1  # a batch is in the model
    busy = pauses(6)
    for pause, expected in zip(busy, [0.05, 0.1, 0.2], strict=False):
        assert expected - 0.01 <= pause < expected + 0.1, busy
    assert all(0.24 <= pause < 0.4 for pause in busy[3:]), busy  # capped at half the last batch, 0.25 s, not 0.4 or 0.8
    channel.waiting.append(delivery(_job("late.png")))
    assert consumer._receive() == 1
    assert consumer._next_pop <= time.monotonic()  # after messages the queue is looked at again at once
