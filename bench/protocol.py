"""What each protocol costs a front-end beside the decode it carries: would gRPC pay here?

    python -m bench.protocol [--seconds 8] [--connections 16]      (make bench-protocol)

bench.frontend's front-end-bound setup (API_RUNTIME=null: no forward pass; Gunicorn with one
front-end and the engine; wrk on 127.0.0.1; resize in the front-end, as on a CPU host), one 451x300
photo sent each way a client can send it:

    v1 multipart    POST /api/v1/predict, field `file`
    v2 binary       tritonclient's default: JSON header + the length-prefixed BYTES element
    v2 JSON         the file base64 in JSON (curl, KServe's JSON clients)
    v2 binary x8    eight files a request
    v2 pixels       the photo decoded by the client: cat-breeds-pixels, UINT8 [1, 300, 451, 3]

then v1 multipart and v2 pixels again with the resize + crop on the engine, as on a GPU host (where
a front-end ships the decoded image and the GPU resizes it; here torch on the CPU does).

Front-end CPU per image is read from /proc and split by thread, in the same run: the event loop
(the main thread: HTTP parsing, the body's framing, JSON, routing, the engine link: what the protocol
costs) and the decode pool (decode, resize + crop, the copy into shared memory: what every protocol
must pay for the image). The event loop's share is the most gRPC, or any cheaper framing, could save.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from bench import stamp
from bench.frontend import arguments, post_script, serve_and_measure, write_inputs, wrk_script

MODEL = "/v2/models/cat-breeds/infer"
PIXELS_MODEL = "/v2/models/cat-breeds-pixels/infer"


def _binary(header: dict, blob: bytes) -> tuple[bytes, dict[str, str]]:
    text = json.dumps(header).encode()
    return text + blob, {"Inference-Header-Content-Length": str(len(text))}


def v2_files(jpeg: bytes, count: int) -> tuple[bytes, dict[str, str]]:
    elements = (len(jpeg).to_bytes(4, "little") + jpeg) * count
    tensor = {"name": "image", "datatype": "BYTES", "shape": [count], "parameters": {"binary_data_size": len(elements)}}
    return _binary({"inputs": [tensor]}, elements)


def v2_json(jpeg: bytes) -> tuple[bytes, dict[str, str]]:
    tensor = {"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(jpeg).decode()]}
    return json.dumps({"inputs": [tensor]}).encode(), {"Content-Type": "application/json"}


def v2_pixels(pixels: np.ndarray) -> tuple[bytes, dict[str, str]]:
    shape = [1, *pixels.shape]
    tensor = {"name": "pixels", "datatype": "UINT8", "shape": shape, "parameters": {"binary_data_size": pixels.size}}
    return _binary({"inputs": [tensor]}, pixels.tobytes())


def main(argv: list[str] | None = None) -> None:
    parser = arguments(__doc__)
    parser.add_argument("--only", help="comma-separated ways to run (e.g. 'v1 multipart,v2 binary'); default all")
    args = parser.parse_args(argv)
    print("measured on: " + stamp.line())
    folder = Path(tempfile.mkdtemp(prefix="bench-protocol-"))
    checkpoint, jpegs = write_inputs(folder)
    jpeg_path = jpegs["451x300"]
    jpeg = jpeg_path.read_bytes()
    pixels = np.asarray(Image.open(jpeg_path).convert("RGB"))
    multipart = wrk_script(folder, jpeg_path)
    sizes = {"v1 multipart": multipart.with_suffix(".body").stat().st_size}
    scripts = {"v1 multipart": ("/api/v1/predict", multipart)}
    for name, path, (body, headers), images in (
        ("v2 binary", MODEL, v2_files(jpeg, 1), 1),
        ("v2 JSON", MODEL, v2_json(jpeg), 1),
        ("v2 binary x8", MODEL, v2_files(jpeg, 8), 8),
        ("v2 pixels", PIXELS_MODEL, v2_pixels(pixels), 1),
    ):
        scripts[name] = (path, post_script(folder, name.replace(" ", "_"), body, headers))
        sizes[name] = len(body) // images
    # (way, where the resize + crop runs): the front-end on a CPU host; the engine (its GPU) on a GPU host
    ways = [(name, "frontend") for name in scripts] + [("v1 multipart", "engine"), ("v2 pixels", "engine")]
    chosen = {way.strip() for way in args.only.split(",")} if args.only else set(scripts)
    print(f"CPU: {os.cpu_count()} visible; null runtime, 1 front-end, resnet50's recipe; {len(jpeg):,}-byte JPEG")
    print(
        "\n| sent as | resize in | body bytes/img | img/s | front-end CPU ms/img | event loop (protocol) |"
        " decode threads | loop share | front-end CPU vs v1 |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    first: dict[str, float] = {}
    for name, preprocess in [way for way in ways if way[0] in chosen]:
        path, script = scripts[name]
        row = serve_and_measure(
            checkpoint, script, frontends=1, preprocess=preprocess, seconds=args.seconds,
            connections=args.connections, folder=folder, path=path,
        )  # fmt: skip
        spent, loop = row["frontend_ms_per_image"], row["frontend_loop_ms_per_image"]
        first.setdefault(preprocess, spent)
        print(
            f"| {name} | {preprocess} | {sizes[name]:,} | {row['img_s']:.0f} | {spent:.3f} | {loop:.3f} | "
            f"{spent - loop:.3f} | {loop / spent:.0%} | {spent / first[preprocess]:.2f}x |"
            + (f" ({row['errors']:.0f} errors)" if row["errors"] else "")
        )


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
