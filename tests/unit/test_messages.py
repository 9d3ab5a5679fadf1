"""The messages between front-ends and the engine process: every kind survives the wire as it was
built, a message cannot be built without its required fields, and bytes of anything else are refused."""

from __future__ import annotations

import socket

import msgspec
import numpy as np
import pytest

from api.engine.images.recipe import Recipe
from api.engine.model.served import Served
from api.remote import messages, wire
from api.remote.messages import (
    JOB,
    REPLY,
    Attach,
    Dropped,
    Explain,
    Explained,
    Heartbeat,
    Hello,
    Jobs,
    Load,
    Loaded,
    MalformedMessage,
    Metrics,
    MetricsAsk,
    ModelOffer,
    Refused,
    Replies,
    SwapFigures,
    Switch,
    Switched,
)
from tests.support import SERVED

RECIPE = Recipe("short", (256,), (224, 224), 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), max_size=None)
OFFER = ModelOffer(2, SERVED, RECIPE, 224, 0, {"architecture": "resnet50", "load_seconds": 1.5, "cpu": {"cpus": 2}})
FIGURES = SwapFigures("b" * 12, "a" * 12, "/models/new.pt", 1.25, 0.01, 0.2, 1.5, 0)


def _jobs() -> np.ndarray:
    records = np.zeros(3, dtype=JOB)
    records["id"], records["slot"], records["height"], records["width"] = [7, 8, 9], [0, 1, 2], 224, 224
    records["deadline"] = 12345.5
    return records


EVERY_KIND = [
    Hello(3, 64, 3 * 224 * 224, OFFER),
    Refused("no checkpoint at /models/x.pt"),
    Attach(128, 3 * 224 * 224, 3),
    Jobs(2, _jobs().tobytes()),
    Replies(np.zeros(2, dtype=REPLY).tobytes()),
    Heartbeat(41),
    MetricsAsk(),
    Metrics(b"# TYPE x gauge\nx 1\n"),
    Load(5, "fold_1/best_model.pt"),
    Load(6, None),
    Switch(OFFER),
    Switched(2),
    Loaded(5, 200, figures=FIGURES),
    Loaded(6, 409, error="a model swap is already running"),
    Explain(9, 2, 17, 224, 224, 0, 3),
    Explained(9, 200, None, 224, 224, "layer4", 0.42, 812.5),
    Explained(10, 503, "1 explanations are in progress (API_MAX_EXPLANATIONS=1); retry later"),
    Dropped("front-end 3 did not confirm the switch"),
]


def test_every_kind_is_covered() -> None:
    assert {type(message) for message in EVERY_KIND} == set(messages.KINDS)


@pytest.mark.parametrize("message", EVERY_KIND, ids=lambda m: type(m).__name__)
def test_every_kind_round_trips_over_a_real_socket(message: messages.Message) -> None:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with left, right:
        wire.send(left, message)
        received, fds = wire.receive(right)
    assert received == message and type(received) is type(message) and fds == []


def test_records_and_nested_types_come_back_typed() -> None:
    jobs = messages.decode(messages.encode(Jobs(2, _jobs().tobytes())))
    assert isinstance(jobs, Jobs) and jobs.generation == 2
    np.testing.assert_array_equal(jobs.rows(), _jobs())
    switch = messages.decode(messages.encode(Switch(OFFER)))
    assert isinstance(switch, Switch)
    assert isinstance(switch.model.served, Served) and switch.model.served.class_names == SERVED.class_names
    assert isinstance(switch.model.recipe, Recipe) and switch.model.recipe.crop == (224, 224)


def test_many_jobs_are_split_into_messages_that_fit() -> None:
    records = np.zeros(10_000, dtype=JOB)
    records["id"] = np.arange(10_000)
    chunks = list(messages.jobs(4, records))
    assert len(chunks) > 1 and all(len(messages.encode(c)) <= messages.MAX_MESSAGE for c in chunks)
    assert all(c.generation == 4 for c in chunks)
    np.testing.assert_array_equal(np.concatenate([c.rows() for c in chunks])["id"], records["id"])


def test_a_job_message_cannot_be_built_without_its_generation() -> None:
    with pytest.raises(TypeError):
        Jobs(records=_jobs().tobytes())  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        Loaded()  # type: ignore[call-arg]


@pytest.mark.parametrize(
    "data",
    [
        b"",  # nothing
        b"J" + _jobs().tobytes(),  # the old untyped wire format: a kind byte and raw records
        msgspec.msgpack.encode(["J", _jobs().tobytes()]),  # a Jobs without its generation
        msgspec.msgpack.encode(["J", "two", _jobs().tobytes()]),  # a generation of the wrong type
        msgspec.msgpack.encode(["Q", 1]),  # an unknown kind
        msgspec.msgpack.encode(["H", 1, 64, 10, {"generation": 1}]),  # a Hello whose model lacks fields
        msgspec.msgpack.encode({"generation": 1}),  # a map, not a tagged message
        messages.encode(Heartbeat(3))[:-1],  # truncated
    ],
)
def test_anything_else_is_refused(data: bytes) -> None:
    with pytest.raises(MalformedMessage):
        messages.decode(data)


def test_a_malformed_datagram_is_refused_by_the_receiver() -> None:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with left, right:
        left.send(b"J" + _jobs().tobytes())
        with pytest.raises(MalformedMessage):
            wire.receive(right)
        left.send(b"\x00" * (messages.MAX_MESSAGE + 1))  # longer than any message: truncated, refused
        with pytest.raises(MalformedMessage, match="longer than"):
            wire.receive(right)
        left.close()
        assert wire.receive(right) == (None, [])  # the peer has gone
