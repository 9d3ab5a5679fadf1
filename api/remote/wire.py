"""The wire between front-end processes and the engine process: a control socket and shared memory.

    front-end                                      engine (one per device)
    ring (memfd, its own): slots of pixels     ->  read in place by the batch; scores written back
    board (memfd, the engine's): admitted and  <-> admission over all front-ends under one lock;
      still-decoding images per front-end          "more is on its way" for the batcher
    messages (api/remote/messages.py)          <-> over the socket below

The control socket is a Unix SOCK_SEQPACKET socket in the abstract namespace (no file, nothing to
clean up, private to the host or pod): every message arrives whole, and the memfds travel over it
(SCM_RIGHTS), so shared memory has no names either and is freed when the last process closes it.
Pixels never cross the socket: per image the engine reads a 32-byte record and writes one back.
"""

from __future__ import annotations

import array
import fcntl
import mmap
import os
import socket
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from api.remote.messages import MAX_MESSAGE, MalformedMessage, Message, decode, encode

MAX_FRONTENDS = 256
REPLY_MESSAGE_COST = 1024  # what a small message takes from a socket's send buffer (768 measured)
ABANDONED = 1  # a ring slot's state byte: its front-end gave up waiting; the engine skips it


def address(group: str, device: str) -> str:
    """The engine's socket name for a server group and device (abstract namespace: leading NUL)."""
    return f"\0cat-breeds-api/{os.getuid()}/{group}/{device}"


def send(sock: socket.socket, message: Message, fds: tuple[int, ...] = (), *, flags: int = 0) -> None:
    """One message (and descriptors) as one datagram; `flags=socket.MSG_DONTWAIT` never waits for room."""
    data = encode(message)
    if fds:
        socket.send_fds(sock, [data], list(fds), flags)
    else:
        sock.send(data, flags)


def receive(sock: socket.socket, *, wait: bool = True) -> tuple[Message | None, list[int]]:
    """One message and the descriptors that came with it; None when the peer has gone. Without
    `wait`, BlockingIOError when none is there; MalformedMessage for bytes of another protocol.
    (socket.recv_fds ignores its flags in Python 3.11.)"""
    data, ancillary, flags, _ = sock.recvmsg(MAX_MESSAGE, socket.CMSG_LEN(16), 0 if wait else socket.MSG_DONTWAIT)
    fds = array.array("i")
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    if not data:
        return None, list(fds)
    if flags & socket.MSG_TRUNC:
        raise MalformedMessage(f"a message longer than {MAX_MESSAGE} bytes")
    return decode(data), list(fds)


def peer_pid(sock: socket.socket) -> int:
    """The process at the other end of a Unix socket (the kernel's SO_PEERCRED)."""
    pid, _, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return int(pid)


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


def _memfd(name: str, size: int) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


@dataclass(frozen=True)
class Layout:
    """A ring's slot size: the largest image it takes (at least what the engine asks), then the answer:
    room for the scores and their spread across folds (a fold ensemble's), so that a swap between one
    checkpoint and k folds keeps the rings."""

    pixel_bytes: int
    classes: int

    @property
    def slot_bytes(self) -> int:
        return (self.pixel_bytes + 8 * self.classes + 63) // 64 * 64


class Ring:
    """A front-end's slots: state bytes, then `slots` x (pixels, scores)."""

    def __init__(self, fd: int, slots: int, layout: Layout):
        self.fd, self.slots, self.layout = fd, slots, layout
        self._header = (slots + 63) // 64 * 64
        if os.fstat(fd).st_size < self._header + slots * layout.slot_bytes:  # reading past it: SIGBUS
            raise ValueError(f"the ring's memory is smaller than {slots} slots of {layout.slot_bytes} bytes")
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

    def heatmap(self, slot: int, height: int, width: int) -> np.ndarray:
        """An explanation's heatmap (H x W uint8), written over the slot's pixels."""
        start = slot * self.layout.slot_bytes
        return self._data[start : start + height * width].reshape(height, width)

    def scores(self, slot: int) -> np.ndarray:
        """The slot's answer: 2 x classes float32 (scores, then spread; one model fills the first half)."""
        start = slot * self.layout.slot_bytes + self.layout.pixel_bytes
        return self._data[start : start + 8 * self.layout.classes].view(np.float32)


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
