"""API_RUNTIME and API_PRECISION -> the runtime that serves, built, and why.

PyTorch on CUDA and MPS. On a CPU, the candidates (api/engine/model/measure/evaluation.py) are measured once
and the outcome remembered in the model cache, keyed by the checkpoint, the evaluation folder's
digest, the CPU and the runtimes' versions; OpenVINO's converted and quantized models are cached
beside it. Measuring runs TorchScript-free Python for seconds to a minute (conversion, NNCF's
quantization, every candidate on every held-out image): the engine process asks for it with
`measure=False` and gets `MeasurementNeeded` when the cache lacks it, so that the prepare process
(api/remote/host/prepare.py) measures, and the engine only reads what it wrote.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from api.config import ModelSettings
from api.engine.images.recipe import Recipe
from api.engine.model.cache import ModelCache
from api.engine.model.files.checkpoint import Checkpoint
from api.engine.model.measure import evalset
from api.engine.model.measure.calibration import METHOD as CALIBRATION_METHOD
from api.engine.model.measure.calibration import Calibration, calibrate, unmeasured
from api.engine.model.measure.evaluation import Candidate, Evaluation, Spec, choose, judge, scores_of, time_runtimes
from api.engine.model.runtimes import openvino_runtime
from api.engine.model.runtimes.base import Head, Runtime, batch_buckets, cpu_has_bf16, cpu_model_name
from api.engine.model.runtimes.null_runtime import NullRuntime
from api.engine.model.runtimes.torch_runtime import TorchRuntime
from api.errors import ConfigError

logger = logging.getLogger(__name__)

SUPPORTED = {"torch": ("fp32", "bf16", "fp16"), "openvino": ("fp32", "bf16", "int8")}
SPEED_CALIBRATION = 8  # random images: enough to time an INT8 model (never served) when there is no folder


class MeasurementNeeded(Exception):
    """The cache holds no measurement for this model here: the prepare process must make one first."""


@dataclass(frozen=True)
class Built:
    """What the checkpoint resolves to, before a runtime is chosen."""

    model: torch.nn.Module
    scripted: bool
    architecture: str
    class_names: list[str]
    labels_source: str
    transform: Any
    data_config: dict[str, Any]
    split: Recipe

    @property
    def input_size(self) -> tuple[int, int, int]:
        return tuple(self.data_config["input_size"])


@dataclass(frozen=True)
class Plan:
    """Everything the runtime choice depends on: the resolved model, where and how it runs."""

    built: Built
    ckpt: Checkpoint
    settings: ModelSettings
    device: torch.device
    precision: str  # what the forward pass computes in on a GPU, or the setting (auto) on a CPU
    head: Head
    threads: int

    def torch_runtime(self, precision: str | None = None) -> TorchRuntime:
        settings, device = self.settings, self.device
        model = self.built.model.to(device)
        if device.type != "mps":
            model = model.to(memory_format=torch.channels_last)
        padded: tuple[int, ...] = ()
        if device.type == "cuda":
            # the loading thread also runs every pass: its streams, and graph capture, on this GPU
            torch.cuda.set_device(device)
            # cuDNN picks the fastest kernels per input shape, on first sight of it: batches are padded
            # to a few sizes, each benchmarked in warm_up, so no request pays for a benchmark.
            torch.backends.cudnn.benchmark = True
            padded = batch_buckets(settings.max_batch_size)
        if settings.compile:
            model = torch.compile(model)  # type: ignore[assignment]  # a compiled graph per padded size, in warm_up
            padded = batch_buckets(settings.max_batch_size)
        return TorchRuntime(model, device, self.head, precision or self.precision, padded, compiled=settings.compile)


@dataclass(frozen=True)
class Choice:
    runtime: Runtime
    runtime_reason: str
    precision_reason: str
    evaluation: Evaluation | None = None  # None: nothing was measured (a GPU, one candidate, API_RUNTIME=null)
    calibration: Calibration | None = None  # None: no temperature (no labeled images, none pinned)
    openvino_key: dict[str, Any] | None = None  # the cache entry of the OpenVINO model that serves, if one does


def choose_runtime(plan: Plan, *, measure: bool) -> Choice:
    """The runtime that serves `plan`, built, and why."""
    asked, device, precision = plan.settings.runtime, plan.device, plan.settings.precision
    if asked == "null":
        why = "API_RUNTIME=null: no forward pass (bench and tests only)"
        return Choice(NullRuntime(len(plan.built.class_names)), why, why)
    if device.type != "cpu":
        if precision == "int8":
            raise ConfigError(
                f"API_PRECISION=int8 runs on OpenVINO on a CPU, but the device is {device}; "
                "set API_PRECISION=fp16, bf16 or auto on a GPU, or API_DEVICE=cpu"
            )
        if asked == "openvino":
            raise ConfigError(
                f"API_RUNTIME=openvino runs on the CPU, but the device is {device} "
                f"(settings.device={plan.settings.device!r}); set API_DEVICE=cpu, or API_RUNTIME=auto or torch"
            )
        why = f"API_RUNTIME={asked}" if asked == "torch" else f"API_RUNTIME=auto: PyTorch on {device.type}"
        on_gpu = plan.torch_runtime()
        calibration = _calibrate_here(plan, on_gpu)
        return Choice(_tempered(on_gpu, calibration), why, _gpu_precision_reason(precision), None, calibration)
    plan = replace(plan, head=replace(plan.head, temperature=1.0))  # measured untempered; tempered once chosen
    runtimes, obstacle = _runtimes(plan)
    specs = _specs(plan, runtimes)
    folder = plan.settings.eval_dir
    images = evalset.scan(folder) if folder is not None else None
    cache = ModelCache(plan.settings.cache_dir)
    if len(specs) == 1 and images is None:  # nothing to choose, nothing to judge
        runtime, prec = specs[0]
        built = _build(plan, specs[0], cache, images)
        calibration = unmeasured(plan.settings.temperature)
        return Choice(
            _tempered(built, calibration),
            f"API_RUNTIME={asked}: {runtime}{obstacle}",
            f"API_PRECISION={precision}: {prec}",
            None,
            calibration,
            openvino_key(plan, specs[0], images),
        )
    key = _evaluation_key(plan, specs, images)
    entry = cache.get(key)
    chosen: Runtime | None = None
    if entry is not None:
        evaluation = Evaluation.from_dict(entry.manifest["evaluation"])
        calibration = Calibration.from_dict(entry.manifest["calibration"])
        logger.info("runtime: the measured choice read from the cache (%s)", entry.folder)
        try:
            chosen = _build(plan, evaluation.chosen, cache, images)
        except MeasurementNeeded:  # its INT8 model is gone from the cache (removed, or corrupt): measure again
            if not measure:
                raise
    elif not measure and cache.root is not None:
        raise MeasurementNeeded(f"{len(specs)} candidates to measure")
    if chosen is None:
        evaluation, calibration, measured = _measure(plan, specs, images, cache)
        cache.put(
            key, lambda folder: None, extra={"evaluation": evaluation.to_dict(), "calibration": calibration.to_dict()}
        )
        chosen = measured.pop(evaluation.chosen)
        del measured  # the others' memory goes now
    logger.info("runtime: %s", evaluation.summary())
    served = evaluation.served
    runtime_reason = (
        f"API_RUNTIME={asked}: {served.runtime} {served.precision} at {served.img_s:.0f} img/s, measured{obstacle}"
    )
    return Choice(
        _tempered(chosen, calibration),
        runtime_reason,
        evaluation.reason,
        evaluation,
        calibration,
        openvino_key(plan, evaluation.chosen, images),
    )


def openvino_key(plan: Plan, spec: Spec, images: evalset.EvalSet | None) -> dict[str, Any] | None:
    """The cache key of the OpenVINO model `spec` runs (None for PyTorch): converted, or quantized on
    the evaluation folder's calibration part (random pixels without one)."""
    runtime, precision = spec
    if runtime != "openvino":
        return None
    if precision != "int8":
        return _converted_key(plan)
    calibration = images.digest if images is not None else "random"
    return {
        **_converted_key(plan),
        "kind": "openvino-int8",
        "calibration": calibration,
        "nncf": openvino_runtime.nncf_version(),
    }


