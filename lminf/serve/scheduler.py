"""Scheduling requests on the one thread that owns the model.

A request is a `Job`: a generator doing one bounded piece of work per `next()` (a prefill
chunk or one token), the callback its events go to, and a flag its client sets on leaving.
A scheduler is anything with `submit(job)` and an `active` count (the `Scheduler`
protocol): `Worker` runs the jobs one step each in turn, round robin; a batched scheduler
could later run one step of many jobs in one forward pass behind the same two members.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class Job:
    """One request: its steps, and where its events go."""

    steps: Generator  # one bounded step per next(); closed when done, cancelled or failed
    on_event: Callable[[tuple], None]  # thread-safe; gets ("error", message) when a step raises
    cancelled: threading.Event = field(default_factory=threading.Event)  # set: drop at its next turn


class Scheduler(Protocol):
    active: int  # jobs submitted and not yet finished

    def submit(self, job: Job) -> None: ...


class Worker(threading.Thread):
    """Runs every job one step at a time, round robin, on the thread that owns the model.

    A cancelled job is dropped at its next turn; a job whose step raises gets
    ("error", "Type: message") and is dropped, and the worker goes on with the others.
    A dropped job's generator is closed, so its cleanup runs (e.g. a session goes back to
    its store). Jobs submitted before `start()` wait for it."""

    def __init__(self):
        super().__init__(daemon=True, name="lminf-worker")
        self._jobs: deque[Job] = deque()
        self._wake = threading.Condition()
        self.active = 0

    def submit(self, job: Job) -> None:
        with self._wake:
            self._jobs.append(job)
            self.active += 1
            self._wake.notify()

    def run(self) -> None:
        while True:
            with self._wake:
                while not self._jobs:
                    self._wake.wait()
                job = self._jobs.popleft()
            if job.cancelled.is_set() or self._step(job):
                self._close(job)
                with self._wake:
                    self.active -= 1
            else:
                with self._wake:
                    self._jobs.append(job)  # back of the queue: the others go first

    @staticmethod
    def _step(job: Job) -> bool:
        """Run one step of `job`; True when it has finished (or failed)."""
        try:
            next(job.steps)
        except StopIteration:
            return True
        except Exception as error:  # a failing request must not take the server down
            job.on_event(("error", f"{type(error).__name__}: {error}"))
            return True
        return False

    @staticmethod
    def _close(job: Job) -> None:
        """Close the job's generator, which runs its cleanup (e.g. a session back to its store)."""
        try:
            job.steps.close()
        except Exception as error:  # nor must a failing cleanup
            job.on_event(("error", f"{type(error).__name__}: {error}"))
