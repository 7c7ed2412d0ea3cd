"""BatchRunner under faults, with a fake engine and store and the real Redis counters: OOM splits, retries, poison, crashes, hooks."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import redis

from producer import keys
from producer.errors import BackendUnavailable, CorruptRecord, OutOfMemory, StorageUnavailable
from producer.schema import GenerationSettings, Job, Record, utcnow
from producer.settings import Settings
from worker.counters import JobCounters
from worker.engine import Answer, Engine
from worker.hooks import BatchReport, Hook, Hooks
from worker.jobs import Pending, Prepared
from worker.runner import BatchRunner
from worker.storage import Stored


class FakeModel:
    """An engine whose inputs are the question; answers "answer to <question>"; runs out of memory above ``fits`` jobs or for a marked question."""

    name = "fake"
    quantization = "none"

    def __init__(self, *, fits: int = 1000, never_fits: str | None = None) -> None:
        self.fits = fits
        self.never_fits = never_fits
        self.calls: list[int] = []

    def prepare(self, image: Any, question: str, *, image_grid: str | None = None) -> str:
        return question

    def cost(self, inputs: str) -> int:
        return len(inputs)

    def generate_batch(self, inputs: list[str], generation: GenerationSettings) -> list[Answer]:
        self.calls.append(len(inputs))
        if len(inputs) > self.fits or (self.never_fits and any(self.never_fits in q for q in inputs)):
            raise OutOfMemory(f"a batch of {len(inputs)} does not fit")
        return [Answer(text=f"answer to {q}", prompt_tokens=len(q), image_tokens=0, generated_tokens=3) for q in inputs]


class FakeStore:
    """Keeps records in memory; can fail a number of writes first, or fail some jobs for good."""

    def __init__(self, *, failures: int = 0, corrupt: set[str] = frozenset(), broken: set[str] = frozenset(),
                 backend_failures: int = 0, broken_backend: set[str] = frozenset()) -> None:
        self.records: dict[str, Record] = {}
        self.published: list[list[str]] = []  # each result-backend write: the job ids it held
        self.dropped: list[list[str]] = []  # each drop_failed call: the new successes it was for
        self.backend_failures = backend_failures
        self.broken_backend = broken_backend  # job ids whose backend write raises something unexpected
        self.failures = failures
        self.corrupt = corrupt  # job ids whose success key holds an unreadable object
        self.broken = broken  # job ids whose write raises something unexpected

    def write(self, record: Record, *, drop_failed: bool = True) -> Stored:
        if self.failures:
            self.failures -= 1
            raise StorageUnavailable("S3 put_object failed: 503")
        if record.job_id in self.broken:
            raise KeyError("a bug in the store")
        if record.job_id in self.corrupt and record.status == "succeeded":
            raise CorruptRecord(f"results/{record.job_id}.json exists but is not a readable record")
        created = record.job_id not in self.records
        return Stored(self.records.setdefault(record.job_id, record), created=created)

    def drop_failed(self, job_ids: list[str]) -> None:
        self.dropped.append(list(job_ids))

    def publish(self, record: Record) -> None:
        self.publish_batch([record])

    def publish_batch(self, records: list[Record]) -> None:
        if self.backend_failures:
            self.backend_failures -= 1
            raise BackendUnavailable("result backend write failed: ConnectionError")
        if any(record.job_id in self.broken_backend for record in records):
            raise KeyError("a bug in the backend write")
        self.published.append([record.job_id for record in records])

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


def pending(j: Job, *, counters: redis.Redis | None = None) -> Pending:
    """A job as the fetch stage leaves it; with ``counters``, its earlier deliveries read as the preparer reads them."""
    earlier = JobCounters(counters).earlier_deliveries(j.job_id) if counters is not None else 0
    prepared = Prepared(inputs=j.question, cost=len(j.question), earlier_deliveries=earlier)
    return Pending(job=j, message=None, received_at=0.0, prepared=prepared)


class CountingRedis(redis.Redis):
    """A real client that counts the commands each thread sends."""

    calls: dict[str, int]

    def execute_command(self, *args: Any, **options: Any) -> Any:
        name = threading.current_thread().name
        self.calls[name] = self.calls.get(name, 0) + 1
        return super().execute_command(*args, **options)


@pytest.fixture()
def counters(redis_url: str) -> redis.Redis:
    client = CountingRedis.from_url(redis_url)
    client.calls = {}
    yield client
    client.close()


def make_runner(
    counters: redis.Redis, *, model: FakeModel, store: FakeStore | None = None, hooks: Hooks | None = None, **settings: Any
) -> BatchRunner:
    assert isinstance(model, Engine)
    return BatchRunner(
        settings=Settings(quantization="none", **settings),
        engine=model,
        store=store or FakeStore(),
        counters=JobCounters(counters),
        worker_name="test",
        stopping=threading.Event(),
        hooks=hooks,
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
    outcomes = {o.pending.job.job_id: o for o in runner.run([pending(job(i), counters=counters) for i in range(4)])}
    assert outcomes["job-0"].record.status == "failed" and outcomes["job-0"].record.error.code == "poison"
    assert not outcomes["job-0"].record.error.retryable
    assert all(outcomes[f"job-{i}"].record.status == "succeeded" for i in (1, 2, 3))
    assert sorted(model.calls) == [1, 2]  # the suspect alone, the first deliveries together
    # The model came back from them: their counts start over, only crashes accumulate.
    assert counters.get(keys.deliveries_key("job-1")) is None and counters.get(keys.deliveries_key("job-2")) is None


def test_a_job_the_model_came_back_from_is_not_charged_with_the_next_runs_crash(counters: redis.Redis) -> None:
    """Its delivery count starts over before the next group runs, not only once the writer stored its record.

    Two suspects in one batch run alone, one after the other: if the second kills the worker
    (a poison job), the first, already answered but not yet stored, must not carry that crash.
    """
    at_second_run: dict[str, Any] = {}

    class Watching(FakeModel):
        def generate_batch(self, inputs: list[str], generation: GenerationSettings) -> list[Answer]:
            if inputs == ["question 0?"]:
                at_second_run["job-1"] = counters.get(keys.deliveries_key("job-1"))
            return super().generate_batch(inputs, generation)

    runner = make_runner(counters, model=Watching(), max_deliveries=3)
    counters.set(keys.deliveries_key("job-0"), 1)
    counters.set(keys.deliveries_key("job-1"), 1)
    runner.infer([pending(job(1), counters=counters), pending(job(0), counters=counters)])  # the model's part only
    assert at_second_run == {"job-1": None}
    assert counters.get(keys.deliveries_key("job-0")) == b"2"  # the last run's own count stays until it is stored


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


# --------------------------------------------------------------------------- outcomes and hooks


class Recorder(Hook):
    """Records each hook call with the thread it ran on; can fail on_stored."""

    def __init__(self, *, fail_stored: Exception | None = None) -> None:
        self.calls: list[tuple[str, str, str]] = []  # (point, job id or "", thread name)
        self.fail_stored = fail_stored

    def _note(self, point: str, job_id: str = "") -> None:
        self.calls.append((point, job_id, threading.current_thread().name))

    def on_started(self, jobs: Any) -> None:
        for j in jobs:
            self._note("started", j.job_id)

    def on_stored(self, record: Record, *, job: Job, created: bool) -> None:
        self._note("stored", record.job_id)
        if self.fail_stored is not None:
            raise self.fail_stored

    def on_batch(self, report: BatchReport) -> None:
        self._note("batch", str(report.size))


def test_placeholders_hand_the_message_back_until_their_record_is_stored(counters: redis.Redis) -> None:
    runner = make_runner(counters, model=FakeModel())
    finishing = runner.infer([pending(job(i)) for i in range(3)])
    assert [o.action for o in finishing.outcomes] == ["requeue"] * 3  # a path that forgets to settle loses nothing
    assert [o.action for o in runner.complete(finishing)] == ["ack"] * 3


def test_the_model_thread_runs_no_hook_and_one_redis_round_trip_per_group(counters: redis.Redis) -> None:
    recorder = Recorder()
    runner = make_runner(counters, model=FakeModel(), hooks=Hooks([recorder]))
    batch = [pending(job(i)) for i in range(4)]
    result: list[Any] = []
    model_thread = threading.Thread(target=lambda: result.append(runner.infer(batch)), name="vqa-model")
    model_thread.start()
    model_thread.join()
    outcomes = runner.complete(result[0])
    assert [o.action for o in outcomes] == ["ack"] * 4
    assert counters.calls.get("vqa-model") == 1  # the counts that must land before the model runs
    assert all(thread != "vqa-model" for _, _, thread in recorder.calls)
    order = [(point, job_id) for point, job_id, _ in recorder.calls]
    assert [point for point, _ in order].count("stored") == 4 and ("batch", "4") in order
    for i in range(4):  # each job's on_started, then its batch's on_batch, then its on_stored
        assert order.index(("started", f"job-{i}")) < order.index(("batch", "4")) < order.index(("stored", f"job-{i}"))


def test_a_transient_on_stored_failure_hands_the_message_back(counters: redis.Redis) -> None:
    store = FakeStore()
    runner = make_runner(counters, model=FakeModel(), store=store, hooks=Hooks([Recorder(fail_stored=StorageUnavailable("events down"))]))
    [outcome] = runner.run([pending(job(1))])
    assert outcome.action == "requeue" and store.records["job-1"].status == "succeeded"


def test_other_on_stored_failures_are_logged_and_the_job_acked(counters: redis.Redis) -> None:
    runner = make_runner(counters, model=FakeModel(), hooks=Hooks([Recorder(fail_stored=ValueError("a bug in a hook"))]))
    [outcome] = runner.run([pending(job(1))])
    assert outcome.action == "ack"


def test_one_jobs_unexpected_store_error_hands_back_that_job_alone(counters: redis.Redis) -> None:
    store = FakeStore(broken={"job-1"})
    runner = make_runner(counters, model=FakeModel(), store=store)
    outcomes = {o.pending.job.job_id: o.action for o in runner.run([pending(job(i)) for i in range(4)])}
    assert outcomes == {"job-0": "ack", "job-1": "requeue", "job-2": "ack", "job-3": "ack"}


def test_a_batchs_records_reach_the_result_backend_in_one_write_after_s3_and_an_outage_is_retried(counters: redis.Redis) -> None:
    store = FakeStore(backend_failures=2)
    runner = make_runner(counters, model=FakeModel(), store=store)
    outcomes = {o.pending.job.job_id: o.action for o in runner.run([pending(job(i)) for i in range(4)])}
    assert outcomes == {f"job-{i}": "ack" for i in range(4)}
    assert store.published == [[f"job-{i}" for i in range(4)]] and sorted(store.records) == sorted(outcomes)
    assert store.dropped == [[f"job-{i}" for i in range(4)]]  # the failed records beside them: one look for the batch


def test_a_backend_write_that_breaks_for_one_record_hands_back_that_job_alone(counters: redis.Redis) -> None:
    store = FakeStore(broken_backend={"job-2"})
    runner = make_runner(counters, model=FakeModel(), store=store)
    outcomes = {o.pending.job.job_id: o.action for o in runner.run([pending(job(i)) for i in range(4)])}
    # The batch's write failed, then each job wrote its own: only the one that breaks it goes back.
    assert outcomes == {"job-0": "ack", "job-1": "ack", "job-2": "requeue", "job-3": "ack"}
    assert sorted(sum(store.published, [])) == ["job-0", "job-1", "job-3"]


def test_an_unreadable_stored_record_ends_the_job_in_a_failed_record_and_acks_it(counters: redis.Redis) -> None:
    store = FakeStore(corrupt={"job-2"})
    runner = make_runner(counters, model=FakeModel(), store=store)
    outcomes = {o.pending.job.job_id: o for o in runner.run([pending(job(i)) for i in range(3)])}
    assert all(o.action == "ack" for o in outcomes.values())
    failed = store.records["job-2"]
    assert failed.status == "failed" and failed.error.code == "corrupt_record" and not failed.error.retryable
    assert store.records["job-0"].status == store.records["job-1"].status == "succeeded"


def test_a_preparation_error_is_kept_per_job(counters: redis.Redis) -> None:
    runner = make_runner(counters, model=FakeModel())
    broken = Pending(job=job(9), message=None, received_at=0.0, prepared=Prepared(error=CorruptRecord("unreadable")))
    outcomes = {o.pending.job.job_id: o for o in runner.run([pending(job(1)), broken])}
    assert outcomes["job-9"].record.error.code == "corrupt_record" and outcomes["job-1"].record.status == "succeeded"
