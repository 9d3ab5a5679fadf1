# cat-breeds-api: GPU-ready image. Classic-builder compatible (no BuildKit-only syntax).
#
#   docker compose build                        # default: the pinned PyPI torch (CUDA 13.0 build)
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 -t cat-breeds-api .
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu -t cat-breeds-api .
#   scripts/wheelhouse.sh && docker compose build   # offline / air-gapped: install only from docker/wheelhouse
#
# PyTorch's wheels bring their own CUDA libraries; the NVIDIA Container Toolkit only injects the driver.
ARG BASE_IMAGE=python:3.11-slim-bookworm

# --- builder: a virtualenv with the pinned dependencies (rebuilt only when pyproject.toml changes) ---
FROM ${BASE_IMAGE} AS builder
ARG TORCH_INDEX_URL=
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /build
COPY pyproject.toml ./
COPY docker/wheelhouse/ /wheels/
# The runtime requirements are read from pyproject.toml, so there is one list of pins.
# With wheels in docker/wheelhouse the install is offline; otherwise from PyPI (plus TORCH_INDEX_URL).
RUN python3 -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
open('requirements.txt', 'w').write('\n'.join(p['dependencies']) + '\n'); \
open('debug.txt', 'w').write('\n'.join(p['optional-dependencies']['debug']) + '\n')" \
 && if ls /wheels/*.whl >/dev/null 2>&1; then set -- --no-index --find-links /wheels; \
    elif [ -n "$TORCH_INDEX_URL" ]; then set -- --extra-index-url "$TORCH_INDEX_URL"; \
    else set --; fi \
 && python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install "$@" -r requirements.txt \
 && /opt/venv/bin/pip install "$@" --target /opt/debug -r debug.txt \
 && find /opt/venv /opt/debug -name '__pycache__' -type d -prune -exec rm -rf {} +
# Lets a test run find (and remove) the builder stage it made; empty for normal builds.
ARG BUILD_ID=
LABEL cat-breeds-api.builder="${BUILD_ID}"

# --- runtime: the venv, the source, a non-root user -----------------------------------------------
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
COPY --from=builder /opt/venv /opt/venv
# debugpy, off the import path unless the development override adds it (PYTHONPATH=/app:/opt/debug).
COPY --from=builder /opt/debug /opt/debug
WORKDIR /app
COPY api/ /app/api/
USER ${APP_UID}:${APP_GID}
EXPOSE 8000
# Classic builder: no --start-interval here; docker-compose.yml adds start_interval for newer engines.
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 CMD ["python3", "-m", "api.healthcheck"]
# Exec form: the server is PID 1's only child (compose `init: true`) and gets SIGTERM to drain.
CMD ["python3", "-m", "api.cli", "serve"]
