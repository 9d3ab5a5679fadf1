"""Admission over every front-end of an engine: a front-end's admitted images, mirrored on the board.

Each front-end counts the images it admitted (and those still decoding) itself and writes them into
its own row of the engine's board (api/remote/wire.py); admission compares the sum over all rows
with API_MAX_QUEUE under the board's lock. The counts outlive an engine: a new one gets them when the
front-end connects, and while none is connected admission counts this front-end's images alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from api.engine.pipeline import Ticket
from api.errors import Overloaded
from api.remote import wire


class Admission:
    def __init__(self, max_queue: int):
        self.max_queue = max_queue
        self.admitted = 0  # admitted here and not answered
        self.decoding = 0  # of those, not sent to the engine yet ("more is on its way" for its batcher)
        self._board: wire.Board | None = None
        self._row = 0

    def attach(self, board: wire.Board, row: int, max_queue: int) -> None:
        """A new engine: our counts go into our row of its board."""
        self._board, self._row, self.max_queue = board, row, max_queue
        with board.lock():
            board.admitted[row] = self.admitted
        board.decoding[row] = self.decoding

    def detach(self) -> None:
        self._board = None

    @contextmanager
    def admit(self, images: int) -> Iterator[Ticket]:
        """Reserve room for `images`, or refuse with 503 (Overloaded)."""
        board = self._board
        if board is not None:
            with board.lock():
                self._check(board.in_progress(), images)
                self.admitted += images
                board.admitted[self._row] = self.admitted
        else:
            self._check(self.admitted, images)
            self.admitted += images
        self._decoding(images)
        ticket = Ticket()
        try:
            yield ticket
        finally:
            self.admitted -= images
            board = self._board
            if board is not None:
                with board.lock():
                    board.admitted[self._row] = self.admitted
            self._decoding(ticket.queued - images)  # those that never reached the engine

    def sent(self, images: int) -> None:
        """`images` were decoded and sent to the engine."""
        self._decoding(-images)

    def _check(self, in_progress: int, images: int) -> None:
        if in_progress + images > self.max_queue:
            raise Overloaded(
                f"over capacity: {in_progress} images in progress (API_MAX_QUEUE={self.max_queue}); retry",
                retry_after_s=1,
            )

    def _decoding(self, change: int) -> None:
        self.decoding += change
        if self._board is not None:
            self._board.decoding[self._row] = self.decoding
