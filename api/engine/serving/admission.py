"""Admission: a bound on the images in progress, checked before a byte of them is read (503 beyond).

One implementation for both serving objects. The in-process `Engine` (its `Batcher`) counts its own
images. A front-end process's link counts the images it admitted (and those still decoding) and,
while an engine process is connected, mirrors them into its own row of that engine's board
(api/remote/wire.py): admission then compares the sum over every front-end's row with
API_MAX_QUEUE under the board's lock. The counts outlive an engine: a new one gets them when the
front-end connects, and while none is connected admission counts this front-end's images alone.

`decoding` (admitted, not yet queued) is what tells a batch that more images are on their way.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol

import numpy as np

from api.engine.serving.pipeline import Ticket
from api.errors import Overloaded


class SharedCounts(Protocol):
    """Every front-end's counts, one row each, in memory the engine process shares (wire.Board)."""

    admitted: np.ndarray
    decoding: np.ndarray

    def lock(self) -> AbstractContextManager[object]: ...

    def in_progress(self) -> int: ...


class Admission:
    def __init__(self, max_queue: int, *, on_depth: Callable[[int], None] | None = None):
        self.max_queue = max_queue
        self.admitted = 0  # admitted here and not answered
        self.decoding = 0  # of those, not queued yet ("more is on its way" for the batcher)
        self._on_depth = on_depth
        self._lock = threading.Lock()
        self._shared: SharedCounts | None = None
        self._row = 0

    def attach(self, shared: SharedCounts, row: int, max_queue: int) -> None:
        """An engine process connected: our counts go into our row of its board."""
        with self._lock:
            self._shared, self._row, self.max_queue = shared, row, max_queue
            with shared.lock():
                shared.admitted[row] = self.admitted
            shared.decoding[row] = self.decoding

    def detach(self) -> None:
        with self._lock:
            self._shared = None

    @contextmanager
    def admit(self, images: int) -> Iterator[Ticket]:
        """Reserve room for `images` before reading or decoding them, or refuse with 503 (Overloaded).
        The ticket counts those that reached the queue; the rest are given back on exit."""
        with self._lock:
            shared = self._shared
            if shared is not None:
                with shared.lock():
                    self._check(shared.in_progress(), images)
                    self.admitted += images
                    shared.admitted[self._row] = self.admitted
            else:
                self._check(self.admitted, images)
                self.admitted += images
            self._decoding(images)
            depth = self.admitted
        self._report(depth)
        ticket = Ticket()
        try:
            yield ticket
        finally:
            with self._lock:
                self.admitted -= images
                shared = self._shared
                if shared is not None:
                    with shared.lock():
                        shared.admitted[self._row] = self.admitted
                self._decoding(ticket.queued - images)  # those that never reached the queue
                depth = self.admitted
            self._report(depth)

    def sent(self, images: int) -> None:
        """`images` were decoded and queued (here, or sent to the engine process)."""
        with self._lock:
            self._decoding(-images)

    def _check(self, in_progress: int, images: int) -> None:
        if in_progress + images > self.max_queue:
            raise Overloaded(
                f"over capacity: {in_progress} images in progress (API_MAX_QUEUE={self.max_queue}); retry",
                retry_after_s=1,
            )

    def _decoding(self, change: int) -> None:
        self.decoding += change
        if self._shared is not None:
            self._shared.decoding[self._row] = self.decoding

    def _report(self, depth: int) -> None:
        if self._on_depth is not None:
            self._on_depth(depth)