def _tempered(runtime: Runtime, calibration: Calibration) -> Runtime:
    """The runtime with the calibrated temperature in its head (scores only: the compiled model is the same)."""
    head = getattr(runtime, "head", None)
    if head is None or head.temperature == calibration.temperature:
        return runtime
    return replace(runtime, head=replace(head, temperature=calibration.temperature))  # type: ignore[type-var]


def _calibrate_here(plan: Plan, runtime: TorchRuntime) -> Calibration:
    """On a GPU (nothing measured): the temperature from a labeled API_EVAL_DIR, in this process."""
    folder = plan.settings.eval_dir
    images = evalset.scan(folder) if folder is not None else None
    if images is None or images.labels is None:
        return unmeasured(plan.settings.temperature)
    pixels, labels = _eval_pixels(plan, images)
    return _calibration(plan, runtime, pixels, labels, images.calibration)[0]


def _calibration(
    plan: Plan, runtime: TorchRuntime, pixels: np.ndarray, labels: np.ndarray | None, fit: int
) -> tuple[Calibration, np.ndarray]:
    """The temperature fitted on the calibration part (or pinned) and what it does on the held-out part,
    from the untempered probabilities of `runtime` (PyTorch fp32: the model as trained)."""
    classes = len(plan.built.class_names)
    raw = replace(runtime, head=replace(plan.head, temperature=1.0, per_fold=True))
    folds = scores_of(raw.forward, pixels, plan.settings.max_batch_size).reshape(len(pixels), -1, classes)
    probabilities = folds.mean(axis=1)
    multi = plan.settings.multi_label
    calibration = calibrate(
        probabilities,
        None if multi else labels,
        fit=fit,
        pinned=plan.settings.temperature,
        fold_probabilities=folds if folds.shape[1] > 1 else None,
    )
    if multi and plan.settings.temperature is None:
        calibration = replace(calibration, reason="a multi-label model: its thresholds are its calibration")
    return calibration, probabilities


