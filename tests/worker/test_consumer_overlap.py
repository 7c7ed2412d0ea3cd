"""The consumer batches only jobs whose fetch is done, keeps the model fed, and hands back unfinished fetches on shutdown."""

from __future__ import annotations

import gc
import json
import threading
import time
import weakref
from typing import Any

from producer import keys
from producer.schema import Job
from producer.settings import Settings
from worker.consumer import BatchingConsumer
from worker.runner import BatchStats, Finishing, Outcome, Pending, Prepared


class FakeMessage:
    def __init__(self, job: Job) -> None:
        self.headers = {"task": keys.TASK_NAME, "id": job.job_id}
        self.body = json.dumps([[], {"job": job.model_dump(mode="json")}, {}])
        self.content_type = "application/json"
        self.delivery_tag = f"tag-{job.job_id}"

    def reject(self) -> None:
        raise AssertionError("valid messages are never rejected")


class FakeChannel:
    """Where the consumer's ledger settles messages, by delivery tag (worker.broker.RedisQueue's part)."""

    def __init__(self) -> None:
        self.acked: set[str] = set()
        self.requeued: set[str] = set()

    def ack(self, tag: str) -> None:
        self.acked.add(tag)

    def requeue(self, tag: str) -> bool:
        self.requeued.add(tag)
        return True


class FakeRunner:
    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.release = threading.Event()
        self.stats = BatchStats()

    def infer(self, batch: list[Pending]) -> Finishing:
        self.batches.append([pending.job.image_url.rsplit("/", 1)[-1] for pending in batch])
        self.release.wait(10)
        return Finishing([Outcome(pending, "ack") for pending in batch])

    def complete(self, finishing: Finishing) -> list[Outcome]:
        return finishing.outcomes


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
    consumer = BatchingConsumer(settings=settings, runner=runner, prepare=prepare, stopping=threading.Event())  # type: ignore[arg-type]
    channel = FakeChannel()
    consumer.ledger.attach(channel)
    consumer._model_thread.start()
    consumer._writer_thread.start()
    messages = {name: FakeMessage(_job(name)) for name in ["slow.png", "a.png", "b.png", "c.png", "d.png"]}
    for message in messages.values():
        consumer._on_message(message)
    _until(lambda: {"a.png", "b.png", "c.png", "d.png"} <= prepared)

    consumer._tick()
    _until(lambda: len(runner.batches) == 1)
    assert runner.batches[0] == ["a.png", "b.png"]  # the slow download arrived first but is not waited for
    consumer._tick()  # a complete batch is queued behind the running one
    assert consumer._in_flight == 2 and consumer._batches.qsize() == 1 and consumer._handed == 2

    consumer.stop()
    shutdown = threading.Thread(target=consumer._shutdown)
    shutdown.start()
    tag = {name: message.delivery_tag for name, message in messages.items()}
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
    consumer = BatchingConsumer(settings=Settings(max_batch_size=2, max_batch_delay_ms=0), runner=runner,  # type: ignore[arg-type]
                                prepare=prepare, stopping=threading.Event())
    channel = FakeChannel()
    consumer.ledger.attach(channel)
    consumer._model_thread.start()
    consumer._writer_thread.start()
    messages = [FakeMessage(_job(f"{i}.png")) for i in range(6)]
    gc.disable()
    try:
        for message in messages:
            consumer._on_message(message)
        _until(lambda: (consumer._tick(), len(channel.acked))[1] == len(messages))
        del message
        assert len(freed_check) == len(messages)
        _until(lambda: all(ref() is None for ref in freed_check))
    finally:
        gc.enable()
        consumer.stop()
        consumer._shutdown()
