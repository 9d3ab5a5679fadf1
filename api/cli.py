"""`cat-breeds-api`: serve, classify files (locally or against a server), write the demo model."""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import httpx
from tqdm import tqdm

from api.config import Settings, load_settings
from api.errors import EXIT_BAD_CONFIG, EXIT_ERROR, CatBreedsError, StartupError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".avif", ".mpo"}
LOCAL_BATCH = 16

Result = dict[str, Any]


def _fail(message: str, status: int = EXIT_BAD_CONFIG) -> None:
    sys.stderr.write(f"cat-breeds-api: {message}\n")
    raise SystemExit(status)


def _settings(**overrides: Any) -> Settings:
    try:
        return load_settings(**{k: v for k, v in overrides.items() if v is not None})
    except StartupError as error:
        _fail(f"configuration error: {error}")
        raise  # unreachable; keeps type checkers honest


# --- serve -----------------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> None:
    import uvicorn

    from api.logs import configure_logging
    from api.ops.server import serve

    settings = _settings(host=args.host, port=args.port)
    configure_logging(settings.log_level, settings.log_dir, settings.log_format)
    common: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level.lower(),
        "log_config": None,  # uvicorn's records go through our handlers (JSON by default)
        "access_log": False,  # api.access writes one structured line per request
        "server_header": False,  # no software/version banner in responses
    }
    if args.reload:
        common["timeout_graceful_shutdown"] = math.ceil(settings.graceful_timeout_s)
        # The reloader re-imports `api.main:app`, which reads the environment: pass overrides there.
        os.environ.update({"API_HOST": settings.host, "API_PORT": str(settings.port)})
        uvicorn.run("api.main:app", reload=True, reload_dirs=[str(Path(__file__).parent)], **common)
    else:
        serve(settings, **common)


# --- predict ---------------------------------------------------------------------------------------


def _expand(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES))
        elif path.is_file():
            files.append(path)
        else:
            _fail(f"no such file or folder: {path}")
    if not files:
        _fail("no images found in the given paths")
    return files


