"""The wire between front-end processes and the engine process: shared memory and a control socket.

    front-end                                      engine (one per device)
    ring (memfd, its own): slots of pixels -> read in place by the batch; scores written back
    JOBS  [id, slot, height, width, deadline,  ->  one record per image, many per message
           generation]
                                               <-  REPLIES [id, slot, status, batch size, times]
    LOAD [checkpoint]                          ->  a new model loads beside the served one
                                               <-  SWITCH [the new model, its generation] (to all)
    SWITCHED [generation]                      ->  once no job for the older model is unsent
                                               <-  LOADED (to the caller, once every front-end switched)
    board (memfd, the engine's): admitted and still-decoding images per front-end (admission
    over all front-ends under one lock; "more is on its way" for the batcher)

The control socket is a Unix SOCK_SEQPACKET socket in the abstract namespace (no file, nothing to
clean up, private to the host or pod): every message arrives whole, and the memfds travel over it
(SCM_RIGHTS), so shared memory has no names either and is freed when the last process closes it.
Pixels never cross the socket: per image the engine reads a 32-byte record and writes one back.
"""

from __future__ import annotations

import array
import fcntl
import json
import mmap
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

MAX_FRONTENDS = 256
MAX_MESSAGE = 1 << 16  # records per message are capped to stay under this
REPLY_MESSAGE_COST = 1024  # what a small message takes from a socket's send buffer (768 measured)

# message kinds (first byte)
HELLO = b"H"  # engine -> front-end: JSON (what is served, the recipe, the layout) + the board's fd
FAILED_LOAD = b"F"  # engine -> front-end: the load failed; JSON {"error": ...}
ATTACH = b"A"  # front-end -> engine: JSON {"slots": n} + the ring's fd
JOBS = b"J"  # front-end -> engine: REQUEST records
REPLIES = b"R"  # engine -> front-end: REPLY records
METRICS = b"M"  # front-end -> engine: asks; engine -> front-end: its Prometheus exposition
LOAD = b"L"  # front-end -> engine: JSON {"token", "checkpoint"}: load a model beside the served one
SWITCH = b"S"  # engine -> front-ends: JSON, the new model (as in HELLO): tag new jobs with its generation
SWITCHED = b"W"  # front-end -> engine: JSON {"generation"}: switched, and no job for an older one is unsent
LOADED = b"D"  # engine -> the front-end that asked: JSON {"token", "status", "error" | the swap's figures}
DROPPED_YOU = b"X"  # engine -> a front-end, before closing its link: JSON {"reason"} (it connects again)

REQUEST = np.dtype(
    [
        ("id", "<u8"),
        ("slot", "<u4"),
        ("height", "<u2"),
        ("width", "<u2"),
        ("deadline", "<f8"),
        ("resize", "u1"),
        ("_", "V3"),
        ("generation", "<u4"),  # the model the pixels were prepared for, and that must answer them
    ]
)
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
OK, DROPPED, FAILED = 0, 1, 2
ABANDONED = 1  # a ring slot's state byte: its front-end gave up waiting; the engine skips it


def address(group: str, device: str) -> str:
    """The engine's socket name for a server group and device (abstract namespace: leading NUL)."""
    return f"\0cat-breeds-api/{os.getuid()}/{group}/{device}"


def send(sock: socket.socket, kind: bytes, payload: bytes = b"", fds: tuple[int, ...] = ()) -> None:
    if fds:
        socket.send_fds(sock, [kind + payload], list(fds))
    else:
        sock.send(kind + payload)


def room_for_replies(sock: socket.socket, slots: int) -> int:
    """Let the engine's socket to a front-end hold a reply for every slot it has, so that a
    front-end that stops reading (its event loop hangs) never blocks the inference thread: each
    job takes one slot, and each batch sends a front-end at most one message. The kernel counts
    a small message as about 768 bytes (the default buffer holds some 270); metrics answers come
    on top. The kernel caps it at twice net.core.wmem_max. Answers how many replies it holds."""
    want = slots * REPLY_MESSAGE_COST + (1 << 20)
    if sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) < want:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, want // 2)  # the kernel doubles it
    return int(sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) - (1 << 20)) // REPLY_MESSAGE_COST


