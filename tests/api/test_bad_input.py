"""Bad uploads get a clear 4xx JSON error with a stable code, never a 5xx; the service stays ready."""

from __future__ import annotations

import io
import json
import socket
import struct
import zlib

import httpx
import pytest
from PIL import Image

from tests.helpers import jpeg_bytes, noise_image, png_bytes
from tests.support import rss_mb as _rss_mb

PREDICT = "/api/v1/predict"


def _png_bomb() -> bytes:
    """A real decompression bomb: ~30 KB of zlib that inflates to a 20000x20000 canvas."""

    width = height = 20_000
    row = b"\x00" + b"\x00" * width  # filter byte + one grey byte per pixel
    idat = zlib.compress(row * height, 9)
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_declaring(width: int, height: int) -> bytes:
    """A well-formed PNG whose header declares a canvas far larger than the few bytes of pixels it carries."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _exif_rotated(photo: bytes) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    return jpeg_bytes(Image.open(io.BytesIO(photo)), exif=exif.tobytes())


def _image(fmt: str, image: Image.Image, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _cases(photo: bytes) -> list[tuple[str, dict[str, object], int, str]]:
    """(name, httpx.post kwargs, expected status, expected error code or 'ok')."""

    def upload(data: bytes, name: str = "x.jpg", ctype: str = "application/octet-stream") -> dict[str, object]:
        return {"files": {"file": (name, data, ctype)}}

    png = png_bytes(Image.open(io.BytesIO(photo)))
    flipped = bytearray(photo)
    for position in range(600, len(flipped), 97):
        flipped[position] ^= 0xFF
    return [
        ("empty file", upload(b""), 400, "empty_file"),
        ("text", upload(b"just some words\n", "a.txt", "text/plain"), 415, "unsupported_media_type"),
        ("html", upload(b"<!doctype html><html><body>hi</body></html>", "a.html"), 415, "unsupported_media_type"),
        ("svg", upload(b'<svg xmlns="http://www.w3.org/2000/svg"/>', "a.svg", "image/svg+xml"), 415, "unsupported_media_type"),
        ("pdf", upload(b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF", "a.pdf"), 415, "unsupported_media_type"),
        ("zip", upload(b"PK\x03\x04" + bytes(60), "a.zip"), 415, "unsupported_media_type"),
        ("random bytes", upload(bytes(range(256)) * 20), 415, "unsupported_media_type"),
        ("nul bytes", upload(bytes(4096)), 415, "unsupported_media_type"),
        ("truncated jpeg", upload(photo[: len(photo) // 2]), 400, "invalid_image"),
        ("jpeg header only", upload(photo[:200]), 400, "invalid_image"),
        ("bit-flipped jpeg", upload(bytes(flipped)), 400, "invalid_image"),
        ("png bomb", upload(_png_bomb(), "bomb.png"), 413, "image_too_large"),
        ("over upload limit", upload(jpeg_bytes(noise_image(1400, 1000))), 413, "payload_too_large"),
        ("wrong field name", {"files": {"image": ("c.jpg", photo)}}, 422, "missing_file"),
        ("field without a file", {"data": {"file": "chelsea.jpg"}, "files": {"other": ("o", b"x")}}, 422, "missing_file"),
        ("no body", {}, 422, "missing_file"),
        ("json without image", {"json": {"url": "http://example.com/cat.jpg"}}, 422, "missing_file"),
        ("bad base64", {"json": {"image": "%%%not-base64%%%"}}, 400, "invalid_base64"),
        ("broken json", {"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "invalid_json"),
        ("form urlencoded", {"data": {"file": "abc"}}, 422, "missing_file"),
        ("top_k not a number", {"params": {"top_k": "many"}, **upload(photo)}, 422, "validation_error"),
        ("valid photo, trailing garbage", upload(photo + b"garbage" * 100), 200, "ok"),
        ("valid photo, declared as text", upload(photo, "cat.txt", "text/plain"), 200, "ok"),
        ("1x1 png", upload(png_bytes(Image.new("RGB", (1, 1))), "dot.png"), 200, "ok"),
        ("1x2000 png", upload(png_bytes(Image.new("L", (1, 2000), 128)), "line.png"), 200, "ok"),
        ("rgba png", upload(png_bytes(noise_image(64, 64, "RGBA")), "a.png"), 200, "ok"),
        ("cmyk jpeg", upload(_image("JPEG", Image.new("CMYK", (64, 64), (0, 50, 100, 0)))), 200, "ok"),
        ("progressive jpeg", upload(_image("JPEG", noise_image(64, 48), progressive=True)), 200, "ok"),
        ("animated gif", upload(_image("GIF", noise_image(32, 32), save_all=True, append_images=[noise_image(32, 32, seed=1)])), 200, "ok"),
        ("webp", upload(_image("WEBP", noise_image(48, 48)), "a.webp"), 200, "ok"),
        *[(f"jpeg cut at {cut}%", upload(photo[: len(photo) * cut // 100]), 400, "invalid_image") for cut in (5, 30, 70, 95)],
        *[(f"png cut at {cut}%", upload(png[: len(png) * cut // 100], "a.png"), 400, "invalid_image") for cut in (10, 50, 90)],
        ("png declaring 100000x100000", upload(_png_declaring(100_000, 100_000), "huge.png"), 413, "image_too_large"),
        ("16-bit png", upload(png_bytes(Image.new("I;16", (40, 30), 40000)), "deep.png"), 200, "ok"),
        ("1-bit png", upload(png_bytes(noise_image(40, 30).convert("1")), "bw.png"), 200, "ok"),
        ("palette png", upload(png_bytes(noise_image(40, 30).convert("P")), "pal.png"), 200, "ok"),
        ("grey + alpha png", upload(png_bytes(noise_image(40, 30, "RGBA").convert("LA")), "la.png"), 200, "ok"),
        ("float tiff", upload(_image("TIFF", Image.new("F", (40, 30), 0.5)), "f.tif"), 200, "ok"),
        ("greyscale jpeg", upload(jpeg_bytes(noise_image(40, 30).convert("L"))), 200, "ok"),
        ("bmp", upload(_image("BMP", noise_image(40, 30)), "a.bmp"), 200, "ok"),
        ("exif-rotated jpeg", upload(_exif_rotated(photo)), 200, "ok"),
        ("5000-character filename", upload(photo, "c" * 4996 + ".jpg"), 400, "invalid_multipart"),
        ("raw body, no content-type", {"content": photo}, 200, "ok"),
        ("raw body, content-type text/plain", {"content": photo, "headers": {"content-type": "text/plain"}}, 200, "ok"),
        ("json list", {"json": ["not", "an", "object"]}, 422, "missing_file"),
        ("json image not a string", {"json": {"image": 42}}, 422, "missing_file"),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def photo(chelsea: Image.Image) -> bytes:
    return jpeg_bytes(chelsea)


def test_bad_uploads_get_clear_4xx_and_valid_ones_200(tiny_server: str, photo: bytes) -> None:
    cases = _cases(photo)
    assert len(cases) >= 40
    failures = []
    rss = []
    with httpx.Client(base_url=tiny_server, timeout=30) as client:
        for _ in range(4):  # the same corpus four times: answers and memory must not drift
            for name, kwargs, status, code in cases:
                response = client.post(PREDICT, **kwargs)  # type: ignore[arg-type]
                body = response.json()
                got_code = "ok" if response.status_code == 200 else body.get("error", {}).get("code")
                if (response.status_code, got_code) != (status, code):
                    failures.append(f"{name}: wanted {status} {code}, got {response.status_code} {body}")
                if response.status_code >= 400:
                    assert set(body["error"]) == {"code", "message"} and body["error"]["message"], name
                    assert "Traceback" not in response.text and "/tmp/" not in response.text, name
            rss.append(_rss_mb())
        assert client.get("/health").status_code == 200, "the service must stay ready"
    assert not failures, "\n".join(failures)
    # this process holds the server and the client. The first passes grow the allocator's pools
    # (decode threads' arenas); after that, flat. The bomb alone would be 400 MB if ever decoded.
    assert rss[-1] - rss[1] <= 30, f"RSS after each pass: {rss}"


def test_get_on_predict_is_405_json(tiny_server: str) -> None:
    response = httpx.get(tiny_server + PREDICT)
    assert response.status_code == 405
    assert response.json()["error"]["code"] == "method_not_allowed"


def test_unknown_route_is_404_json(tiny_server: str) -> None:
    response = httpx.get(tiny_server + "/api/v1/nope")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


def test_declared_oversized_body_is_refused_before_it_is_sent(tiny_server: str) -> None:
    """A client announcing 2 GB gets 413 at once: the server answers without waiting for the body."""
    host, port = tiny_server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        head = (
            f"POST {PREDICT} HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/jpeg\r\n"
            f"Content-Length: {2 * 1024**3}\r\n\r\n"
        )
        conn.sendall(head.encode() + b"\xff\xd8\xff" + bytes(1024))  # then nothing more
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = conn.recv(65536)
            if not chunk:
                break
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 413"), answer[:300]
    assert json.loads(rest.partition(b"\r\n\r\n")[2])["error"]["code"] == "payload_too_large"


def test_a_refused_upload_always_gets_its_answer(tiny_server: str) -> None:
    """Closing a socket with the body unread makes the kernel send a reset that can destroy the 413
    (17 of 90 such uploads lost it before the body was drained); every one must read the JSON error."""
    with httpx.Client(base_url=tiny_server, timeout=30) as client:
        for round in range(20):
            response = client.post(PREDICT, content=bytes(8 * 1024 * 1024), headers={"content-type": "image/jpeg"})
            assert response.status_code == 413, f"round {round}: {response.status_code}"
            assert response.json()["error"]["code"] == "payload_too_large"
        assert client.get("/health").status_code == 200  # the drained connection is still usable


def test_streamed_body_past_the_limit_is_cut_off(tiny_server: str) -> None:
    sent = 0

    def chunks():  # no Content-Length: chunked transfer, the limit must hold while reading
        nonlocal sent
        for _ in range(64):
            sent += 256 * 1024
            yield bytes(256 * 1024)

    response = httpx.post(tiny_server + PREDICT, content=chunks(), headers={"content-type": "image/jpeg"}, timeout=30)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"


@pytest.mark.parametrize(
    ("name", "content_type", "body", "reason"),
    [
        ("filename", None, None, "Maximum header size exceeded (a part's headers, the filename included"),
        ("boundary", "multipart/form-data", b"--x\r\nbroken", "Missing boundary in multipart"),
    ],
)
def test_malformed_multipart_says_why(
    tiny_server: str, photo: bytes, name: str, content_type: str | None, body: bytes | None, reason: str
) -> None:
    """The parser's own reason, not Starlette's generic "Invalid multipart data"."""
    if body is None:  # a 5000-character filename: past python-multipart's 4 KiB limit on part headers
        response = httpx.post(tiny_server + PREDICT, files={"file": ("c" * 4996 + ".jpg", photo, "image/jpeg")})
    else:
        response = httpx.post(tiny_server + PREDICT, content=body, headers={"content-type": content_type or ""})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "invalid_multipart"
    assert error["message"].startswith(f"malformed multipart body: {reason}"), error