def _chunks(items: list[Path], size: int) -> Iterator[list[Path]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# --- credentials, taken the way the server takes them -----------------------------------------------


def _key_headers(args: argparse.Namespace) -> dict[str, str]:
    """X-API-Key from --api-key, else API_API_KEY or API_API_KEY_FILE (environment or .env), as `serve` reads it."""
    key = args.api_key
    if key is None:
        secret = _settings().api_key
        key = secret.get_secret_value() if secret is not None else None
    return {"X-API-Key": key} if key else {}


def _refused(response: httpx.Response, endpoint: str, sent_key: bool) -> None:
    if response.status_code == 401:
        why = "refused the API key it was sent" if sent_key else "requires an API key"
        _fail(f"{endpoint} {why} (401); pass --api-key, or set API_API_KEY or API_API_KEY_FILE", EXIT_ERROR)


def _predict_remote(
    files: list[Path], url: str, top_k: int | None, headers: dict[str, str], bar: tqdm
) -> Iterator[Result]:
    endpoint = url.rstrip("/") + "/api/v1/predict"
    params = {"top_k": top_k} if top_k else {}
    with httpx.Client(timeout=httpx.Timeout(60.0, connect=10.0), headers=headers) as client:
        for path in files:
            try:
                with path.open("rb") as stream:
                    response = client.post(endpoint, params=params, files={"file": (path.name, stream)})
            except httpx.HTTPError as error:
                _fail(f"cannot reach {endpoint}: {error}", EXIT_ERROR)
            _refused(response, endpoint, bool(headers))
            body = response.json() if response.headers.get("content-type", "").startswith("application/json") else {}
            if response.status_code == 200:
                yield {"path": str(path), "predictions": body["predictions"]}
            else:
                failure = body.get("error", {"code": f"http_{response.status_code}", "message": response.text[:200]})
                yield {"path": str(path), "error": failure}
            bar.update(1)


def _predict_local(files: list[Path], settings: Settings, top_k: int | None, bar: tqdm) -> Iterator[Result]:
    """The server's own pipeline (api.engine.serving.service.Engine) without HTTP: same decode limits,
    reduced-scale decoding, runtime, batching and ranking, so a file scores as the server scores it."""
    import asyncio

    from api.engine.serving.pipeline import Classified
    from api.engine.serving.service import Engine

    try:
        engine = Engine.start(settings.model_group, settings.batching_group)
    except StartupError as error:
        _fail(str(error), EXIT_ERROR)
    k = top_k or settings.top_k
    size = min(LOCAL_BATCH, settings.max_queue)
    try:
        for chunk in _chunks(files, size):
            classification = asyncio.run(engine.classify_all([path.read_bytes() for path in chunk], top_k=k))
            for path, outcome in zip(chunk, classification.outcomes, strict=True):
                if isinstance(outcome, Classified):
                    yield {
                        "path": str(path),
                        "predictions": [
                            {"index": i, "label": name, "score": score} for i, name, score in outcome.labels
                        ],
                    }
                else:
                    yield {"path": str(path), "error": {"code": outcome.code, "message": outcome.message}}
            bar.update(len(chunk))
    finally:
        engine.close()


def _write(results: list[Result], fmt: str, out: TextIO) -> None:
    if fmt == "json":
        json.dump(results, out, indent=2)
        out.write("\n")
    elif fmt == "csv":
        writer = csv.writer(out)
        writer.writerow(["path", "rank", "index", "label", "score", "error"])
        for result in results:
            if "error" in result:
                writer.writerow([result["path"], "", "", "", "", result["error"]["code"]])
            for rank, item in enumerate(result.get("predictions", []), start=1):
                writer.writerow([result["path"], rank, item["index"], item["label"], f"{item['score']:.6f}", ""])
    else:
        for result in results:
            if "error" in result:
                out.write(f"{result['path']}: error {result['error']['code']}: {result['error']['message']}\n")
            else:
                best = ", ".join(f"{p['label']} {p['score']:.1%}" for p in result["predictions"])
                out.write(f"{result['path']}: {best}\n")


def cmd_predict(args: argparse.Namespace) -> None:
    files = _expand(args.paths)
    with tqdm(total=len(files), unit="img", disable=len(files) < 2 or args.quiet, file=sys.stderr) as bar:
        if args.url:
            results = list(_predict_remote(files, args.url, args.top_k, _key_headers(args), bar))
        else:
            results = list(_predict_local(files, _settings(checkpoint_path=args.checkpoint), args.top_k, bar))
    if args.output:
        with args.output.open("w", encoding="utf-8", newline="") as out:
            _write(results, args.format, out)
    else:
        _write(results, args.format, sys.stdout)
    if any("error" in r for r in results):
        raise SystemExit(EXIT_ERROR)


# --- demo-model ------------------------------------------------------------------------------------


def cmd_demo_model(args: argparse.Namespace) -> None:
    from api.ops.demo import write_demo_eval, write_demo_model

    try:
        path = write_demo_model(args.output, overwrite=args.force)
        if args.eval_output is not None:
            write_demo_eval(args.eval_output)
    except CatBreedsError as error:
        _fail(str(error), EXIT_ERROR)
    sys.stdout.write(f"{path}\n")


# --- doctor ----------------------------------------------------------------------------------------


def cmd_doctor(args: argparse.Namespace) -> None:
    from api.ops.doctor import run_checks

    checks = run_checks(args.project, args.env_file)
    for check in checks:
        sys.stdout.write(check.line() + "\n")
    failed = [c for c in checks if c.level == "fail"]
    sys.stdout.write(f"{len(failed)} problem(s) found\n" if failed else "ready for docker compose up\n")
    if failed:
        raise SystemExit(EXIT_ERROR)


# --- load (rollout check) --------------------------------------------------------------------------


def cmd_load(args: argparse.Namespace) -> None:
    """Steady predictions for a while, counted by answer: during a rollout, anything but 200 is a bug."""
    import threading
    import time
    from collections import Counter

    import httpx

    data = args.image.read_bytes()
    headers = _key_headers(args)
    endpoint = args.url.rstrip("/") + "/api/v1/predict"
    # one request first: a missing or wrong key is one clear line, not minutes of 401s (a transport
    # error is counted below, as every other failure)
    with contextlib.suppress(httpx.HTTPError):
        first = httpx.post(endpoint, files={"file": (args.image.name, data)}, headers=headers, timeout=args.timeout)
        _refused(first, endpoint, bool(headers))
    counts: Counter[str] = Counter()
    lock = threading.Lock()
    deadline = time.monotonic() + args.seconds

    def client() -> None:
        with httpx.Client(base_url=args.url, timeout=args.timeout, headers=headers) as session:
            while time.monotonic() < deadline:
                try:
                    outcome = str(session.post("/api/v1/predict", files={"file": (args.image.name, data)}).status_code)
                except httpx.HTTPError as error:
                    outcome = type(error).__name__
                with lock:
                    counts[outcome] += 1

    threads = [threading.Thread(target=client, daemon=True) for _ in range(args.concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    total = sum(counts.values())
    summary = ", ".join(f"{name}: {count}" for name, count in sorted(counts.items()))
    sys.stdout.write(f"{total} requests in {args.seconds:g}s ({summary})\n")
    if total == 0 or set(counts) != {"200"}:
        raise SystemExit(EXIT_ERROR)


# --- reload (swap the model without downtime) ------------------------------------------------------


def cmd_reload(args: argparse.Namespace) -> None:
    """POST /v2/repository/models/<name>/load: the server loads the checkpoint beside the served model
    and switches to it; this answers once it has (or says why not: the old model keeps serving)."""
    settings = _settings()
    key = args.admin_key
    if key is None and settings.admin_key is not None:
        key = settings.admin_key.get_secret_value()
    if not key:
        _fail("reload needs the server's admin key: set API_ADMIN_KEY (environment or .env) or pass --admin-key")
    name = args.model or settings.served_model_name
    endpoint = f"{args.url.rstrip('/')}/v2/repository/models/{name}/load"
    body = {"parameters": {"checkpoint": str(args.checkpoint)}} if args.checkpoint else {}
    try:
        response = httpx.post(endpoint, json=body, headers={"X-API-Key": key}, timeout=args.timeout)
    except httpx.HTTPError as error:
        _fail(f"cannot reach {endpoint}: {error}", EXIT_ERROR)
    try:
        answer = response.json()
    except ValueError:
        answer = {"error": response.text[:200]}
    if response.status_code == 404 and "error" in answer and "unknown model" not in str(answer["error"]):
        _fail(
            f"{endpoint}: not found; is API_ADMIN_KEY set on the server? (the route is off without it)",
            EXIT_ERROR,
        )
    if response.status_code != 200:
        _fail(f"reload refused ({response.status_code}): {answer.get('error', answer)}", EXIT_ERROR)
    sys.stdout.write(
        f"serving {name} version {answer['version']} (was {answer['previous_version']}) from {answer['checkpoint']}: "
        f"loaded in {answer['load_s']:.2f}s, every front-end switched in {answer['switch_s'] * 1000:.1f} ms\n"
    )
    if answer.get("frontends_dropped"):
        sys.stderr.write(
            f"warning: {answer['frontends_dropped']} front-end(s) did not confirm the switch in time and were "
            "disconnected (see the server's log); they connect again with the new model\n"
        )


def _add_key_argument(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--api-key",
        help="the server's API key (default API_API_KEY, or the file API_API_KEY_FILE names; "
        "prefer those: a command line is visible to other users)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cat-breeds-api", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the HTTP service (settings from API_* / .env)")
    serve.add_argument("--host", help="bind address (default API_HOST, 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default API_PORT, 8000)")
    serve.add_argument("--reload", action="store_true", help="restart on code changes (development)")
    serve.set_defaults(func=cmd_serve)

    predict = commands.add_parser("predict", help="classify image files or folders")
    predict.add_argument("paths", nargs="+", type=Path, help="image files or folders (searched recursively)")
    predict.add_argument("--url", help="classify with a running server (e.g. http://127.0.0.1:8000)")
    predict.add_argument("--checkpoint", type=Path, help="local mode: checkpoint (default API_CHECKPOINT_PATH)")
    predict.add_argument("--top-k", type=int, help="labels per image (default API_TOP_K)")
    predict.add_argument("--format", choices=["table", "json", "csv"], default="table")
    predict.add_argument("--output", "-o", type=Path, help="write results here instead of stdout")
    predict.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    _add_key_argument(predict)
    predict.set_defaults(func=cmd_predict)

    doctor = commands.add_parser("doctor", help="preflight for the Docker Compose deployment (reads .env)")
    doctor.add_argument("--project", type=Path, default=Path.cwd(), help="folder with the compose files and .env")
    doctor.add_argument("--env-file", type=Path, help="settings file (default <project>/.env)")
    doctor.set_defaults(func=cmd_doctor)

    load = commands.add_parser("load", help="steady predictions for a while; exit 1 on any non-200 (rollout check)")
    load.add_argument("image", type=Path, help="the image every request sends")
    load.add_argument("--url", default="http://127.0.0.1:8000", help="the service (default http://127.0.0.1:8000)")
    load.add_argument("--seconds", type=float, default=120.0, help="how long (default 120)")
    load.add_argument("--concurrency", type=int, default=4, help="clients at once (default 4)")
    load.add_argument("--timeout", type=float, default=60.0, help="per-request timeout in seconds (default 60)")
    _add_key_argument(load)
    load.set_defaults(func=cmd_load)

    reload = commands.add_parser(
        "reload", help="swap the running server's model without downtime (needs API_ADMIN_KEY on both sides)"
    )
    reload.add_argument(
        "checkpoint",
        nargs="?",
        type=Path,
        help="checkpoint to load, as the server sees it (default: its configured one)",
    )
    reload.add_argument("--url", default="http://127.0.0.1:8000", help="the service (default http://127.0.0.1:8000)")
    reload.add_argument("--model", help="the served model's name (default API_SERVED_MODEL_NAME, cat-breeds)")
    reload.add_argument("--admin-key", help="the server's admin key (default API_ADMIN_KEY; prefer that)")
    reload.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the swap (default 600)")
    reload.set_defaults(func=cmd_reload)

    demo = commands.add_parser("demo-model", help="write the embedded ImageNet demo model as a timm model folder")
    demo.add_argument("--output", type=Path, default=Path("models/demo"), help="folder to write (models/demo)")
    demo.add_argument("--force", action="store_true", help="overwrite an existing demo model")
    demo.add_argument(
        "--eval-output",
        type=Path,
        default=None,
        help="also write its evaluation images (crops of scikit-image's photos) there, for API_EVAL_DIR",
    )
    demo.set_defaults(func=cmd_demo_model)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
