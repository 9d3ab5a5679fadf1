"""Whether the engine process still makes progress, as a front-end sees it.

The engine sends a Heartbeat every HEARTBEAT_S with a counter of its batches (api/remote/host/host.py).
It counts as stalled when it has said nothing for `stall_s` (it is stopped, or its main thread is
stuck), or when it finished no batch for `stall_s` while jobs of ours waited (its inference thread
is stuck). The second bound starts when our wait starts, so an idle engine is never "stalled".
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Liveness:
    stall_s: float
    heard_at: float = 0.0  # the engine's last message of any kind
    progress: int = -1  # its batch counter, as its last heartbeat said
    progress_at: float = 0.0  # when it last finished a batch (or our wait began)

    def connected(self, now: float) -> None:
        self.heard_at = self.progress_at = now
        self.progress = -1

    def heard(self, now: float) -> None:
        self.heard_at = now

    def beat(self, progress: int, now: float) -> None:
        if progress != self.progress:
            self.progress, self.progress_at = progress, now

    def advanced(self, now: float) -> None:
        """A batch answered, or our wait began."""
        self.progress_at = now

    def stalled(self, now: float, waiting: int) -> str | None:
        """Why the engine counts as stalled (None: it does not)."""
        if now - self.heard_at > self.stall_s:
            return f"the engine process said nothing for {now - self.heard_at:.1f}s"
        if waiting and now - self.progress_at > self.stall_s:
            return (
                f"the engine process finished no batch for {now - self.progress_at:.1f}s while {waiting} images waited"
            )
        return None
