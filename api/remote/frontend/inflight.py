"""A front-end's jobs between being sent and being answered, and the rule when their engine ends.

Nothing accepted is lost to an engine's death: the jobs it held are sent again to the next engine,
if their deadline allows, at most once. A job in flight at two deaths is answered 503, so that a
batch that kills the engine (a poison input, a runtime bug) cannot crash-loop it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from api.engine.model.served import Served
from api.engine.serving.pipeline import BatchRun
from api.errors import GatewayTimeout, ServiceUnavailable
from api.remote import wire

Answer = tuple[np.ndarray, BatchRun, Served]


@dataclass(eq=False)
class PendingJob:
    """One image in its ring slot, until the engine answers it."""

    id: int
    slot: int
    height: int
    width: int
    resize: int
    deadline: float
    ring: wire.Ring
    future: asyncio.Future[Answer]
    served: Served | None = None  # the model it was sent to (its answer names it)
    deaths: int = 0  # engine processes that ended with it in flight


class InFlight:
    def __init__(self, release: Callable[[PendingJob], None]):
        self.waiting: dict[int, PendingJob] = {}  # sent to the engine, not answered yet
        self.replay: list[PendingJob] = []  # in flight when the engine ended: for the next one
        self._release = release  # its slot comes back

    def __len__(self) -> int:
        return len(self.waiting)

    def sent(self, jobs: Iterable[PendingJob]) -> None:
        for job in jobs:
            self.waiting[job.id] = job

    def answered(self, job_id: int) -> PendingJob | None:
        return self.waiting.pop(job_id, None)

    def engine_ended(self) -> None:
        """The engine is gone with what it held: each job goes to the next engine, or (its second
        death) is answered 503."""
        for job in self.waiting.values():
            if job.future.done():  # its caller gave up
                self._release(job)
                continue
            job.deaths += 1
            if job.deaths >= 2:
                job.future.set_exception(
                    ServiceUnavailable(
                        "the engine process ended twice with this image in flight: it is not sent again (it may be "
                        "what ends it)",
                        retry_after_s=1,
                    )
                )
                self._release(job)
            else:
                job.ring.state[job.slot] = 0  # whatever the old engine was told
                self.replay.append(job)
        self.waiting.clear()

    def take_replay(self) -> list[PendingJob]:
        """The jobs to send to the next engine: those still wanted within their deadline."""
        now = time.monotonic()
        kept = []
        for job in self.replay:
            if job.future.done():
                self._release(job)
            elif job.deadline <= now:
                job.future.set_exception(GatewayTimeout("the request deadline passed while the engine restarted"))
                self._release(job)
            else:
                kept.append(job)
        self.replay = []
        return kept

    def abandon(self, jobs: Iterable[PendingJob], ring: wire.Ring | None) -> None:
        """Their caller gave up: the engine skips them (their slots come back with its answer)."""
        for job in jobs:
            if job.id in self.waiting and job.ring is ring:
                ring.state[job.slot] = wire.ABANDONED
            elif job in self.replay:
                self.replay.remove(job)
                self._release(job)

    def give_up(self, reason: str) -> None:
        """No engine will take the jobs kept for the next one (it serves another model, or the
        service stops): 503."""
        for job in self.replay:
            if not job.future.done():
                job.future.set_exception(ServiceUnavailable(f"{reason}; retry", retry_after_s=1))
            self._release(job)
        self.replay = []