def _gpu_precision_reason(precision: str) -> str:
    if precision == "auto":
        return "API_PRECISION=auto: fp32 on GPUs (set fp16 or bf16 for autocast)"
    return f"API_PRECISION={precision}"


def _runtimes(plan: Plan) -> tuple[tuple[str, ...], str]:
    """The runtimes that may serve on this CPU, and why OpenVINO is not one of them, if it is not."""
    asked = plan.settings.runtime
    if asked == "torch":
        return ("torch",), ""
    obstacle = _openvino_obstacle(plan)
    if obstacle is None:
        return (("openvino",) if asked == "openvino" else ("openvino", "torch")), ""
    if asked == "openvino" or plan.settings.precision == "int8":
        raise ConfigError(f"API_RUNTIME={asked}: {obstacle}; set API_RUNTIME=torch or auto, and API_PRECISION=auto")
    logger.info("runtime: PyTorch, since %s", obstacle)
    return ("torch",), f" (PyTorch, since {obstacle})"


def _specs(plan: Plan, runtimes: tuple[str, ...]) -> list[Spec]:
    precision = plan.settings.precision
    if precision == "auto":
        wanted = ["fp32"]
        if not plan.settings.multi_label:  # a multi-label model's thresholds are exact: fp32 only
            wanted += ["bf16"] if cpu_has_bf16() else []
            wanted += ["int8"]
    else:
        wanted = [precision]
    specs = [(r, p) for r in runtimes for p in wanted if p in SUPPORTED[r]]
    if not specs:
        offered = ", ".join(f"{r}: {'/'.join(SUPPORTED[r])}" for r in runtimes)
        raise ConfigError(
            f"API_PRECISION={precision} is not available with API_RUNTIME={plan.settings.runtime} on a CPU "
            f"({offered}); set API_RUNTIME=auto or another precision"
        )
    return specs


