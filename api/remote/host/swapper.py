"""A model swap, as one state machine in the engine process.

    IDLE --Load--> LOADING --loaded--> SWITCHING --every front-end switched--> RETIRING --drained--> IDLE
                      |                    (one that does not within                          (answer 200,
                      |                     API_REQUEST_TIMEOUT_S is disconnected)             with figures)
                      +--refused, failed, or past API_MODEL_LOAD_TIMEOUT_S--> IDLE (answer 400)

A Load while not IDLE is answered 409. Every transition runs on the engine's main thread: the load
runs on a thread of its own (its risky part in a killable process, api/remote/host/aside.py) and
hands its outcome back through `SwapHost.call_soon`; so does the retirement. The state is back to
IDLE before any answer is sent, so a caller may load again as soon as it has its answer. A load past
its deadline is abandoned: answered 400 at once, its process killed, and a model it still finishes
is closed, never served.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import msgspec

from api.errors import ModelLoadError, first_line
from api.remote.host.aside import AsideFailed
from api.remote.messages import Loaded, SwapFigures

if TYPE_CHECKING:
    from api.engine.serving.service import Engine

logger = logging.getLogger(__name__)


class State(enum.Enum):
    IDLE = "idle"
    LOADING = "loading"
    SWITCHING = "switching"
    RETIRING = "retiring"


# The host's front-end (api/remote/host/host.py): the swap only names it (`index`) and hands it back.
Frontend = Any


class SwapHost(Protocol):
    """What the engine process does for a swap (api/remote/host/host.py)."""

    def vet(self, requested: str | None) -> Path: ...
    def load_beside(self, path: Path, *, deadline: float, cancel: threading.Event) -> Engine: ...
    def switch_to(self, engine: Engine) -> tuple[int, set[Frontend]]: ...
    def retire(self, generation: int) -> None: ...
    def discard(self, engine: Engine) -> None: ...
    def drop(self, frontend: Frontend, reason: str) -> None: ...
    def answer(self, frontend: Frontend, answer: Loaded) -> None: ...
    def call_soon(self, call: Callable[[], None]) -> None: ...


@dataclass(eq=False)
class Swap:
    token: int
    requester: Frontend
    checkpoint: str
    started: float
    deadline: float
    cancel: threading.Event = field(default_factory=threading.Event)
    previous: int = 0  # the generation being replaced
    previous_version: str = ""
    version: str = ""
    switch_started: float = 0.0
    retire_started: float = 0.0
    waiting: set[Frontend] = field(default_factory=set)
    dropped: int = 0


class Swapper:
    def __init__(self, host: SwapHost, *, load_timeout_s: float, switch_timeout_s: float):
        self.host = host
        self.load_timeout_s = load_timeout_s
        self.switch_timeout_s = switch_timeout_s
        self.state = State.IDLE
        self.swap: Swap | None = None

    # --- events (the engine's main thread) -------------------------------------------------------

    def request(self, frontend: Frontend, token: int, checkpoint: str | None, served_version: str) -> None:
        """A Load arrived."""
        if self.swap is not None:
            swap = self.swap
            self.host.answer(
                frontend,
                Loaded(
                    token,
                    409,
                    error=f"a model swap is already running ({self.state.value} {swap.checkpoint}, for "
                    f"{time.monotonic() - swap.started:.0f}s); wait for it to finish",
                ),
            )
            return
        try:
            path = self.host.vet(checkpoint)
        except ModelLoadError as error:
            self._refuse(frontend, token, checkpoint or "the configured checkpoint", str(error), served_version)
            return
        now = time.monotonic()
        swap = self.swap = Swap(token, frontend, str(path), now, now + self.load_timeout_s)
        swap.previous_version = served_version
        self.state = State.LOADING
        logger.info("loading %s beside the served model (version %s)", path, served_version)
        threading.Thread(target=self._load, args=(swap, path), name="model-load", daemon=True).start()

    def switched(self, frontend: Frontend) -> None:
        """A front-end confirmed the switch, or left."""
        if self.state is State.SWITCHING and self.swap is not None:
            self.swap.waiting.discard(frontend)
            self._maybe_retire(self.swap)

    def tick(self, now: float) -> None:
        """Deadlines: a load past API_MODEL_LOAD_TIMEOUT_S is abandoned; a front-end that has not
        switched within API_REQUEST_TIMEOUT_S is disconnected (its event loop does not run: whatever
        it still holds for the old model is past its deadline anyway; it connects again by itself)."""
        swap = self.swap
        if swap is None:
            return
        if self.state is State.LOADING and now > swap.deadline:
            swap.cancel.set()
            self._fail(
                swap,
                f"it did not load within {self.load_timeout_s:g}s (API_MODEL_LOAD_TIMEOUT_S); the load was abandoned",
            )
        elif self.state is State.SWITCHING and now - swap.switch_started >= self.switch_timeout_s:
            for frontend in list(swap.waiting):
                reason = (
                    f"front-end {frontend.index} did not confirm the switch to model version {swap.version} within "
                    f"{now - swap.switch_started:.1f}s (API_REQUEST_TIMEOUT_S={self.switch_timeout_s:g}): disconnected"
                )
                swap.dropped += 1
                self.host.drop(frontend, reason)  # leaving calls switched(): the last one out retires the old model

    # --- the load thread and what it hands back ---------------------------------------------------

    def _load(self, swap: Swap, path: Path) -> None:
        engine: Engine | None = None
        error: str | None = None
        try:
            engine = self.host.load_beside(path, deadline=swap.deadline, cancel=swap.cancel)
        except (ModelLoadError, AsideFailed) as refused:
            error = str(refused)
        except Exception as unexpected:  # the served model stays, whatever happened
            logger.exception("model load failed unexpectedly")
            error = f"unexpected {type(unexpected).__name__}: {first_line(unexpected)}"
        self.host.call_soon(lambda: self._loaded(swap, engine, error))

    def _loaded(self, swap: Swap, engine: Engine | None, error: str | None) -> None:
        if swap is not self.swap:  # abandoned at its deadline (answered already): never served
            if engine is not None:
                logger.info("the abandoned load of %s finished late; its model is released", swap.checkpoint)
                self.host.discard(engine)
            return
        if engine is None:
            self._fail(swap, error or "unknown")
            return
        self.state = State.SWITCHING
        swap.version = engine.served.version
        swap.switch_started = time.monotonic()
        swap.previous, swap.waiting = self.host.switch_to(engine)
        logger.info("switching to model version %s: %d front-ends", swap.version, len(swap.waiting))
        self._maybe_retire(swap)

    def _maybe_retire(self, swap: Swap) -> None:
        if swap.waiting:
            return
        self.state = State.RETIRING
        swap.retire_started = time.monotonic()
        self.host.retire(swap.previous)  # calls back retired() once the old model drained

    def retired(self) -> None:
        """The old model drained and was released (the retire thread, via call_soon)."""
        swap = self.swap
        if self.state is not State.RETIRING or swap is None:
            return
        now = time.monotonic()
        figures = SwapFigures(
            version=swap.version,
            previous_version=swap.previous_version,
            checkpoint=swap.checkpoint,
            load_s=round(swap.switch_started - swap.started, 3),
            switch_s=round(swap.retire_started - swap.switch_started, 4),
            retire_s=round(now - swap.retire_started, 4),
            total_s=round(now - swap.started, 3),
            frontends_dropped=swap.dropped,
        )
        logger.info(
            "model version %s serving (was %s)",
            swap.version,
            swap.previous_version,
            extra=msgspec.structs.asdict(figures),
        )
        self._idle()
        self.host.answer(swap.requester, Loaded(swap.token, 200, figures=figures))

    # --- endings -----------------------------------------------------------------------------------

    def _fail(self, swap: Swap, reason: str) -> None:
        logger.error("model load failed, the served model (version %s) stays: %s", swap.previous_version, reason)
        self._idle()  # first: a Load right after the answer is taken
        self.host.answer(
            swap.requester, Loaded(swap.token, 400, error=f"model load failed ({swap.checkpoint}): {reason}")
        )

    def _refuse(self, frontend: Frontend, token: int, checkpoint: str, reason: str, served_version: str) -> None:
        logger.error("model load refused, the served model (version %s) stays: %s", served_version, reason)
        self.host.answer(frontend, Loaded(token, 400, error=f"model load failed ({checkpoint}): {reason}"))

    def _idle(self) -> None:
        self.state = State.IDLE
        self.swap = None
