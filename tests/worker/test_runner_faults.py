"""BatchRunner under faults, with a fake model and store and the real Redis counters: OOM splits, retries, poison, crashes."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import redis

from producer import keys
from producer.errors import OutOfMemory, StorageUnavailable
from producer.schema import GenerationSettings, Job, Record, utcnow
from producer.settings import Settings
from worker.runner import BatchRunner, Pending, Prepared


class FakeModel:
    """Answers "answer to <question>"; runs out of memory above ``fits`` jobs or for a marked question."""

    name = "fake"

    def __init__(self, *, fits: int = 1000, never_fits: str | None = None) -> None:
        self.fits = fits
        self.never_fits = never_fits
        self.calls: list[int] = []

    def generate(self, images: list[Any], questions: list[str], generation: GenerationSettings) -> list[str]:
        self.calls.append(len(questions))
        if len(questions) > self.fits or (self.never_fits and any(self.never_fits in q for q in questions)):
            raise OutOfMemory(f"a batch of {len(questions)} does not fit")
        return [f"answer to {q}" for q in questions]


class FakeStore:
    """Keeps records in memory; can fail a number of writes first."""

    def __init__(self, *, failures: int = 0) -> None:
        self.records: dict[str, Record] = {}
        self.failures = failures

    def write(self, record: Record) -> Record:
        if self.failures:
            self.failures -= 1
            raise StorageUnavailable("S3 put_object failed: 503")
        return self.records.setdefault(record.job_id, record)

    def publish(self, record: Record) -> None:
        pass

    def mark_started(self, job_ids: list[str]) -> None:
        pass


def job(i: int, question: str | None = None) -> Job:
    return Job(
        job_id=f"job-{i}",
        image_url="https://example.com/a.png",
        question=question or f"question {i}?",
        model="fake",
        generation=GenerationSettings(max_new_tokens=4),
        submitted_at=utcnow(),
    )


def pending(j: Job) -> Pending:
    return Pending(job=j, message=None, received_at=0.0, prepared=Prepared(image=object()))


@pytest.fixture()
def counters(redis_url: str) -> redis.Redis:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def make_runner(counters: redis.Redis, *, model: FakeModel, store: FakeStore | None = None, **settings: Any) -> BatchRunner:
    return BatchRunner(
        settings=Settings(quantization="none", **settings),
        model=model,
        store=store or FakeStore(),
        counters=counters,
        worker_name="test",
        stopping=threading.Event(),
        sleep=lambda _s: None,
    )


def test_oom_batch_is_split_until_it_fits_and_every_job_answers(counters: redis.Redis) -> None:
    model = FakeModel(fits=2)
    runner = make_runner(counters, model=model)
    outcomes = runner.run([pending(job(i)) for i in range(8)])
    assert [o.action for o in outcomes] == ["ack"] * 8
    assert {o.record.batch_size for o in outcomes} == {2}  # the size of the call that answered
    assert runner.stats.oom_splits == 3  # 8 -> 4+4 -> 2+2+2+2
    assert {o.record.executions for o in outcomes} == {1}  # splitting is not running twice


def test_fault_hook_oom_above_batch_splits(counters: redis.Redis) -> None:
    runner = make_runner(counters, model=FakeModel(), fault_oom_above_batch=3)
    outcomes = runner.run([pending(job(i)) for i in range(6)])
    assert [o.action for o in outcomes] == ["ack"] * 6 and max(o.record.batch_size for o in outcomes) <= 3


def test_job_that_never_fits_fails_alone_after_its_attempts(counters: redis.Redis) -> None:
    runner = make_runner(counters, model=FakeModel(never_fits="huge"), max_attempts=2)
    batch = [pending(job(0, "a huge question?")), *(pending(job(i)) for i in range(1, 4))]
    first = runner.run(batch)
    assert sorted(o.action for o in first) == ["ack", "ack", "ack", "retry"]
    retry = next(o for o in first if o.action == "retry")
    assert retry.pending.job.job_id == "job-0" and 0 <= retry.delay_s <= 2.0
    retry.pending.attempt += 1  # what the consumer does before the retry
    [final] = runner.run([retry.pending])
    assert final.action == "ack" and final.record.status == "failed"
    assert final.record.error.code == "out_of_memory" and final.record.error.retryable
    assert final.record.attempts == 2


def test_storage_outage_is_retried_without_failing_the_job(counters: redis.Redis) -> None:
    store = FakeStore(failures=3)
    runner = make_runner(counters, model=FakeModel(), store=store)
    [outcome] = runner.run([pending(job(1))])
    assert outcome.action == "ack" and store.records["job-1"].status == "succeeded"


def test_storage_outage_during_shutdown_hands_the_job_back(counters: redis.Redis) -> None:
    runner = make_runner(counters, model=FakeModel(), store=FakeStore(failures=1))
    runner.stopping.set()
    [outcome] = runner.run([pending(job(1))])
    assert outcome.action == "requeue"


def test_redelivered_jobs_run_alone_and_poison_is_quarantined(counters: redis.Redis) -> None:
    model = FakeModel()
    runner = make_runner(counters, model=model, max_deliveries=3)
    counters.set(keys.deliveries_key("job-0"), 3)  # three deliveries died with it already
    counters.set(keys.deliveries_key("job-1"), 1)  # a companion of one crash
    outcomes = {o.pending.job.job_id: o for o in runner.run([pending(job(i)) for i in range(4)])}
    assert outcomes["job-0"].record.status == "failed" and outcomes["job-0"].record.error.code == "poison"
    assert not outcomes["job-0"].record.error.retryable
    assert all(outcomes[f"job-{i}"].record.status == "succeeded" for i in (1, 2, 3))
    assert sorted(model.calls) == [1, 2]  # the suspect alone, the first deliveries together
    # The model came back from them: their counts start over, only crashes accumulate.
    assert counters.get(keys.deliveries_key("job-1")) is None and counters.get(keys.deliveries_key("job-2")) is None


def test_crash_hook_exits_the_process(counters: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    exits: list[int] = []

    def fake_exit(code: int) -> None:
        exits.append(code)
        raise SystemExit(code)

    monkeypatch.setattr("worker.runner.os._exit", fake_exit)
    runner = make_runner(counters, model=FakeModel(), fault_crash_on_question="__boom__")
    with pytest.raises(SystemExit):
        runner.run([pending(job(1)), pending(job(2, "__boom__ what?"))])
    assert exits == [137]
    # Counted before the model ran: the crash shows in the job's executions and deliveries.
    assert int(counters.get(keys.executions_key("job-2"))) == 1
    assert int(counters.get(keys.deliveries_key("job-2"))) == 1