def _openvino_obstacle(plan: Plan) -> str | None:
    if plan.built.scripted:
        return "a TorchScript checkpoint is not converted to OpenVINO"
    if plan.settings.compile:
        return "API_COMPILE=true asks for torch.compile"
    if not openvino_runtime.available():
        return "OpenVINO is not installed (pip install openvino)"
    return None


def _evaluation_key(plan: Plan, specs: list[Spec], images: evalset.EvalSet | None) -> dict[str, Any]:
    return {
        "kind": "evaluation",
        "checkpoint_sha256": plan.ckpt.sha256,
        "architecture": plan.built.architecture,
        "input_size": list(plan.built.input_size),
        "mean": list(plan.head.mean),
        "std": list(plan.head.std),
        "candidates": [list(spec) for spec in specs],
        "precision": plan.settings.precision,
        "min_agreement": plan.settings.min_agreement,
        "temperature": plan.settings.temperature,
        "calibration": CALIBRATION_METHOD,
        "eval_digest": images.digest if images is not None else None,
        "batch": plan.settings.max_batch_size,
        "threads": plan.threads,
        "cpu": cpu_model_name(),
        "openvino": openvino_runtime.openvino_version() if openvino_runtime.available() else None,
        "torch": torch.__version__,
    }


def _measure(
    plan: Plan, specs: list[Spec], images: evalset.EvalSet | None, cache: ModelCache
) -> tuple[Evaluation, Calibration, dict[Spec, Runtime]]:
    started = time.perf_counter()
    pixels, labels = _eval_pixels(plan, images)
    calibration = images.calibration if images is not None else len(pixels)
    # read (and checksummed) once for every OpenVINO candidate, not once each
    converted = _openvino_model(plan, cache) if any(runtime == "openvino" for runtime, _ in specs) else None
    runtimes: dict[Spec, Runtime] = {}
    for spec in specs:
        try:
            runtimes[spec] = _build(plan, spec, cache, images, pixels[:calibration], converted)
        except ConfigError as error:
            if plan.settings.precision != "auto":
                raise
            logger.warning("runtime: %s %s left out: %s", *spec, error)
    specs = list(runtimes)
    rates = time_runtimes(runtimes, plan.built.input_size, plan.settings.max_batch_size)
    candidates = [Candidate(runtime, precision, rates[(runtime, precision)]) for runtime, precision in specs]
    tempering = unmeasured(plan.settings.temperature)
    if images is not None:
        held = pixels[calibration:]
        batch, classes = plan.settings.max_batch_size, len(plan.built.class_names)
        # the model as trained (PyTorch fp32, untempered): the reference, and the temperature's fit
        fit = calibration if labels is not None else 0
        tempering, probabilities = _calibration(
            plan,
            plan.torch_runtime("fp32"),
            pixels[calibration - fit :],
            (labels[calibration - fit :] if labels is not None else None),
            fit,
        )
        reference = probabilities[fit:]
        held_labels = labels[calibration:] if labels is not None else None
        candidates = [
            judge(
                c,
                scores_of(runtimes[c.spec].forward, held, batch)[:, :classes],
                reference,
                held_labels,
                min_agreement=plan.settings.min_agreement,
            )
            for c in candidates
        ]
    evaluation = choose(
        candidates,
        asked=plan.settings.precision,
        min_agreement=plan.settings.min_agreement,
        held_out=images.held_out if images is not None else None,
    )
    if images is not None:
        evaluation = Evaluation(
            evaluation.candidates, evaluation.chosen, evaluation.reason, evaluation.min_agreement, images.describe()
        )
    logger.info("runtime: %d candidates measured in %.1fs", len(specs), time.perf_counter() - started)
    return evaluation, tempering, runtimes


