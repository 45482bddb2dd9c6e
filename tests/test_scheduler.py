"""The worker that owns the model: round robin, one step per job, with fake jobs (no model)."""

from __future__ import annotations

import threading
import time

from lminf.serve.scheduler import Job, Worker


def fake_job(name: str, steps: int, log: list, fail_at: int | None = None, cancel_at: int | None = None) -> Job:
    """A job whose step k records (name, k); it may raise at step `fail_at` or cancel itself at
    `cancel_at` (as a client leaving between two steps does). Its events and closing are logged too."""
    events = []
    job = Job(steps=None, on_event=events.append)
    job.events = events

    def run():
        try:
            for k in range(1, steps + 1):
                if k == fail_at:
                    raise RuntimeError(f"{name} broke")
                log.append((name, k))
                if k == cancel_at:
                    job.cancelled.set()
                yield
        finally:
            log.append((name, "closed"))

    job.steps = run()
    return job


def run_all(worker: Worker, jobs: list[Job], timeout: float = 10.0) -> None:
    """Submit `jobs` before the worker starts (so none gets a head start), wait until all are done."""
    for job in jobs:
        worker.submit(job)
    if not worker.is_alive():
        worker.start()
    deadline = time.monotonic() + timeout
    while worker.active and time.monotonic() < deadline:
        time.sleep(0.005)
    assert worker.active == 0, "the worker did not finish its jobs"


def test_jobs_take_turns_one_step_each():
    log = []
    run_all(Worker(), [fake_job("a", 3, log), fake_job("b", 1, log), fake_job("c", 2, log)])
    steps = [entry for entry in log if entry[1] != "closed"]
    assert steps == [("a", 1), ("b", 1), ("c", 1), ("a", 2), ("c", 2), ("a", 3)]
    # A job is closed (its cleanup runs) at the turn after its last step, not once all are done.
    assert log == [("a", 1), ("b", 1), ("c", 1), ("a", 2), ("b", "closed"), ("c", 2), ("a", 3), ("c", "closed"), ("a", "closed")]


def test_a_cancelled_job_is_dropped_at_its_next_turn():
    log = []
    a, b = fake_job("a", 5, log, cancel_at=2), fake_job("b", 4, log)
    run_all(Worker(), [a, b])
    assert log == [("a", 1), ("b", 1), ("a", 2), ("b", 2), ("a", "closed"), ("b", 3), ("b", 4), ("b", "closed")]
    assert a.events == [] and b.events == []


def test_a_failing_job_reports_an_error_and_the_worker_goes_on():
    log = []
    worker = Worker()
    a, b = fake_job("a", 5, log, fail_at=2), fake_job("b", 3, log)
    run_all(worker, [a, b])
    assert a.events == [("error", "RuntimeError: a broke")] and b.events == []
    assert log == [("a", 1), ("b", 1), ("a", "closed"), ("b", 2), ("b", 3), ("b", "closed")]
    # The same worker still serves jobs submitted later.
    later = fake_job("later", 2, log)
    run_all(worker, [later])
    assert log[-3:] == [("later", 1), ("later", 2), ("later", "closed")] and worker.is_alive()


def test_a_job_submitted_while_others_run_joins_the_rotation():
    log, started = [], threading.Event()

    def slow_steps():
        for k in range(1, 6):
            log.append(("a", k))
            started.set()
            time.sleep(0.02)
            yield

    worker = Worker()
    a = Job(steps=slow_steps(), on_event=lambda e: None)
    worker.submit(a)
    worker.start()
    started.wait(5)
    run_all(worker, [fake_job("b", 2, log)])
    a_steps = [k for name, k in log if name == "a"]
    b_first = log.index(("b", 1))
    assert a_steps == [1, 2, 3, 4, 5] and 0 < b_first < log.index(("a", 5))  # b did not wait for a to finish
