"""A swap's risky work runs in a process the engine can stop: at its deadline, above its memory
ceiling, or when abandoned; a failure says why. Real child processes, real clocks and memory."""

from __future__ import annotations

import sys
import threading

import pytest

from api.remote.host.aside import MIB, AsideFailed, resident_bytes, run_aside

PYTHON = sys.executable


def test_a_process_that_finishes_reports_its_time_and_peak_memory() -> None:
    done = run_aside([PYTHON, "-c", "import sys; sys.stdin.read()"], b"payload", timeout_s=60, memory_limit=1 << 40)
    assert done.seconds > 0 and done.peak_bytes >= 0


def test_a_failure_says_why_with_the_last_line_it_printed() -> None:
    script = "import sys; print('working'); print('no checkpoint at /m/x.pt'); sys.exit(3)"
    with pytest.raises(AsideFailed, match=r"^no checkpoint at /m/x\.pt$"):
        run_aside([PYTHON, "-c", script], b"", timeout_s=60, memory_limit=1 << 40)


def test_a_process_that_hangs_is_killed_at_its_deadline() -> None:
    with pytest.raises(AsideFailed, match=r"did not load within 0\.5s"):
        run_aside([PYTHON, "-c", "import time; time.sleep(600)"], b"", timeout_s=0.5, memory_limit=1 << 40)


def test_a_process_that_grows_past_its_memory_ceiling_is_killed() -> None:
    grow = "import time\nheld = []\nwhile True:\n    held.append(bytearray(16 << 20))\n    time.sleep(0.005)\n"
    with pytest.raises(AsideFailed, match="more than 256 MiB"):
        run_aside([PYTHON, "-c", grow], b"", timeout_s=120, memory_limit=256 * MIB)


def test_a_process_reading_an_endless_file_is_stopped_and_its_memory_returned() -> None:
    """What a loader pointed at /dev/zero did to the engine, done to a process of its own."""
    reader = "import sys\ndata = open('/dev/zero', 'rb').read()\n"
    with pytest.raises(AsideFailed, match="more than 512 MiB"):
        run_aside([PYTHON, "-c", reader], b"", timeout_s=120, memory_limit=512 * MIB)


def test_an_abandoned_load_is_killed() -> None:
    cancel = threading.Event()
    threading.Timer(0.3, cancel.set).start()
    with pytest.raises(AsideFailed, match="abandoned"):
        run_aside(
            [PYTHON, "-c", "import time; time.sleep(600)"], b"", timeout_s=600, memory_limit=1 << 40, cancel=cancel
        )


def test_a_process_killed_by_a_signal_says_so() -> None:
    with pytest.raises(AsideFailed, match="ended by signal 9"):
        run_aside([PYTHON, "-c", "import os; os.kill(os.getpid(), 9)"], b"", timeout_s=60, memory_limit=1 << 40)


def test_resident_memory_of_a_process_that_is_gone_is_zero() -> None:
    assert resident_bytes(2**22 + 12345) == 0
