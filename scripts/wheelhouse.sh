#!/usr/bin/env bash
# Download every wheel the image needs into docker/wheelhouse, so `docker compose build` installs
# offline (air-gapped hosts, or builds that cannot reach PyPI). Remove the .whl files to build online.
# Run it on Linux x86_64 with CPython 3.11 (the image's platform): pip picks wheels for this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
out=docker/wheelhouse
"$PYTHON" - > "$out/.requirements.txt" <<'PY'
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
print("\n".join(project["optional-dependencies"]["debug"]))
PY
# the image's packages, checked against the lockfile's hashes; then debugpy (/opt/debug)
"$PYTHON" -m pip download --quiet --dest "$out" --only-binary=:all: --require-hashes -r requirements/runtime.lock
"$PYTHON" -m pip download --quiet --dest "$out" --only-binary=:all: -r "$out/.requirements.txt"
echo "$(ls "$out"/*.whl | wc -l) wheels, $(du -sh "$out" | cut -f1) in $out"