def _eval_pixels(plan: Plan, images: evalset.EvalSet | None) -> tuple[np.ndarray, np.ndarray | None]:
    """The evaluation images through the serving preprocessing, and each one's label index (-1: a class
    the model does not have), or random pixels to time an INT8 model by."""
    if images is None:
        height, width = plan.built.input_size[1:]
        noise = np.random.default_rng(1).integers(0, 256, (SPEED_CALIBRATION, height, width, 3), dtype=np.uint8)
        return noise, None
    pixels, kept = evalset.read_pixels(images.files, plan.built.split)
    if len(kept) < len(images.files):
        raise ConfigError(
            f"API_EVAL_DIR={images.folder}: {len(images.files) - len(kept)} of {len(images.files)} images cannot be "
            "read; remove them or convert them to JPEG or PNG"
        )
    if images.labels is None:
        return pixels, None
    index = {name: i for i, name in enumerate(plan.built.class_names)}
    return pixels, np.array([index.get(label, -1) for label in images.labels])


def _build(
    plan: Plan,
    spec: Spec,
    cache: ModelCache,
    images: evalset.EvalSet | None,
    calibration: np.ndarray | None = None,
    converted: Any = None,  # the converted OpenVINO model, when the caller has it already
) -> Runtime:
    runtime, precision = spec
    if runtime == "torch":
        return plan.torch_runtime(precision)
    model = converted if converted is not None else _openvino_model(plan, cache)
    if precision == "int8":
        model = _int8_model(plan, model, cache, images, calibration)
    return openvino_runtime.compile_for_cpu(model, head=plan.head, precision=precision, threads=plan.threads)


def _converted_key(plan: Plan) -> dict[str, Any]:
    return {
        "kind": "openvino",
        "checkpoint_sha256": plan.ckpt.sha256,
        "architecture": plan.built.architecture,
        "num_classes": len(plan.built.class_names),
        "input_size": list(plan.built.input_size),
        "mean": list(plan.head.mean),
        "std": list(plan.head.std),
        "openvino": openvino_runtime.openvino_version(),
        "batch": "dynamic",
    }


def _openvino_model(plan: Plan, cache: ModelCache) -> Any:
    import openvino

    key = _converted_key(plan)
    entry = cache.get(key)
    if entry is not None:
        logger.info("runtime: OpenVINO model read from the cache (%s)", entry.folder)
        return openvino.Core().read_model(str(entry.file("model.xml")))
    started = time.perf_counter()
    model = openvino_runtime.convert(plan.built.model, plan.built.input_size, plan.head)
    # weights kept as they are (f32): the converter's default would store them as fp16
    cache.put(key, lambda folder: openvino.save_model(model, str(folder / "model.xml"), compress_to_fp16=False))
    logger.info("runtime: converted the model to OpenVINO in %.1fs", time.perf_counter() - started)
    return model


def _int8_model(
    plan: Plan, model: Any, cache: ModelCache, images: evalset.EvalSet | None, calibration: np.ndarray | None
) -> Any:
    """The converted model quantized on the evaluation folder's calibration part (cached by its digest),
    or, with no folder, on random pixels: only to time it (never served)."""
    import openvino

    key = openvino_key(plan, ("openvino", "int8"), images)
    assert key is not None
    entry = cache.get(key)
    if entry is not None:
        return openvino.Core().read_model(str(entry.file("model.xml")))
    if calibration is None:
        raise MeasurementNeeded("the INT8 model is not in the cache")
    started = time.perf_counter()
    quantized = openvino_runtime.quantize_int8(model, calibration)
    cache.put(key, lambda folder: openvino.save_model(quantized, str(folder / "model.xml"), compress_to_fp16=False))
    logger.info("runtime: quantized to INT8 on %d images in %.1fs", len(calibration), time.perf_counter() - started)
    return quantized
