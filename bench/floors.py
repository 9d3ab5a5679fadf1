"""The least one inference call costs a Python server, over gRPC and over HTTP: would gRPC pay?

    python -m bench.floors [--seconds 8] [--connections 16]

Two echo servers, each in a process of its own on 127.0.0.1, that do no work beyond the protocol:
read the request's one image (an encoded 451x300 JPEG, as tritonclient sends it) and answer 67 FP32
scores.

    gRPC   grpc.aio with Triton's own service stubs (tritonclient[grpc]: GRPCInferenceService.ModelInfer),
           driven by tritonclient.grpc.aio from another process, `--connections` calls in flight
    HTTP   uvicorn + FastAPI, one POST route (the v2 binary body), no middleware, driven by wrk

Server CPU per call is read from /proc. Compare with `make bench-protocol`'s event-loop figure for the
service itself: what a call costs beyond these floors is the service's own (middleware, admission,
the engine link), which no change of protocol removes.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import stamp
from bench.frontend import arguments, load, post_script, requests_done, write_inputs
from bench.protocol import v2_files
from tests.support import cpu_s

SCORES = np.random.default_rng(0).random((1, 67), dtype=np.float32).tobytes()
PATH = "/v2/models/m/infer"


# --- the servers and the gRPC driver (each run as `python -m bench.floors <role> ...`) -------------------


def serve_grpc(port: int) -> None:
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    class Echo(service_pb2_grpc.GRPCInferenceServiceServicer):
        async def ModelInfer(self, request: Any, context: Any) -> Any:  # the stub's method name
            data = request.raw_input_contents[0]
            length = int.from_bytes(data[:4], "little")
            assert len(data) == 4 + length  # the one BYTES element: the image file
            answer = service_pb2.ModelInferResponse(model_name=request.model_name, model_version="1", id=request.id)
            output = answer.outputs.add(name="probabilities", datatype="FP32", shape=[1, 67])
            assert output is not None
            answer.raw_output_contents.append(SCORES)
            return answer

    async def run() -> None:
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20)])
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(Echo(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    asyncio.run(run())


def serve_http(port: int) -> None:
    import uvicorn
    from fastapi import FastAPI, Request, Response

    app = FastAPI()

    @app.post(PATH)
    async def infer(request: Request) -> Response:
        body = await request.body()
        header = int(request.headers["inference-header-content-length"])
        assert len(body) > header  # the JSON header, then the image
        return Response(b'{"outputs":[]}' + SCORES, media_type="application/octet-stream")

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def drive_grpc(port: int, jpeg: Path, seconds: float, connections: int) -> None:
    """Calls ModelInfer back to back, `connections` at a time; prints how many were answered."""
    import tritonclient.grpc.aio as triton_aio
    from tritonclient.grpc import InferInput

    async def run() -> int:
        client = triton_aio.InferenceServerClient(f"127.0.0.1:{port}")
        image = InferInput("image", [1], "BYTES")
        image.set_data_from_numpy(np.array([jpeg.read_bytes()], dtype=np.object_))
        done, end = 0, time.perf_counter() + seconds

        async def caller() -> None:
            nonlocal done
            while time.perf_counter() < end:
                await client.infer("m", [image])
                done += 1

        await asyncio.gather(*(caller() for _ in range(connections)))
        await client.close()
        return done

    print(asyncio.run(run()), flush=True)


# --- the measurement ---------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start(role: str, port: int) -> subprocess.Popen[bytes]:
    process = subprocess.Popen([sys.executable, "-m", "bench.floors", role, str(port)])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # readiness: the port accepts
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return process
        if process.poll() is not None:
            raise SystemExit(f"the {role} server exited with {process.returncode}")
        time.sleep(0.05)
    raise SystemExit(f"the {role} server did not listen on {port} within 60 s")


def main(argv: list[str] | None = None) -> None:
    args = arguments(__doc__).parse_args(argv)
    print("measured on: " + stamp.line())
    folder = Path(tempfile.mkdtemp(prefix="bench-floors-"))
    _, jpegs = write_inputs(folder)
    jpeg = jpegs["451x300"]
    body, headers = v2_files(jpeg.read_bytes(), 1)
    script = post_script(folder, "v2_binary", body, headers)
    python = [sys.executable, "-m", "bench.floors"]

    def grpc_calls(port: int, seconds: float) -> int:
        drive = [*python, "drive-grpc", str(port), str(jpeg), str(seconds), str(args.connections)]
        return int(subprocess.run(drive, capture_output=True, text=True, check=True).stdout)

    def http_calls(port: int, seconds: float) -> int:
        done, _ = load(f"http://127.0.0.1:{port}{PATH}", script, seconds, args.connections)
        done.check_returncode()
        return requests_done(done.stdout)

    rows = {}
    for name, role, calls in (
        ("gRPC (grpc.aio, Triton's stubs)", "serve-grpc", grpc_calls),
        ("HTTP (uvicorn + FastAPI, v2 binary body)", "serve-http", http_calls),
    ):
        port = _free_port()
        server = _start(role, port)
        try:
            calls(port, 2)  # warm-up
            cpu0 = cpu_s(server.pid)
            answered = calls(port, args.seconds)
            rows[name] = ((cpu_s(server.pid) - cpu0) / answered * 1000, answered)
        finally:
            server.terminate()
            server.wait(30)
    print(f"echo servers on 127.0.0.1, {args.connections} calls in flight, a {jpeg.stat().st_size:,}-byte JPEG a call")
    print("\n| protocol | calls | server CPU ms/call |")
    print("| --- | --- | --- |")
    for name, (ms, answered) in rows.items():
        print(f"| {name} | {answered:,} | {ms:.3f} |")
    grpc_ms, http_ms = (ms for ms, _ in rows.values())
    print(f"\ngRPC / HTTP server CPU per call: {grpc_ms / http_ms:.2f}x")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    role = sys.argv[1] if len(sys.argv) > 1 else ""
    if role == "serve-grpc":
        serve_grpc(int(sys.argv[2]))
    elif role == "serve-http":
        serve_http(int(sys.argv[2]))
    elif role == "drive-grpc":
        drive_grpc(int(sys.argv[2]), Path(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]))
    else:
        main()
