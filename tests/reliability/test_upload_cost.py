"""No upload costs more than about what a large ordinary photo costs (docs/operations.md).

Every file of the adversarial corpus (`tests.adversarial`) is decoded and preprocessed as the
service does, each in a process of its own, and held to twice the reference: a 12-megapixel phone
photo (baseline JPEG, EXIF-rotated) decoded at full scale, measured the same way in the same run.
Then the same files are sent at once to a real server: it stays up and ready, its memory peak
stays under the bound, and it still classifies a photo afterwards.
"""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import httpx
import pytest

from api.config import Settings
from api.engine.images.budget import DecodeBudget
from tests.adversarial import BOUND, REFERENCE, Measured, corpus, least, measure, reference, table
from tests.helpers import CLI, served_process

# Ordinary photos in every format: the budget must let them through, not only refuse bombs.
ORDINARY = [
    "photo_12mp.jpg",
    "photo_12mp_progressive.jpg",
    "photo_12mp.png",
    "photo_12mp_interlaced.png",
    "photo_12mp.avif",
    "photo_7mp.webp",
    "photo_12mp_deflate.tif",
    "photo_12mp_cmyk.jpg",
    "photo_50mp.jpg",
    "panorama_12000x600.jpg",
]
# Degenerate shapes that preprocessing now bounds instead of refusing.
BOUNDED = ["strip_50000x1.png", "strip_1x50000.png", "strip_25000x2_rotated.jpg", "strip_40000x3.gif"]


@pytest.fixture(scope="module")
def files() -> dict[str, bytes]:
    return corpus()


@pytest.fixture(scope="module")
def ref(files: dict[str, bytes]) -> Measured:
    return reference(files)


def _measured(name: str, data: bytes, ref: Measured) -> Measured:
    """CPU time is noisy on a shared 2-core machine: a file near the bound is measured three times,
    as the reference is, and the least counts for both."""
    runs = [measure(name, data)]
    if max(runs[0].cpu_s / ref.cpu_s, runs[0].peak_mb / ref.peak_mb) > BOUND * 0.7:
        runs += [measure(name, data) for _ in range(2)]
    return least(runs)


def test_every_upload_costs_at_most_twice_a_12mp_photo(files: dict[str, bytes], ref: Measured) -> None:
    rows = [_measured(name, data, ref) for name, data in files.items() if name != REFERENCE]
    report = table(rows, ref)
    print("\n" + report)
    over = [r.name for r in rows if r.cpu_s > BOUND * ref.cpu_s or r.peak_mb > BOUND * ref.peak_mb]
    assert not over, f"over {BOUND}x the reference: {over}\n{report}"
    outcomes = {r.name: r.outcome for r in rows}
    assert {name: outcomes[name] for name in ORDINARY + BOUNDED} == dict.fromkeys(ORDINARY + BOUNDED, "ok"), report
    assert all(o == "ok" or o.startswith(("413 ", "400 ")) for o in outcomes.values()), report
    # The reference is a real cost, not a tiny one that would make every bound meaningless.
    assert ref.peak_mb > 40 and ref.outcome == "ok", report


def test_refusals_say_what_is_wrong_and_what_would_pass(files: dict[str, bytes]) -> None:
    from api.engine.images.decode import decode_image
    from api.errors import ImageTooLarge

    budget = DecodeBudget(Settings(_env_file=None).decode_budget_mp)
    for name in ("rgba_7000x7000.png", "tiff_tile_8192_for_64x64.tif", "progressive_2000_scans.jpg", "photo_12mp.webp"):
        with pytest.raises(ImageTooLarge) as refused:
            decode_image(files[name], max_pixels=50_000_000, reduce_to=235, budget=budget)
        message = refused.value.message
        assert refused.value.status == 413 and refused.value.code == "image_too_costly"
        assert "MB" in message and "API_DECODE_BUDGET_MP" in message, message
        assert "downscale it to about" in message and "MP or less" in message, message


def test_a_larger_budget_lets_costlier_images_through(files: dict[str, bytes]) -> None:
    from api.engine.images.budget import DecodeBudget
    from api.engine.images.decode import decode_image

    data = files["photo_12mp.webp"]
    with pytest.raises(Exception, match="API_DECODE_BUDGET_MP"):
        decode_image(data, max_pixels=50_000_000, budget=DecodeBudget(22))
    assert decode_image(data, max_pixels=50_000_000, budget=DecodeBudget(40)).image.size == (4000, 3000)


def _status_kb(pid: int, field: str) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith(field))


def test_a_burst_of_costly_uploads_leaves_the_server_up_and_bounded(
    files: dict[str, bytes], tiny_checkpoint: Path, tmp_path: Path, chelsea_jpeg: bytes
) -> None:
    """API_MAX_QUEUE of the costliest accepted and refused files at once, against a real process."""
    costly = _COSTLY
    queue, threads = len(costly), 2
    env = {
        "API_CHECKPOINT_PATH": tiny_checkpoint,
        "API_MODEL_NAME": "test_resnet",
        "API_MAX_QUEUE": queue,
        "API_NUM_THREADS": threads,
        "API_MAX_UPLOAD_MB": 40,
        "MALLOC_ARENA_MAX": 2,  # as the image and `make run` set it
    }
    with served_process([CLI, "serve"], tmp_path, **env) as server:
        before_kb = _status_kb(server.pid, "VmRSS:")
        Path(f"/proc/{server.pid}/clear_refs").write_text("5")  # the peak counts from here

        def send(name: str) -> int:
            upload = {"file": (name, files[name])}
            return httpx.post(server.url + "/api/v1/predict", files=upload, timeout=120).status_code

        with concurrent.futures.ThreadPoolExecutor(queue) as pool:
            statuses = dict(zip(costly, pool.map(send, costly), strict=True))
        peak_mb = (_status_kb(server.pid, "VmHWM:") - before_kb) / 1024
        assert set(statuses.values()) <= {200, 413, 400}, statuses
        assert server.process.poll() is None
        assert httpx.get(server.url + "/health", timeout=10).status_code == 200
        answer = httpx.post(server.url + "/api/v1/predict", files={"file": ("cat.jpg", chelsea_jpeg)}, timeout=30)
        assert answer.status_code == 200 and answer.json()["predictions"]
    # At most `threads` uploads decode at once, each within the budget; the bodies are held meanwhile.
    budget_mb = DecodeBudget(Settings(_env_file=None).decode_budget_mp).allowance.memory / 1024**2  # MiB, as the peak
    bodies_mb = sum(len(files[name]) for name in costly) / 1024**2
    bound_mb = threads * budget_mb + 2 * bodies_mb + 64
    print(f"\nburst of {queue}: {statuses}; peak {peak_mb:.0f} MB above the idle server (bound {bound_mb:.0f} MB)")
    assert peak_mb <= bound_mb, f"peak {peak_mb:.0f} MB above the idle server, bound {bound_mb:.0f} MB: {statuses}"


# The files whose decode is costliest when accepted, and bombs that must be refused before they cost.
_COSTLY = [
    "photo_12mp.png",
    "photo_12mp_interlaced.png",
    "gray16_4000x3000.png",
    "photo_12mp.avif",
    "palette_alpha_4000x3000.png",
    "float_3000x3000.tif",
    "photo_7mp.webp",
    "strip_50000x1.png",
    "rgba_7000x7000.png",
    "constant_7000x7000.webp",
    "progressive_2000_scans.jpg",
    "tiff_tile_8192_for_64x64.tif",
]
