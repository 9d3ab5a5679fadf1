"""Load a classifier: checkpoint + timm architecture + labels + preprocessing + device + runtime, warmed up.

`load_classifier(ModelSettings)` is the loader; what it returns is complete and immutable
(api/engine/model/classifier.py). The runtime is chosen here (API_RUNTIME, API_PRECISION): PyTorch on
CUDA and MPS; on a CPU OpenVINO or PyTorch, whichever is faster for this model on this CPU, timed
once and remembered in the model cache with the converted model.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import timm
import torch
from PIL import Image

from api.config import DEFAULT_MODEL_NAME, DEFAULT_NUM_CLASSES, ModelSettings
from api.engine.images.recipe import Recipe
from api.engine.model.cache import ModelCache
from api.engine.model.checkpoint import Checkpoint, read_checkpoint
from api.engine.model.classifier import Classifier
from api.engine.model.device import resolve_device
from api.engine.model.labels import resolve_class_names
from api.engine.model.preprocess import build_transform, split_transform
from api.engine.model.runtimes import openvino_runtime
from api.engine.model.runtimes.base import (
    Head,
    Precision,
    Runtime,
    batch_buckets,
    cpu_has_bf16,
    cpu_model_name,
    resolve_precision,
)
from api.engine.model.runtimes.null_runtime import NullRuntime
from api.engine.model.runtimes.torch_runtime import TorchRuntime
from api.errors import CheckpointMismatch, ConfigError, first_line

logger = logging.getLogger(__name__)

TIMED_PASSES = 3  # per candidate, interleaved, after one untimed pass each


@dataclass(frozen=True)
class _Built:
    """What the checkpoint resolves to, before a runtime is chosen."""

    model: torch.nn.Module
    scripted: bool
    architecture: str
    class_names: list[str]
    labels_source: str
    transform: Any
    data_config: dict[str, Any]
    split: Recipe


def load_classifier(settings: ModelSettings, *, threads: int = 1) -> Classifier:
    """Build the classifier described by the checkpoint, with settings as explicit overrides.

    Metadata in the checkpoint wins over settings; a setting that would give wrong answers
    (e.g. `num_classes` differing from the classifier's outputs) stops the load with both numbers.
    `threads` is what the runtime may use (the CPU quota's share; torch's own are set by the caller).
    """
    if settings.checkpoint_path is None:
        raise ConfigError(
            "API_CHECKPOINT_PATH is not set; point it at your checkpoint file or timm model folder "
            "(e.g. outputs/checkpoints/fold_0/best_model.pt), or run `make run` to serve the demo model"
        )
    started = time.perf_counter()
    device, device_reason = resolve_device(settings.device)
    ckpt = read_checkpoint(settings.checkpoint_path, use_ema=settings.use_ema)
    built = _build(ckpt, settings)
    ckpt.state_dict = {}  # the model owns the weights now; don't keep a second copy alive
    precision = resolve_precision(
        settings.precision,
        device,
        multi_label=settings.multi_label,
        has_bf16=device.type == "cpu" and cpu_has_bf16(),
    )
    head = Head(built.split.mean, built.split.std, settings.multi_label)
    runtime, runtime_reason = _choose_runtime(_Plan(built, ckpt, settings, device, precision, head, threads))
    classifier = Classifier(
        runtime=runtime,
        split=built.split,
        transform=built.transform,
        architecture=built.architecture,
        class_names=tuple(built.class_names),
        data_config=built.data_config,
        device=device,
        device_reason=device_reason,
        checkpoint=ckpt,
        labels_source=built.labels_source,
        multi_label=settings.multi_label,
        threshold=settings.threshold,
        runtime_reason=runtime_reason,
        precision_reason=precision.reason,
    )
    warm_up(classifier)
    if isinstance(runtime, TorchRuntime) and settings.cuda_graphs and device.type == "cuda" and not settings.compile:
        graphed = runtime.with_cuda_graphs(classifier.input_size)  # after warm-up: cuDNN benchmarked every size
        if graphed is not runtime:
            classifier = replace(classifier, runtime=graphed)
            warm_up(classifier)  # every size replayed once, through the serving path
    return replace(classifier, load_seconds=time.perf_counter() - started)


def _build(ckpt: Checkpoint, settings: ModelSettings) -> _Built:
    model: torch.nn.Module
    if ckpt.scripted is not None:
        model, architecture = ckpt.scripted, settings.model_name or DEFAULT_MODEL_NAME
        with torch.device("meta"):  # only its data config is needed: no memory, no weights
            reference = timm.create_model(architecture, pretrained=False)
        transform, data_config = build_transform(reference, image_size=settings.image_size)
        outputs = _scripted_outputs(model, data_config)
        classes = _reconcile_num_classes(ckpt, settings.num_classes, outputs, what="TorchScript model output")
    else:
        architecture = _reconcile_architecture(ckpt, settings.model_name)
        classes, model = _build_timm_model(ckpt, architecture, settings.num_classes)
        transform, data_config = build_transform(model, image_size=settings.image_size)
    names, labels_source = resolve_class_names(
        classes,
        from_checkpoint=ckpt.class_names,
        labels_path=settings.class_names_path,
        checkpoint_path=ckpt.path,
    )
    split = split_transform(transform)
    if split is None:
        raise ConfigError(f"preprocessing {transform} is not timm's eval shape (resize, crop, to-tensor, normalize)")
    return _Built(
        model.eval(), ckpt.scripted is not None, architecture, names, labels_source, transform, data_config, split
    )


@dataclass(frozen=True)
class _Plan:
    """Everything the runtime choice depends on: the resolved model, where and how it runs."""

    built: _Built
    ckpt: Checkpoint
    settings: ModelSettings
    device: torch.device
    precision: Precision
    head: Head
    threads: int

    def torch_runtime(self) -> TorchRuntime:
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
        return TorchRuntime(model, device, self.head, self.precision.value, padded, compiled=settings.compile)


def _choose_runtime(plan: _Plan) -> tuple[Runtime, str]:
    """API_RUNTIME -> the runtime, and why it is that one (for the ready line)."""
    asked, device = plan.settings.runtime, plan.device
    if asked == "null":
        return NullRuntime(len(plan.built.class_names)), "API_RUNTIME=null: no forward pass (bench and tests only)"
    if asked == "torch" or device.type != "cpu":
        if asked == "openvino":
            raise ConfigError(
                f"API_RUNTIME=openvino runs on the CPU, but the device is {device} "
                f"(settings.device={plan.settings.device!r}); set API_DEVICE=cpu, or API_RUNTIME=auto or torch"
            )
        why = f"API_RUNTIME={asked}" if asked == "torch" else f"API_RUNTIME=auto: PyTorch on {device.type}"
        return plan.torch_runtime(), why
    obstacle = _openvino_obstacle(plan.built, plan.settings)
    if obstacle is not None:
        if asked == "openvino":
            raise ConfigError(f"API_RUNTIME=openvino: {obstacle}; set API_RUNTIME=torch or auto")
        logger.info("runtime: PyTorch, since %s", obstacle)
        return plan.torch_runtime(), f"API_RUNTIME=auto: PyTorch ({obstacle})"
    cache = ModelCache(plan.settings.cache_dir)
    try:
        openvino = _openvino(plan, cache)
    except ConfigError as error:
        if asked == "openvino":
            raise ConfigError(f"API_RUNTIME=openvino: {error}; set API_RUNTIME=torch or auto") from None
        logger.warning("runtime: PyTorch, since %s", error)
        return plan.torch_runtime(), f"API_RUNTIME=auto: PyTorch ({error})"
    if asked == "openvino":
        return openvino, "API_RUNTIME=openvino"
    return _faster(plan, openvino, cache)


def _openvino_obstacle(built: _Built, settings: ModelSettings) -> str | None:
    if built.scripted:
        return "a TorchScript checkpoint is not converted to OpenVINO"
    if settings.compile:
        return "API_COMPILE=true asks for torch.compile"
    if not openvino_runtime.available():
        return "OpenVINO is not installed (pip install openvino)"
    return None


def _openvino(plan: _Plan, cache: ModelCache) -> Runtime:
    import openvino

    built, head = plan.built, plan.head
    key = {
        "kind": "openvino",
        "checkpoint_sha256": plan.ckpt.sha256,
        "architecture": built.architecture,
        "num_classes": len(built.class_names),
        "input_size": list(built.data_config["input_size"]),
        "mean": list(head.mean),
        "std": list(head.std),
        "openvino": openvino_runtime.openvino_version(),
        "batch": "dynamic",
    }
    entry = cache.get(key)
    if entry is not None:
        model = openvino.Core().read_model(str(entry.file("model.xml")))
        logger.info("runtime: OpenVINO model read from the cache (%s)", entry.folder)
    else:
        started = time.perf_counter()
        model = openvino_runtime.convert(built.model, tuple(built.data_config["input_size"]), head)
        # weights kept as they are (f32): the converter's default would store them as fp16
        cache.put(key, lambda folder: openvino.save_model(model, str(folder / "model.xml"), compress_to_fp16=False))
        logger.info("runtime: converted the model to OpenVINO in %.1fs", time.perf_counter() - started)
    return openvino_runtime.compile_for_cpu(model, head=head, precision=plan.precision.value, threads=plan.threads)


def _faster(plan: _Plan, openvino: Runtime, cache: ModelCache) -> tuple[Runtime, str]:
    """API_RUNTIME=auto on a CPU: the faster of OpenVINO and PyTorch at the largest batch, timed
    once per architecture, CPU, precision and thread count, and remembered in the cache.

    Speed does not depend on the weights: a retrained checkpoint of the same architecture (a model
    swap, most often) reuses the timing made before, when nothing else was running."""
    batch = plan.settings.max_batch_size
    key = {
        "kind": "choice",
        "architecture": plan.built.architecture,
        "num_classes": len(plan.built.class_names),
        "model_args": plan.ckpt.model_args,
        "input_size": list(plan.built.data_config["input_size"]),
        "precision": plan.precision.value,
        "batch": batch,
        "threads": plan.threads,
        "cpu": cpu_model_name(),
        "openvino": openvino_runtime.openvino_version(),
        "torch": torch.__version__,
    }
    entry = cache.get(key)
    if entry is not None and entry.manifest.get("runtime") in ("openvino", "torch"):
        rates = entry.manifest.get("images_per_s", {})
        chosen = entry.manifest["runtime"]
        why = f"API_RUNTIME=auto: {chosen} (timed earlier on this CPU: {_rates(rates)}; cached)"
        logger.info("runtime: %s", why)
        return (openvino if chosen == "openvino" else plan.torch_runtime()), why
    candidates: dict[str, Runtime] = {"openvino": openvino, "torch": plan.torch_runtime()}
    rates = _time(candidates, plan.built, batch)
    chosen = max(rates, key=rates.__getitem__)
    cache.put(key, lambda folder: None, extra={"runtime": chosen, "images_per_s": rates})
    why = f"API_RUNTIME=auto: {chosen} (timed now at batch {batch}: {_rates(rates)})"
    logger.info("runtime: %s", why)
    return candidates[chosen], why


def _rates(rates: dict[str, float]) -> str:
    return ", ".join(f"{name} {rate:.1f} img/s" for name, rate in sorted(rates.items(), key=lambda kv: -kv[1]))


def _time(candidates: dict[str, Runtime], built: _Built, batch: int) -> dict[str, float]:
    height, width = built.data_config["input_size"][1:]
    pixels = np.random.default_rng(0).integers(0, 256, (batch, height, width, 3), dtype=np.uint8)
    seconds: dict[str, list[float]] = {name: [] for name in candidates}
    for runtime in candidates.values():
        runtime.forward(pixels)  # first pass: allocation, kernel selection
    for _ in range(TIMED_PASSES):  # interleaved: this machine drifts over seconds
        for name, runtime in candidates.items():
            started = time.perf_counter()
            runtime.forward(pixels)
            seconds[name].append(time.perf_counter() - started)
    return {name: round(batch / statistics.median(times), 2) for name, times in seconds.items()}


def warm_up(classifier: Classifier) -> None:
    """Forward passes at the serving input size through the serving path, so no request pays
    for the first one. A padded model (compiled, or on CUDA) is run at every batch size it will
    meet (compilation and cuDNN's benchmarks happen here, before the service reports ready); any
    other once."""
    height, width = classifier.input_size[1:]
    item = classifier.prepare(Image.new("RGB", (width * 2, height * 2)))
    for size in classifier.runtime.padded_sizes or (1,):
        scores = classifier.forward([item] * size)
    if scores.shape[-1] != classifier.num_classes:
        raise CheckpointMismatch(
            f"the model answers {scores.shape[-1]} scores but {classifier.num_classes} classes are configured"
        )


def _reconcile_architecture(ckpt: Checkpoint, model_name: str | None) -> str:
    if ckpt.architecture and model_name and ckpt.architecture != model_name:
        logger.warning(
            "API_MODEL_NAME=%s ignored: checkpoint %s says it is a %s",
            model_name,
            ckpt.path,
            ckpt.architecture,
        )
    architecture = ckpt.architecture or model_name or DEFAULT_MODEL_NAME
    if not timm.is_model(architecture):
        source = "the checkpoint's metadata" if ckpt.architecture else "API_MODEL_NAME"
        raise ConfigError(
            f"unknown architecture {architecture!r} (from {source}); use a timm model name such as "
            "resnet50, efficientnet_b3 or convnext_base (timm.list_models() lists them)"
        )
    return architecture


def _reconcile_num_classes(ckpt: Checkpoint, setting: int | None, outputs: int | None, *, what: str) -> int:
    """Decide the number of classes from metadata, the weights' shape and the setting."""
    declared = ckpt.num_classes or (len(ckpt.class_names) if ckpt.class_names else None)
    if declared and outputs and declared != outputs:
        raise CheckpointMismatch(f"checkpoint {ckpt.path} declares {declared} classes but its {what} has {outputs}")
    found = outputs or declared
    if setting is not None and found is not None and setting != found:
        raise CheckpointMismatch(
            f"API_NUM_CLASSES={setting} but checkpoint {ckpt.path} has {found} classes ({what}); "
            f"set API_NUM_CLASSES={found} or unset it, or point API_CHECKPOINT_PATH at the right checkpoint"
        )
    return found or setting or DEFAULT_NUM_CLASSES


def _classifier_outputs(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> tuple[str, int | None]:
    head = model.get_classifier() if hasattr(model, "get_classifier") else None  # type: ignore[operator]
    name = next((n for n, module in model.named_modules() if module is head), "") if head is not None else ""
    weight = state_dict.get(f"{name}.weight") if name else None
    return name, int(weight.shape[0]) if weight is not None and weight.ndim >= 1 else None


def _build_timm_model(ckpt: Checkpoint, architecture: str, setting: int | None) -> tuple[int, torch.nn.Module]:
    overlay = ckpt.pretrained_cfg or None
    model_args = {k: v for k, v in ckpt.model_args.items() if k != "num_classes"}

    def create(classes: int) -> torch.nn.Module:
        return timm.create_model(
            architecture, pretrained=False, num_classes=classes, pretrained_cfg_overlay=overlay, **model_args
        )

    guess = ckpt.num_classes or setting or DEFAULT_NUM_CLASSES
    model = create(guess)
    head, outputs = _classifier_outputs(model, ckpt.state_dict)
    classes = _reconcile_num_classes(ckpt, setting, outputs, what=f"classifier '{head or '?'}'")
    if classes != guess:
        logger.info("API_NUM_CLASSES not set: using the checkpoint's %d classes", classes)
        model = create(classes)
    _load_weights(model, ckpt, architecture)
    return classes, model


def _load_weights(model: torch.nn.Module, ckpt: Checkpoint, architecture: str) -> None:
    expected = model.state_dict()
    given = ckpt.state_dict
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    reshaped = [k for k in expected if k in given and given[k].shape != expected[k].shape]
    if missing or unexpected or reshaped:
        details = []
        if missing:
            details.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if reshaped:
            key = reshaped[0]
            details.append(
                f"{len(reshaped)} with other shapes (e.g. {key}: {tuple(given[key].shape)} vs "
                f"{tuple(expected[key].shape)})"
            )
        raise CheckpointMismatch(
            f"checkpoint {ckpt.path} does not fit architecture {architecture}: {len(given)} tensors, "
            f"{'; '.join(details)}; set API_MODEL_NAME to the architecture it was trained with"
        )
    model.load_state_dict(given, strict=True)


def _scripted_outputs(model: torch.nn.Module, data_config: dict[str, Any]) -> int | None:
    with torch.inference_mode():
        try:
            out = model.eval()(torch.zeros((1, *data_config["input_size"])))
        except Exception as error:  # a scripted graph fails with RuntimeErrors carrying C++ traces
            raise CheckpointMismatch(f"TorchScript model failed a test forward pass: {first_line(error)}") from None
    if isinstance(out, tuple | list):
        out = out[0]
    return int(out.shape[-1])
