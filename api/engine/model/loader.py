"""Load a classifier: checkpoint + timm architecture + labels + preprocessing + device + runtime, warmed up.

`load_classifier(ModelSettings)` is the loader; what it returns is complete and immutable
(api/engine/model/classifier.py). A folder (or glob) of k folds is read fold by fold and served as
one model (api/engine/model/files/folds.py, ensemble.py). The runtime and precision (API_RUNTIME,
API_PRECISION, API_EVAL_DIR) are chosen by api/engine/model/choice.py: PyTorch on CUDA and MPS; on a
CPU, by measurement.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any

import torch
from PIL import Image

from api.config import DEFAULT_MODEL_NAME, DEFAULT_NUM_CLASSES, ModelSettings
from api.engine.model import snapshot
from api.engine.model.cache import ModelCache
from api.engine.model.choice import Built, Plan, choose_runtime
from api.engine.model.classifier import Classifier
from api.engine.model.device import resolve_device
from api.engine.model.ensemble import Fold, FoldEnsemble, check_folds, common_folder, ensemble_sha256
from api.engine.model.files.checkpoint import Checkpoint, read_checkpoint
from api.engine.model.files.folds import fold_paths
from api.engine.model.files.labels import resolve_class_names
from api.engine.model.runtimes.base import Head
from api.engine.model.runtimes.torch_runtime import TorchRuntime
from api.errors import CheckpointMismatch, ConfigError, first_line

logger = logging.getLogger(__name__)


def load_classifier(settings: ModelSettings, *, threads: int = 1, measure: bool = True) -> Classifier:
    """Build the classifier described by the checkpoint, with settings as explicit overrides.

    Metadata in the checkpoint wins over settings; a setting that would give wrong answers
    (e.g. `num_classes` differing from the classifier's outputs) stops the load with both numbers.
    `threads` is what the runtime may use (the CPU quota's share; torch's own are set by the caller).
    `measure=False`: MeasurementNeeded instead of measuring the candidate runtimes on a CPU (the engine
    process: its prepare process measures, api/engine/model/choice.py).
    """
    if settings.checkpoint_path is None:
        raise ConfigError(
            "API_CHECKPOINT_PATH is not set; point it at your checkpoint file or timm model folder "
            "(e.g. outputs/checkpoints/fold_0/best_model.pt), or run `make run` to serve the demo model"
        )
    started = time.perf_counter()
    device, device_reason = resolve_device(settings.device)
    cache, snapshot_key = ModelCache(settings.cache_dir), None
    if device.type == "cpu":
        snapshot_key = snapshot.key(settings, threads)
        warm = snapshot.read(cache, snapshot_key, device=device, device_reason=device_reason) if snapshot_key else None
        if warm is not None:
            warm_up(warm)
            return replace(warm, load_seconds=time.perf_counter() - started)
    names, ckpts, builts = read_folds(settings)
    built, ckpt, folds = _as_one(names, ckpts, builts)
    precision = "fp32" if settings.precision == "auto" else settings.precision  # a GPU's; a CPU measures
    head = Head(built.split.mean, built.split.std, settings.multi_label, temperature=settings.temperature or 1.0)
    choice = choose_runtime(Plan(built, ckpt, settings, device, precision, head, threads), measure=measure)
    runtime = choice.runtime
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
        folds=folds,
        labels_source=built.labels_source,
        multi_label=settings.multi_label,
        threshold=settings.threshold,
        runtime_reason=choice.runtime_reason,
        precision_reason=choice.precision_reason,
        evaluation=choice.evaluation.to_dict() if choice.evaluation is not None else None,
        calibration=choice.calibration.to_dict() if choice.calibration is not None else None,
    )
    warm_up(classifier)
    if snapshot_key is not None and choice.openvino_key is not None:
        snapshot.write(cache, snapshot_key, classifier, choice.openvino_key)
    if isinstance(runtime, TorchRuntime) and settings.cuda_graphs and device.type == "cuda" and not settings.compile:
        graphed = runtime.with_cuda_graphs(classifier.input_size)  # after warm-up: cuDNN benchmarked every size
        if graphed is not runtime:
            classifier = replace(classifier, runtime=graphed)
            warm_up(classifier)  # every size replayed once, through the serving path
    return replace(classifier, load_seconds=time.perf_counter() - started)


def read_folds(settings: ModelSettings) -> tuple[list[str], list[Checkpoint], list[Built]]:
    """Every fold API_CHECKPOINT_PATH names (one for a single checkpoint), each built as a PyTorch module."""
    assert settings.checkpoint_path is not None
    ckpts, builts = [], []
    named = fold_paths(settings.checkpoint_path, settings.folds)
    for _, path in named:
        ckpt = read_checkpoint(path, use_ema=settings.use_ema)
        builts.append(_build(ckpt, settings))
        ckpt.state_dict = {}  # the model owns the weights now; don't keep a second copy alive
        ckpts.append(ckpt)
    return [name for name, _ in named], ckpts, builts


def _as_one(
    names: list[str], ckpts: list[Checkpoint], builts: list[Built]
) -> tuple[Built, Checkpoint, tuple[Fold, ...]]:
    """The folds as one model (api/engine/model/ensemble.py), or the one checkpoint as it is."""
    folds = tuple(
        Fold(name, str(c.path), c.sha256, b.architecture, c.recorded_score)
        for name, c, b in zip(names, ckpts, builts, strict=True)
    )
    if len(builts) == 1:
        return builts[0], ckpts[0], folds
    scripted = next((name for name, b in zip(names, builts, strict=True) if b.scripted), None)
    if scripted is not None:
        raise ConfigError(
            f"fold {scripted} is a TorchScript archive; an ensemble is built from weights: save each fold's "
            "state_dict (or a timm model folder)"
        )
    check_folds(names, [{"class_names": b.class_names, "preprocessing": b.data_config} for b in builts])
    first = builts[0]
    architectures = sorted({b.architecture for b in builts})
    built = replace(first, model=FoldEnsemble([b.model for b in builts]).eval(), architecture="+".join(architectures))
    ckpt = Checkpoint(
        path=common_folder([c.path for c in ckpts]),
        format=ckpts[0].format,
        sha256=ensemble_sha256([c.sha256 for c in ckpts]),
        weights_key=ckpts[0].weights_key,
        architecture=built.architecture,
        num_classes=len(first.class_names),
        class_names=list(first.class_names),
    )
    logger.info("%d folds served as one model: %s", len(builts), ", ".join(names))
    return built, ckpt, folds


def _build(ckpt: Checkpoint, settings: ModelSettings) -> Built:
    import timm  # here, not at the top: a load from the cache's snapshot never imports it

    from api.engine.model.preprocess import build_transform, split_transform

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
    return Built(
        model.eval(), ckpt.scripted is not None, architecture, names, labels_source, transform, data_config, split
    )


def warm_up(classifier: Classifier) -> None:
    """Forward passes at the serving input size through the serving path, so no request pays
    for the first one. A padded model (compiled, or on CUDA) is run at every batch size it will
    meet (compilation and cuDNN's benchmarks happen here, before the service reports ready); any
    other once."""
    height, width = classifier.input_size[1:]
    item = classifier.prepare(Image.new("RGB", (width * 2, height * 2)))
    for size in classifier.runtime.padded_sizes or (1,):
        scores = classifier.forward([item] * size)
    if scores.shape[-1] != classifier.served.width:
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
    import timm

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
    import timm

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
