"""Every message between a front-end process and the engine process, typed, and how each is encoded.

    front-end                                      engine (one per device)
                                               <-  Hello (what is served; + the board's fd) | Refused
    Attach [slots, slot layout] (+ the ring's fd)  ->
    Jobs [generation, job records]             ->  one record per image; the generation is the model
                                                   the pixels were prepared for, which must answer them
                                               <-  Replies [reply records]  (after each batch)
                                               <-  Heartbeat [progress]     (every HEARTBEAT_S)
    MetricsAsk                                 ->
                                               <-  Metrics [Prometheus text]
    Load [token, checkpoint]                   ->  a new model loads beside the served one
                                               <-  Switch [the new model] (to all)
    Switched [generation]                      ->  once no job for an older model is unsent
                                               <-  Loaded [token, status, error | figures] (to the caller)
                                               <-  Dropped [reason] (before the engine closes a link)

Messages are msgspec structs: frozen, every field typed, required unless it has a default, so a
message cannot be built without, say, its jobs' generation; `decode` checks every field's type and
raises `MalformedMessage` for anything else. Pixels and scores never cross the socket: they sit in
shared memory (api/remote/wire.py), and per image a job record goes one way and a reply record back.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import msgspec
import numpy as np

from api.engine.images.recipe import Recipe
from api.engine.model.served import Served

MAX_MESSAGE = 1 << 16  # bytes; records per message are capped to stay under this
HEARTBEAT_S = 0.5  # how often the engine says it is alive (and how far its batches got)

# One record per image, in a Jobs message: where its pixels are and until when it is wanted.
JOB = np.dtype(
    [
        ("id", "<u8"),
        ("slot", "<u4"),
        ("height", "<u2"),
        ("width", "<u2"),
        ("deadline", "<f8"),  # time.monotonic() (one clock: the same host)
        ("resize", "u1"),  # the pixels are a decoded image the engine resizes and crops
        ("_", "V7"),
    ]
)
# One record per image, in a Replies message: how it went (its scores are in its slot).
REPLY = np.dtype(
    [
        ("id", "<u8"),
        ("slot", "<u4"),
        ("status", "u1"),
        ("_", "V1"),
        ("size", "<u2"),
        ("forward_s", "<f4"),
        ("queued_s", "<f4"),
        ("__", "V8"),
    ]
)
OK, DROPPED, FAILED = 0, 1, 2  # a reply's status


class MalformedMessage(ValueError):
    """Bytes that are no message of this protocol (unknown kind, missing or mistyped field, truncated)."""


class _Message(msgspec.Struct, frozen=True, array_like=True, tag=True):
    pass


class ModelOffer(msgspec.Struct, frozen=True):
    """One model the engine serves, as a front-end needs it to prepare pixels and name answers."""

    generation: int
    served: Served
    recipe: Recipe
    reduce_to: int | None  # decode large JPEGs at a reduced scale, never below this side
    ship_decoded_bytes: int  # a decoded image up to this size goes to the engine as it is (0: never)
    described: dict[str, Any]  # GET /api/v1/model


class SwapFigures(msgspec.Struct, frozen=True):
    """What a finished swap reports."""

    version: str
    previous_version: str
    checkpoint: str
    load_s: float
    switch_s: float
    retire_s: float
    total_s: float
    frontends_dropped: int


class Hello(_Message, frozen=True, tag="H"):
    """To a front-end that connected (with the board's fd): who it is and what is served."""

    index: int  # its row on the board
    max_queue: int
    pixel_bytes: int  # the least pixel room a ring slot must have
    model: ModelOffer


class Refused(_Message, frozen=True, tag="F"):
    """The engine could not start serving (its model failed to load): the front-end stops with this."""

    error: str


class Attach(_Message, frozen=True, tag="A"):
    """A front-end's ring (its fd travels with this): `slots` slots of this layout."""

    slots: int
    pixel_bytes: int
    classes: int


class Jobs(_Message, frozen=True, tag="J"):
    """Images to classify, all prepared for the model of `generation`."""

    generation: int
    records: bytes  # JOB records

    def rows(self) -> np.ndarray:
        return np.frombuffer(self.records, JOB)


class Replies(_Message, frozen=True, tag="R"):
    records: bytes  # REPLY records

    def rows(self) -> np.ndarray:
        return np.frombuffer(self.records, REPLY)


class Heartbeat(_Message, frozen=True, tag="B"):
    """The engine is alive; `progress` counts its batches (and dropped jobs) so far."""

    progress: int


class MetricsAsk(_Message, frozen=True, tag="m"):
    pass


class Metrics(_Message, frozen=True, tag="M"):
    text: bytes  # the engine's Prometheus exposition


class Load(_Message, frozen=True, tag="L"):
    """Load `checkpoint` (None: the configured one again) beside the served model, then switch to it."""

    token: int
    checkpoint: str | None


class Switch(_Message, frozen=True, tag="S"):
    """Tag new jobs with this model's generation."""

    model: ModelOffer


class Switched(_Message, frozen=True, tag="W"):
    """This front-end tags new jobs with `generation`, and no job for an older one is unsent."""

    generation: int


class Loaded(_Message, frozen=True, tag="D"):
    """The answer to a Load: 200 with the figures, else the status (400, 409) and why."""

    token: int
    status: int
    error: str | None = None
    figures: SwapFigures | None = None


class Explain(_Message, frozen=True, tag="E"):
    """Explain `label` for the image in `slot` (prepared for the model of `generation`): Grad-CAM."""

    token: int
    generation: int
    slot: int
    height: int
    width: int
    resize: int  # 1: the pixels still need the recipe's resize + crop
    label: int


class Explained(_Message, frozen=True, tag="e"):
    """The answer to an Explain: 200 with the heatmap (H x W uint8) in the slot, else the status and why."""

    token: int
    status: int
    error: str | None = None
    height: int = 0
    width: int = 0
    layer: str = ""
    seconds: float = 0.0
    memory_mb: float = 0.0  # the explaining process's resident memory


class Dropped(_Message, frozen=True, tag="X"):
    """The engine closes this front-end's link (it may connect again)."""

    reason: str


Message = (
    Hello
    | Refused
    | Attach
    | Jobs
    | Replies
    | Heartbeat
    | MetricsAsk
    | Metrics
    | Load
    | Switch
    | Switched
    | Loaded
    | Explain
    | Explained
    | Dropped
)
KINDS: tuple[type[_Message], ...] = Message.__args__

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def encode(message: Message) -> bytes:
    return _encoder.encode(message)


def decode(data: bytes) -> Message:
    try:
        return _decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as error:
        raise MalformedMessage(f"not a message of the engine protocol: {error}") from None


def jobs(generation: int, records: np.ndarray) -> Iterator[Jobs]:
    """`records` (JOB) as Jobs messages, each under MAX_MESSAGE."""
    for chunk in _chunks(records):
        yield Jobs(generation, chunk)


def replies(records: np.ndarray) -> Iterator[Replies]:
    for chunk in _chunks(records):
        yield Replies(chunk)


def _chunks(records: np.ndarray) -> Iterator[bytes]:
    per = max(1, (MAX_MESSAGE - 64) // records.dtype.itemsize)
    for start in range(0, len(records), per):
        yield records[start : start + per].tobytes()
