"""In-process stand-ins around a real BatchingConsumer: a queue that records settles, a runner that answers on cue."""

from __future__ import annotations

import threading

from producer.messages import TaskMessages
from producer.schema import Job
from worker.broker import Delivery
from worker.jobs import Outcome, Pending
from worker.runner import BatchStats, Finishing


def delivery(job: Job) -> Delivery:
    """A job's message exactly as a producer puts it on the queue."""
    raw = TaskMessages(queue="vqa", reply_to="r").encode(job).encode()
    return Delivery(tag=f"tag-{job.job_id}", raw=raw)


class FakeChannel:
    """The consumer's queue (worker.broker.RedisQueue's part): hands out the deliveries it is given, records settles by tag."""

    def __init__(self, deliveries: list[Delivery] | None = None) -> None:
        self.waiting = list(deliveries or [])
        self.acked: set[str] = set()
        self.requeued: set[str] = set()
        self.dead: list[tuple[str, str]] = []
        self.consumer_id = "fake"

    def pop(self, limit: int) -> list[Delivery]:
        taken, self.waiting = self.waiting[:limit], self.waiting[limit:]
        return taken

    def restore_expired(self, visibility_timeout: float) -> int:
        return 0

    def ack(self, tag: str) -> bool:
        self.acked.add(tag)
        return True

    def ack_many(self, tags: list[str]) -> list[bool]:
        return [self.ack(tag) for tag in tags]

    def heartbeat(self) -> bool:
        return False

    def retire(self) -> int:
        return 0

    def requeue(self, tag: str) -> bool:
        self.requeued.add(tag)
        return True

    def dead_letter(self, tag: str, raw: bytes, *, reason: str) -> None:
        self.dead.append((tag, reason))


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


class NoCancels:
    """worker.cancels.CancelCheck for tests that cancel nothing: no Redis behind it."""

    def reasons(self, jobs: object) -> dict[str, object]:
        return {}

    def local_reasons(self, jobs: object) -> dict[str, object]:
        return {}
