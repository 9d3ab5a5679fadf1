# cat-breeds-api: GPU-ready image. Classic-builder compatible (no BuildKit-only syntax).
#
#   docker compose build                        # default: the pinned PyPI torch (CUDA 13.0 build)
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 -t cat-breeds-api .
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu -t cat-breeds-api .
#   make wheelhouse && make docker-build        # offline / air-gapped: only the wheels in docker/wheelhouse
#
# PyTorch's wheels bring their own CUDA libraries; the NVIDIA Container Toolkit only injects the driver.
# One stage: the virtualenv is installed where it runs, so a build writes its ~6 GB once (a builder
# stage plus COPY --from would write it twice, and a wheelhouse COPY would add its 3 GB as a layer).
ARG BASE_IMAGE=python:3.11-slim-bookworm

# --- runtime: a non-root user, the pinned dependencies, the source ---------------------------------
FROM ${BASE_IMAGE} AS runtime
ARG APP_UID=1000
ARG APP_GID=1000
LABEL org.opencontainers.image.title="cat-breeds-api" \
      org.opencontainers.image.description="Fine-tuned timm image classifier served over HTTP" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONPATH=/app \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MALLOC_ARENA_MAX=2 \
    HOME=/home/appuser \
    API_HOST=0.0.0.0 \
    API_PORT=8000 \
    API_LOG_DIR=/app/logs \
    API_CHECKPOINT_PATH=/app/models/best_model.pt
# MALLOC_ARENA_MAX: decode threads would each keep a glibc arena of freed image buffers (~+120 MB PSS).
# Named volumes copy ownership from the image: the mount points must exist, owned by appuser.
RUN groupadd --gid "${APP_GID}" appuser \
 && useradd --uid "${APP_UID}" --gid "${APP_GID}" --home-dir /home/appuser --create-home \
        --shell /usr/sbin/nologin appuser \
 && mkdir -p /app/models /app/logs /home/appuser/.cache \
 && chown -R appuser:appuser /app /home/appuser
# The dependency layer is rebuilt only when the lockfile (requirements/runtime.lock: every package
# pinned with its hashes, generated from pyproject.toml by `make lock`) or a build argument changes.
# WHEELHOUSE_URL (scripts/with_wheelhouse.py serves docker/wheelhouse on loopback during the build)
# makes the install offline; otherwise PyPI. TORCH_INDEX_URL (another torch build, whose files have
# other hashes and other CUDA libraries) installs pyproject.toml's pins without the lockfile instead.
# debugpy goes to /opt/debug, off the import path unless the development override adds it.
ARG TORCH_INDEX_URL=
ARG WHEELHOUSE_URL=
COPY pyproject.toml requirements/runtime.lock /tmp/build/
RUN python3 -c "import tomllib; p = tomllib.load(open('/tmp/build/pyproject.toml', 'rb'))['project']; \
open('/tmp/build/requirements.txt', 'w').write('\n'.join(p['dependencies']) + '\n'); \
open('/tmp/build/debug.txt', 'w').write('\n'.join(p['optional-dependencies']['debug']) + '\n')" \
 && if [ -n "$TORCH_INDEX_URL" ]; then set -- --extra-index-url "$TORCH_INDEX_URL" -r /tmp/build/requirements.txt; \
    elif [ -n "$WHEELHOUSE_URL" ]; then set -- --no-index --find-links "$WHEELHOUSE_URL" --require-hashes -r /tmp/build/runtime.lock; \
    else set -- --require-hashes -r /tmp/build/runtime.lock; fi \
 && python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check "$@" \
 && if [ -n "$WHEELHOUSE_URL" ]; then set -- --no-index --find-links "$WHEELHOUSE_URL"; else set --; fi \
 && /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check "$@" \
        --target /opt/debug -r /tmp/build/debug.txt \
 && find /opt/venv /opt/debug -name '__pycache__' -type d -prune -exec rm -rf {} + \
 && rm -rf /tmp/build
WORKDIR /app
COPY api/ /app/api/
USER ${APP_UID}:${APP_GID}
EXPOSE 8000
# Classic builder: no --start-interval here; docker-compose.yml adds start_interval for newer engines.
HEALTHCHECK --interval=30s --timeout=10s --start-period=300s --retries=3 CMD ["python3", "-m", "api.healthcheck"]
# Exec form: the server is PID 1's only child (compose `init: true`) and gets SIGTERM to drain.
CMD ["python3", "-m", "api.cli", "serve"]
