"""A front-end as the engine process sees it: its socket and ring, its jobs, the replies it is owed.

Each job's pixels are a view of the front-end's ring slot; its scores are written back there and a
reply record queued in the front-end's outbox. After each batch the inference thread flushes every
outbox as one Replies message per front-end.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from api.engine.serving.pipeline import BatchRun
from api.errors import first_line
from api.remote import wire
from api.remote.messages import DROPPED, FAILED, OK, REPLY, replies

logger = logging.getLogger(__name__)

ReplyRow = tuple[int, int, int, int, float, float]  # id, slot, status, batch size, forward s, queued s


@dataclass(eq=False)
class Frontend:
    sock: socket.socket
    index: int
    ring: wire.Ring | None = None
    closed: bool = False
    outbox: list[ReplyRow] = field(default_factory=list)
    # two inference threads (the served model and one being retired) may answer at once
    lock: threading.Lock = field(default_factory=threading.Lock)

    def reply(self, row: ReplyRow) -> None:
        with self.lock:
            self.outbox.append(row)

    def flush(self) -> None:
        """Send what the outbox holds as one Replies message (from an inference thread)."""
        with self.lock:
            if self.closed or not self.outbox:
                return
            outbox, self.outbox = self.outbox, []
            records = np.zeros(len(outbox), dtype=REPLY)
            for name, column in zip(
                ("id", "slot", "status", "size", "forward_s", "queued_s"), zip(*outbox, strict=True), strict=True
            ):
                records[name] = column
            try:
                for message in replies(records):
                    wire.send(self.sock, message)
            except OSError:
                self.closed = True


class RemoteJob:
    """One image of a front-end: its pixels are that front-end's slot, its answer goes back there."""

    __slots__ = ("deadline", "frontend", "id", "pixels", "queued_at", "slot")

    def __init__(self, frontend: Frontend, record: np.void, pixels: np.ndarray, now: float):
        self.frontend = frontend
        self.id = int(record["id"])
        self.slot = int(record["slot"])
        self.deadline = float(record["deadline"])
        self.pixels = pixels
        self.queued_at = now

    @property
    def abandoned(self) -> bool:
        ring = self.frontend.ring
        return (
            self.frontend.closed
            or ring is None
            or ring.state[self.slot] == wire.ABANDONED
            or time.monotonic() > self.deadline
        )

    def deliver(self, scores: np.ndarray, run: BatchRun) -> None:
        ring = self.frontend.ring
        if ring is not None and not self.frontend.closed:
            ring.scores(self.slot)[: len(scores)] = scores
            self.frontend.reply((self.id, self.slot, OK, run.size, run.forward_s, run.queued_s))

    def fail(self, error: BaseException) -> None:
        logger.error("forward pass failed: %s", first_line(error))
        self.frontend.reply((self.id, self.slot, FAILED, 0, 0.0, 0.0))

    def drop(self) -> None:
        self.frontend.reply((self.id, self.slot, DROPPED, 0, 0.0, 0.0))
