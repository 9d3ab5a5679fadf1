"""Settings: environment (`API_*`, plus `LOG_LEVEL`) and `.env` -> one typed object.

Precedence, highest first: arguments to `Settings(...)`, environment variables, the `.env` file,
the defaults below. A setting left unset (`None`) defers to the checkpoint's own metadata, then
to the documented fallback, so a value is only "wrong" when someone actually chose it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

from dotenv import dotenv_values
from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from api.cpu import cpu_budget
from api.errors import ConfigError

ENV_PREFIX = "API_"
DEFAULT_MODEL_NAME = "resnet50"
DEFAULT_NUM_CLASSES = 67
_DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

_Group = TypeVar("_Group", bound="DataclassInstance")

LogLevel = Literal["CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG"]


class Settings(BaseSettings):
    """Everything an operator can set. Field `x` is read from `API_X` unless noted."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        validate_default=True,
        populate_by_name=True,
    )

    # --- the model -------------------------------------------------------------------------------
    checkpoint_path: Path | None = Field(
        None,
        description="Checkpoint file (.pt/.pth/.bin/.safetensors, TorchScript) or timm model folder.",
    )
    model_name: str | None = Field(
        None,
        description=f"timm architecture; unset: from the checkpoint, else {DEFAULT_MODEL_NAME}.",
    )
    num_classes: int | None = Field(
        None, ge=1, description=f"Classifier outputs; unset: from the checkpoint, else {DEFAULT_NUM_CLASSES}."
    )
    image_size: int | None = Field(
        None, ge=16, le=4096, description="Input size in pixels; unset: the architecture's data config."
    )
    class_names_path: Path | None = Field(
        None, description="Labels file (JSON list/dict or one name per line); else classes.json/txt beside."
    )
    use_ema: bool = Field(True, description="Prefer EMA weights when the checkpoint holds both.")
    multi_label: bool = Field(False, description="Sigmoid head: answer every label above the threshold.")
    threshold: float = Field(0.5, gt=0.0, lt=1.0, description="Score threshold for multi-label models.")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N or mps.")
    runtime: Literal["auto", "torch", "openvino", "null"] = Field(
        "auto",
        description="What runs the forward pass. auto: PyTorch on CUDA/MPS; on a CPU the fastest of OpenVINO "
        "and PyTorch for this model on this CPU, timed once and remembered in API_CACHE_DIR. null: no forward "
        "pass at all (scores from the first pixel), for benchmarks and tests of everything around the model.",
    )
    precision: Literal["auto", "fp32", "fp16", "bf16", "int8"] = Field(
        "auto",
        description="Compute precision. auto on a CPU: with API_EVAL_DIR, the fastest runtime and precision "
        "(fp32, bf16, INT8) whose answers agree with PyTorch fp32 on the evaluation images (API_MIN_AGREEMENT); "
        "without it, exact fp32. auto on a GPU: fp32. fp32/bf16/fp16/int8: served as asked (int8: OpenVINO, "
        "calibrated on API_EVAL_DIR, which it needs).",
    )
    eval_dir: Path | None = Field(
        None,
        description="Your own held-out images, to measure what a cheaper precision changes: one subfolder per "
        "class (labels known, accuracy reported) or images at its top (unlabeled). Part calibrates INT8, the "
        "rest is held out for the gate. In Docker: a folder in the models volume, e.g. /app/models/eval.",
    )
    min_agreement: float = Field(
        0.99,
        gt=0.0,
        le=1.0,
        description="The gate a cheaper precision must pass under API_PRECISION=auto: its top-1 answers agree "
        "with PyTorch fp32 on at least this share of the held-out evaluation images (and at least 100 of them).",
    )
    folds: str | None = Field(
        None,
        description="With API_CHECKPOINT_PATH naming a folder of folds (fold_0/best_model.pt, ...) or a glob: "
        "the folds to serve, comma-separated names (fold_0,fold_2); unset: all of them, as one model.",
    )
    temperature: float | None = Field(
        None,
        gt=0.0,
        le=100.0,
        description="Pin the softmax temperature every score is divided by; unset: fitted on a labeled "
        "API_EVAL_DIR (negative log-likelihood), else 1 (the model's own scores).",
    )
    explain_layer: str | None = Field(
        None,
        description="explain=true: the layer Grad-CAM explains at, a module name of the timm model (layer4, "
        "stages.3, blocks.6); unset: the deepest feature stage whose maps are at least 7 pixels across.",
    )
    cache_dir: Path | None = Field(
        None,
        description="Converted models (OpenVINO) and runtime choices, keyed by checkpoint sha256; "
        "unset: $XDG_CACHE_HOME/cat-breeds-api or ~/.cache/cat-breeds-api (the container's cache volume).",
    )
    compile: bool = Field(False, description="torch.compile the model, warmed up for every batch size before ready.")
    cuda_graphs: bool = Field(
        True, description="On CUDA (not compiled): replay the forward pass as one CUDA graph per batch size."
    )

    # --- throughput ------------------------------------------------------------------------------
    max_batch_size: int = Field(
        8, ge=1, le=1024, description="Most images in one forward pass (8 suits CPUs; 32-64 suit GPUs)."
    )
    max_batch_wait_ms: float = Field(
        5.0, ge=0, le=1000, description="How long a batch may wait for more images after its first one."
    )
    max_queue: int = Field(64, ge=1, description="Images admitted at once (decoding or queued); beyond: 503.")
    max_explanations: int = Field(
        1,
        ge=1,
        le=64,
        description="explain=true requests admitted at once over the service (waiting or running, one at a time, "
        "in a process of their own at idle CPU priority); beyond: 503 with Retry-After.",
    )
    request_timeout_s: float = Field(30.0, gt=0, description="Deadline for an accepted request; beyond: 504.")
    num_threads: int | None = Field(
        None, ge=1, le=1024, description="Torch intra-op threads and decode pool size; unset: from the CPU quota."
    )
    workers: int = Field(
        default_factory=lambda: default_frontends(),
        ge=1,
        validation_alias=AliasChoices("WEB_CONCURRENCY", "API_WORKERS"),
        description="HTTP front-end (worker) processes (Gunicorn's WEB_CONCURRENCY); unset or 0: the CPUs less "
        "2 on a GPU host, 1 on a CPU host.",
    )
    preprocess: Literal["auto", "frontend", "engine"] = Field(
        "auto",
        description="Where resize + crop run behind an engine process. auto/engine: in the engine (front-ends "
        "ship decoded images; a GPU resizes each batch, a CPU each image as it arrives, with torch's 8-bit "
        "kernels), where torch has the model's filter; frontend: in the front-ends (the PIL path, API_RESIZE).",
    )
    engine_linger_s: float = Field(
        10.0, ge=0, le=3600, description="How long the engine process outlives its last front-end (a reload's gap)."
    )
    model_repository: Path | None = Field(
        None,
        description="The models folder: a swap (POST /v2/repository/models/{name}/load) loads only checkpoints "
        "inside it (symlinks resolved; relative paths from it); unset: the folder holding API_CHECKPOINT_PATH.",
    )
    model_load_timeout_s: float = Field(
        300.0,
        gt=0,
        le=86400,
        description="A swap's load that takes longer is abandoned (400) and its process killed; the served "
        "model answers throughout. An engine restarted after a death that has not loaded within it is replaced.",
    )
    engine_stall_s: float = Field(
        8.0,
        ge=1,
        le=3600,
        description="An engine process that says nothing, or finishes no batch while images wait, for this long is "
        "killed and replaced (its images are sent to the next one). Keep it above the longest forward pass.",
    )
    heap_keep_mb: int = Field(
        0,
        ge=0,
        le=65536,
        description="Freed heap memory kept for the next forward pass while busy, given back once idle; 0: glibc's.",
    )
    reduced_decode: bool = Field(
        True, description="Decode large JPEGs at a reduced scale, never below the model's resize target."
    )
    resize: Literal["fast", "exact"] = Field(
        "fast",
        description="How a front-end resizes + crops (API_PREPROCESS=frontend, or an image too large to ship): "
        "fast (only the crop's region resampled: about 60 % of the CPU, "
        "pixels equal to rounding, gated against exact: top-1 >= 99.5 %, scores within 0.02) or exact (timm's "
        "own steps, bit for bit).",
    )

    # --- the HTTP service ------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Bind address (0.0.0.0 inside containers).")
    port: int = Field(8000, ge=1, le=65535)
    api_key: SecretStr | None = Field(
        None, description="When set, prediction and model routes need it (X-API-Key or Authorization: Bearer)."
    )
    api_key_file: Path | None = Field(
        None, description="Read the API key from this file (a mounted Kubernetes/Docker secret) instead."
    )
    admin_key: SecretStr | None = Field(
        None,
        description="When set, POST /v2/repository/models/{name}/load and `cat-breeds-api reload` swap the model "
        "with it (X-API-Key or Authorization: Bearer); unset: those routes are off.",
    )
    served_model_name: str = Field(
        "cat-breeds",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$",
        description="The model's name on the Open Inference Protocol routes (/v2/models/<name>), stable across swaps.",
    )
    web_ui: bool = Field(True, description="Serve the try-it page at / (false for headless deployments).")
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma-separated origins allowed by CORS; none by default."
    )
    top_k: int = Field(5, ge=1, le=1000, description="Labels returned when the request does not say.")
    min_confidence: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="An answer whose top (calibrated) score is below this is marked uncertain: true (still 200, "
        "labels given); a request's min_confidence overrides it. 0: never.",
    )
    max_upload_mb: float = Field(10.0, gt=0, le=1024, description="Largest accepted image, in MiB.")
    max_image_pixels: int = Field(
        50_000_000, ge=1, description="Largest accepted canvas (width x height), checked before decoding."
    )
    decode_budget_mp: float = Field(
        22.0,
        ge=1,
        le=1000,
        description="Most one upload may cost to decode and preprocess, in memory and in work: what a photo "
        "of this many megapixels costs as a JPEG at full scale; costlier uploads get 413 "
        "(api/engine/images/budget.py).",
    )
    max_batch_files: int = Field(16, ge=1, le=256, description="Most files in one /predict/batch request.")
    graceful_timeout_s: float = Field(20.0, gt=0, description="How long a stop waits for in-flight work.")
    shutdown_delay_s: float = Field(
        0.0,
        ge=0,
        le=300,
        description="After SIGTERM, report not-ready (503) and keep serving this long before draining, "
        "so a load balancer stops sending first (Kubernetes: a few seconds).",
    )
    log_dir: Path | None = Field(
        None, description="Also write the service log to <dir>/api.log (rotated); containers use /app/logs."
    )
    log_level: LogLevel = Field(
        "INFO", validation_alias=AliasChoices("LOG_LEVEL", "API_LOG_LEVEL"), description="LOG_LEVEL."
    )
    log_format: Literal["json", "text"] = Field(
        "json", description="json: one JSON object per line (log collectors); text: for a terminal."
    )

    @field_validator("workers", mode="before")
    @classmethod
    def _default_workers(cls, value: Any) -> Any:
        # WEB_CONCURRENCY blank or 0 (the production Compose file passes 0 when unset; Gunicorn and
        # uvicorn parse it themselves, so it must be an integer): the default
        if value is None or (isinstance(value, str) and not value.strip()) or str(value).strip() == "0":
            return default_frontends()
        return value

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        value = value.strip().lower()
        if not _DEVICE_PATTERN.match(value):
            raise ValueError("expected one of auto, cpu, cuda, cuda:N, mps")
        return value

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [origin.strip() for origin in value.split(",") if origin.strip()]
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: Any) -> Any:
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator(
        "model_name",
        "checkpoint_path",
        "class_names_path",
        "num_classes",
        "image_size",
        "log_dir",
        "num_threads",
        "api_key",
        "api_key_file",
        "admin_key",
        "cache_dir",
        "model_repository",
        "eval_dir",
        "folds",
        "temperature",
        "explain_layer",
        mode="before",
    )
    @classmethod
    def _blank_is_unset(cls, value: Any) -> Any:
        # `API_CHECKPOINT_PATH=` means "not set" (not "the current directory"), and lets the
        # environment unset what a .env file sets.
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("api_key_file")
    @classmethod
    def _readable_key_file(cls, value: Path | None) -> Path | None:
        if value is not None:
            try:
                if not value.read_text().strip():
                    raise ValueError("the file is empty; put the key in it")
            except OSError as error:
                raise ValueError(f"cannot read it ({error.strerror}); mount the secret there") from None
        return value

    @field_validator("eval_dir")
    @classmethod
    def _eval_folder(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_dir():
            raise ValueError(f"{value} is not a folder; point it at a folder of your held-out images, or unset it")
        return value

    @model_validator(mode="after")
    def _int8_needs_images(self) -> Settings:
        if self.precision == "int8" and self.eval_dir is None:
            raise ValueError(
                "API_PRECISION=int8 needs API_EVAL_DIR: INT8 is calibrated on your own images and its answers "
                "measured against fp32 there; set API_EVAL_DIR to a folder of held-out images, or use bf16/fp32"
            )
        if self.precision == "int8" and self.runtime not in ("auto", "openvino"):
            raise ValueError(
                f"API_PRECISION=int8 runs on OpenVINO, not API_RUNTIME={self.runtime}; set API_RUNTIME=auto"
            )
        return self

    @model_validator(mode="after")
    def _key_from_file(self) -> Settings:
        if self.api_key_file is not None:
            if self.api_key is not None:
                raise ValueError("API_API_KEY and API_API_KEY_FILE are both set; keep one")
            self.api_key = SecretStr(self.api_key_file.read_text().strip())
        return self

    def _group(self, group: type[_Group], **derived: Any) -> _Group:
        """A settings group: each of its fields from the setting of the same name, unless derived."""
        return group(**{f.name: derived[f.name] if f.name in derived else getattr(self, f.name) for f in fields(group)})

    @property
    def model_group(self) -> ModelSettings:
        """What the loader needs: which model, how to run it."""
        return self._group(
            ModelSettings, cache_dir=self.cache_dir if self.cache_dir is not None else default_cache_dir()
        )

    @property
    def batching_group(self) -> BatchingSettings:
        """What the serving object needs: admission, batches, deadlines, threads, decoding limits."""
        return self._group(BatchingSettings, max_batch_wait_s=self.max_batch_wait_ms / 1000)

    @property
    def http_group(self) -> HttpSettings:
        """What the app factory and the routes need: limits on requests, the key, the page, CORS."""
        return self._group(
            HttpSettings, cors_origins=tuple(self.cors_origins), max_upload_bytes=int(self.max_upload_mb * 1024 * 1024)
        )

    @property
    def process_group(self) -> ProcessSettings:
        """What the server runners need: where to listen, how to stop."""
        return self._group(ProcessSettings)


# The groups below are what each layer is handed: every field is required and has no default of its
# own; `Settings._group` fills each from the setting of the same name (a few are derived there), so a
# default lives in one place, the `Settings` field above.


@dataclass(frozen=True)
class ModelSettings:
    """The model group: passed to `api.engine.model.loader.load_classifier`."""

    checkpoint_path: Path | None
    model_name: str | None
    num_classes: int | None
    image_size: int | None
    class_names_path: Path | None
    use_ema: bool
    multi_label: bool
    threshold: float
    device: str
    runtime: str
    precision: str
    eval_dir: Path | None
    min_agreement: float
    folds: str | None
    temperature: float | None
    explain_layer: str | None
    compile: bool
    cuda_graphs: bool
    max_batch_size: int  # the largest batch the runtime will see (padded sizes, timed choices)
    cache_dir: Path | None  # None: no cache (derived: the default folder when unset)


@dataclass(frozen=True)
class BatchingSettings:
    """The batching group: passed to `api.engine.serving.service.Engine.start` and a front-end's link."""

    max_batch_size: int
    max_batch_wait_s: float  # derived from API_MAX_BATCH_WAIT_MS
    max_queue: int
    max_explanations: int
    request_timeout_s: float
    num_threads: int | None
    workers: int  # the processes sharing this host's CPUs (thread counts are divided among them)
    heap_keep_mb: int
    reduced_decode: bool
    resize: str
    preprocess: str
    max_image_pixels: int
    decode_budget_mp: float


@dataclass(frozen=True)
class HttpSettings:
    """The HTTP group: passed to the app factory; the routes read it."""

    api_key: SecretStr | None
    admin_key: SecretStr | None
    served_model_name: str
    web_ui: bool
    cors_origins: tuple[str, ...]  # derived: a tuple
    top_k: int
    min_confidence: float
    max_upload_bytes: int  # derived from API_MAX_UPLOAD_MB
    max_batch_files: int
    request_timeout_s: float  # a request's deadline, counted from its arrival


@dataclass(frozen=True)
class ProcessSettings:
    """The process group: passed to the server runners (uvicorn, the Gunicorn worker)."""

    host: str
    port: int
    workers: int
    graceful_timeout_s: float
    shutdown_delay_s: float


NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")


def default_frontends() -> int:
    """Front-end processes when WEB_CONCURRENCY is unset: on a GPU host the CPUs less two (the engine
    and the system), so decoding keeps the GPU fed; on a CPU host one (the model needs the cores)."""
    try:
        gpus = any(NVIDIA_GPUS.iterdir())
    except OSError:
        gpus = False
    return max(1, int(cpu_budget().cpus) - 2) if gpus else 1


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/cat-breeds-api, else ~/.cache/cat-breeds-api (/home/appuser/.cache in the image)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cat-breeds-api"


def _env_name(loc: tuple[int | str, ...]) -> str:
    name = str(loc[0]).upper() if loc else "?"
    if name in ("LOG_LEVEL", "API_LOG_LEVEL", "WEB_CONCURRENCY", "API_WORKERS"):  # reported as read
        return name
    return f"{ENV_PREFIX}{name}"


def describe_validation_error(error: ValidationError) -> str:
    """One line per the house rule: the variable, the bad value, what is accepted."""
    parts = []
    for item in error.errors(include_url=False):
        message = str(item["msg"]).removeprefix("Value error, ")
        if not item["loc"]:  # a rule about several settings: the message names them
            parts.append(message)
            continue
        parts.append(f"{_env_name(item['loc'])}={item.get('input')!r} is invalid: {message}")
    return "; ".join(parts)


def environment_names() -> frozenset[str]:
    """Every environment variable the settings read: API_<FIELD>, or a field's own aliases."""
    names: set[str] = set()
    for name, info in Settings.model_fields.items():
        if isinstance(info.validation_alias, AliasChoices):
            names.update(choice for choice in info.validation_alias.choices if isinstance(choice, str))
        else:
            names.add(f"API_{name.upper()}")
    return frozenset(names)


# Settings that no longer exist, and what to do instead: set, they stop start-up rather than be ignored.
REMOVED = {
    "API_INFERENCE": "each worker now sends its images to one engine process per device (swaps, fault "
    "recovery); unset it",
}


def load_settings(**overrides: Any) -> Settings:
    """Build settings, turning validation failures into a one-line `ConfigError`."""
    env_file = overrides.get("_env_file", Settings.model_config.get("env_file"))
    dotenv = dotenv_values(env_file) if isinstance(env_file, str | Path) and Path(env_file).is_file() else {}
    for name, instead in REMOVED.items():
        value = os.environ.get(name, dotenv.get(name))
        if value is not None:
            raise ConfigError(f"{name}={value!r} is no longer a setting: {instead}")
    try:
        return Settings(**overrides)
    except ValidationError as error:
        raise ConfigError(describe_validation_error(error)) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return load_settings()