def send_json(sock: socket.socket, kind: bytes, data: dict[str, Any], fds: tuple[int, ...] = ()) -> None:
    send(sock, kind, json.dumps(data).encode(), fds)


def receive(sock: socket.socket, *, wait: bool = True) -> tuple[bytes, list[int]]:
    """One message and the descriptors that came with it; b"" when the peer has gone. Without
    `wait`, BlockingIOError when none is there. (socket.recv_fds ignores its flags in Python 3.11.)"""
    message, ancillary, _, _ = sock.recvmsg(MAX_MESSAGE, socket.CMSG_LEN(4), 0 if wait else socket.MSG_DONTWAIT)
    fds = array.array("i")
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    return message, list(fds)


def chunks(records: np.ndarray) -> Iterator[bytes]:
    per = max(1, (MAX_MESSAGE - 1) // records.dtype.itemsize)
    for start in range(0, len(records), per):
        yield records[start : start + per].tobytes()


def _memfd(name: str, size: int) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


@dataclass(frozen=True)
class Layout:
    """A ring's slot size, set by the engine: the largest image it takes, then the scores."""

    pixel_bytes: int
    classes: int

    @property
    def slot_bytes(self) -> int:
        return (self.pixel_bytes + 4 * self.classes + 63) // 64 * 64


class Ring:
    """A front-end's slots: state bytes, then `slots` x (pixels, scores)."""

    def __init__(self, fd: int, slots: int, layout: Layout):
        self.fd, self.slots, self.layout = fd, slots, layout
        self._header = (slots + 63) // 64 * 64
        self._map = mmap.mmap(fd, self._header + slots * layout.slot_bytes)
        self.state = np.frombuffer(self._map, np.uint8, slots)
        self._data = np.frombuffer(self._map, np.uint8, offset=self._header)

    @classmethod
    def create(cls, slots: int, layout: Layout) -> Ring:
        header = (slots + 63) // 64 * 64
        return cls(_memfd("cat-breeds-api-ring", header + slots * layout.slot_bytes), slots, layout)

    def pixels(self, slot: int, height: int, width: int) -> np.ndarray:
        start = slot * self.layout.slot_bytes
        return self._data[start : start + height * width * 3].reshape(height, width, 3)

    def scores(self, slot: int) -> np.ndarray:
        start = slot * self.layout.slot_bytes + self.layout.pixel_bytes
        return self._data[start : start + 4 * self.layout.classes].view(np.float32)


class Board:
    """Admission over all front-ends: images admitted and images still decoding, per front-end.

    Each front-end writes only its own row; admission reads the sum under a POSIX record lock
    (per process, so it holds between front-ends that share the same memfd)."""

    def __init__(self, fd: int):
        self.fd = fd
        self._map = mmap.mmap(fd, 2 * MAX_FRONTENDS * 8)
        counts = np.frombuffer(self._map, np.int64).reshape(2, MAX_FRONTENDS)
        self.admitted, self.decoding = counts[0], counts[1]

    @classmethod
    def create(cls) -> Board:
        return cls(_memfd("cat-breeds-api-board", 2 * MAX_FRONTENDS * 8))

    @contextmanager
    def lock(self) -> Iterator[None]:
        fcntl.lockf(self.fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN)

    def on_its_way(self) -> int:
        return int(self.decoding.sum())

    def in_progress(self) -> int:
        return int(self.admitted.sum())

    def clear(self, index: int) -> None:
        """A front-end left: what it had admitted is no longer in progress."""
        with self.lock():
            self.admitted[index] = 0
            self.decoding[index] = 0
