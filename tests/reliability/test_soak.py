"""A soak over odd and broken files: memory comes back, and the log stays structured and quiet.

A real server (`cat-breeds-api serve`, as deployed: MALLOC_ARENA_MAX=2) is sent 2,500 uploads
cycling through a mixed corpus (JPEG, PNG, GIF, BMP, WebP, TIFF in five compressions, AVIF; eight
modes; valid, truncated and bit-flipped). Its resident memory after the last request stays within
SOAK_DRIFT_MB of what it was after the first 100 (docs/operations.md). A corrupt upload is the
client's fault: it is answered 400 and is not logged at ERROR, and nothing the C decoders print
reaches the log stream as an unstructured line.
"""

from __future__ import annotations

import concurrent.futures
import io
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import skimage.data
from PIL import Image

from tests.helpers import CLI, served_process
from tests.support import rss_mb as _rss_mb

REQUESTS = 2500
SOAK_DRIFT_MB = 30


def _save(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _broken(data: bytes, seed: int) -> list[bytes]:
    """Truncated, and with bytes flipped past the header: what disks, networks and fuzzers make."""
    rng = np.random.default_rng(seed)
    flipped = bytearray(data)
    for at in rng.integers(min(64, len(data) - 1), len(data), size=max(4, len(data) // 500)):
        flipped[at] ^= int(rng.integers(1, 256))
    return [data[: len(data) // 2], data[: max(16, len(data) // 8)], bytes(flipped)]


def mixed_corpus() -> list[tuple[str, bytes]]:
    photos = [Image.fromarray(skimage.data.chelsea()), Image.fromarray(skimage.data.coffee())]
    photos.append(photos[1].resize((800, 533)))
    files: list[tuple[str, bytes]] = []
    for index, photo in enumerate(photos):
        variants = {
            "jpeg": _save(photo, "JPEG", quality=85),
            "progressive.jpeg": _save(photo, "JPEG", quality=85, progressive=True),
            "png": _save(photo, "PNG"),
            "rgba.png": _save(photo.convert("RGBA"), "PNG"),
            "gray16.png": _save(Image.fromarray(np.asarray(photo.convert("L"), np.uint16) * 257), "PNG"),
            "palette.gif": _save(photo.convert("P"), "GIF"),
            "bmp": _save(photo, "BMP"),
            "bilevel.bmp": _save(photo.convert("1"), "BMP"),
            "webp": _save(photo, "WEBP", quality=80),
            "lossless.webp": _save(photo, "WEBP", lossless=True),
            "avif": _save(photo, "AVIF", quality=50, speed=10),
        }
        for compression in ("tiff_lzw", "tiff_adobe_deflate", "jpeg", "packbits", "raw"):
            variants[f"{compression}.tif"] = _save(photo, "TIFF", compression=compression)
        variants["cmyk.tif"] = _save(photo.convert("CMYK"), "TIFF", compression="tiff_lzw")
        for name, data in variants.items():
            files.append((f"{index}.{name}", data))
            files.extend((f"{index}.broken{n}.{name}", bad) for n, bad in enumerate(_broken(data, seed=index)))
    return files


@pytest.mark.timeout(600)
def test_soak_over_odd_files_returns_its_memory_and_logs_quietly(tiny_checkpoint: Path, tmp_path: Path) -> None:
    files = mixed_corpus()
    env = {
        "API_CHECKPOINT_PATH": tiny_checkpoint,
        "API_MODEL_NAME": "test_resnet",
        "API_NUM_THREADS": 2,
        "MALLOC_ARENA_MAX": 2,  # as the image and `make run` set it
    }
    with served_process([CLI, "serve"], tmp_path, **env) as server, httpx.Client(timeout=60) as client:
        outcomes: dict[int, int] = {}

        def send(i: int) -> int:
            name, data = files[i % len(files)]
            status = client.post(server.url + "/api/v1/predict", files={"file": (name, data)}).status_code
            outcomes[status] = outcomes.get(status, 0) + 1
            return status

        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            list(pool.map(send, range(100)))
            after_first_100 = _rss_mb(server.pid)
            list(pool.map(send, range(100, REQUESTS)))
        after_last = _rss_mb(server.pid)
        assert server.process.poll() is None
        assert httpx.get(server.url + "/health", timeout=10).status_code == 200
        server.stop()
        log = server.log().splitlines()
    drift = after_last - after_first_100
    print(f"\nsoak: {REQUESTS} uploads {dict(sorted(outcomes.items()))}; RSS after 100 {after_first_100:.0f} MB, "
          f"after {REQUESTS} {after_last:.0f} MB, drift {drift:+.1f} MB (bound {SOAK_DRIFT_MB} MB)")  # fmt: skip
    assert set(outcomes) <= {200, 400, 413, 415}, outcomes
    assert outcomes.get(400, 0) > REQUESTS // 4 and outcomes.get(200, 0) > REQUESTS // 4, outcomes
    assert drift <= SOAK_DRIFT_MB, f"RSS grew {drift:.1f} MB over {REQUESTS - 100} uploads"
    # every line of the log stream is a JSON record; none of them blames the server for a client's file
    unstructured = [line for line in log if not line.startswith("{")]
    assert not unstructured, unstructured[:10]
    records = [json.loads(line) for line in log]
    errors = [r for r in records if r["level"] in ("ERROR", "CRITICAL")]
    assert not errors, errors[:5]
