"""What a CPU load resolved, remembered in the model cache: a restart serves from it without timm.

A full load reads the checkpoint (`torch.load`), builds the timm module, derives the preprocessing
from timm's transform and only then finds the converted OpenVINO model in the cache: about 3.5 s of
importing timm and torchvision and building a PyTorch copy of a model that OpenVINO will serve. Once
a load on a CPU has chosen OpenVINO, what it resolved (architecture, labels, preprocessing recipe,
folds, the measured choice and calibration, which cached OpenVINO model serves) is written here. A
restart with the same checkpoint files (by sha256), settings, labels file, evaluation images, CPU,
threads, versions and loading code compiles that OpenVINO model directly: timm and torchvision are
never imported and no PyTorch module is built. Anything else takes the full way, which writes a new
snapshot; a snapshot whose OpenVINO model is gone from the cache is ignored.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from api import __version__
from api.config import ModelSettings
from api.engine.images.recipe import Recipe
from api.engine.model.cache import ModelCache
from api.engine.model.classifier import Classifier
from api.engine.model.ensemble import Fold
from api.engine.model.files.checkpoint import Checkpoint, file_sha256
from api.engine.model.files.folds import fold_paths
from api.engine.model.measure import evalset
from api.engine.model.runtimes import openvino_runtime
from api.engine.model.runtimes.base import Head, cpu_model_name

logger = logging.getLogger(__name__)

# the code that turns a checkpoint into what is served: a change to any of it invalidates snapshots
_LOADING_CODE = (Path(__file__).parent, Path(__file__).parents[1] / "images" / "recipe.py")


def key(settings: ModelSettings, threads: int) -> dict[str, Any] | None:
    """The cache key of the snapshot for `settings` on this CPU; None where none applies (no checkpoint,
    no cache, a runtime other than OpenVINO asked for, torch.compile)."""
    if settings.checkpoint_path is None or settings.cache_dir is None:
        return None
    if settings.runtime in ("torch", "null") or settings.compile:
        return None
    folds = fold_paths(settings.checkpoint_path, settings.folds)
    if not all(path.is_file() or path.is_dir() for _, path in folds):
        return None  # missing, or no regular file: the full load says what is wrong with it
    values = {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(settings).items()}
    values.pop("cache_dir")
    labels = settings.class_names_path
    images = evalset.scan(settings.eval_dir) if settings.eval_dir is not None else None
    try:
        files = [[name, _digest(path)] for name, path in folds]
        labels_digest = _digest(labels) if labels is not None and labels.is_file() else None
    except OSError:  # unreadable: the full load says so
        return None
    return {
        "kind": "served",
        "settings": values,
        "files": files,
        "labels_file": labels_digest,
        "eval_digest": images.digest if images is not None else None,
        "threads": threads,
        "cpu": cpu_model_name(),
        "versions": {name: _version(name) for name in ("timm", "torch", "openvino", "nncf")} | {"api": __version__},
        "code": _code_digest(),
    }


def read(cache: ModelCache, key: dict[str, Any], *, device: torch.device, device_reason: str) -> Classifier | None:
    """The classifier the snapshot under `key` describes, its OpenVINO model compiled; None without one."""
    entry = cache.get(key)
    if entry is None:
        return None
    served = entry.manifest["served"]
    model_entry = cache.get(served["openvino_key"])
    if model_entry is None:
        logger.info("model: the cache's snapshot names an OpenVINO model the cache no longer holds; loading in full")
        return None
    import openvino

    model = openvino.Core().read_model(str(model_entry.file("model.xml")))
    runtime = openvino_runtime.compile_for_cpu(
        model, head=Head(**_tuples(served["head"])), precision=served["precision"], threads=key["threads"]
    )
    checkpoint = served["checkpoint"]
    score = checkpoint.pop("recorded_score")
    logger.info("model: served as the cache's snapshot describes it (%s); the checkpoint is not read", entry.folder)
    return Classifier(
        runtime=runtime,
        split=Recipe.from_dict(served["split"]),
        transform=None,
        architecture=served["architecture"],
        class_names=tuple(served["class_names"]),
        data_config=_tuples(served["data_config"]),
        device=device,
        device_reason=device_reason,
        checkpoint=Checkpoint(**{**checkpoint, "path": Path(checkpoint["path"])}, recorded_score=_score(score)),
        folds=tuple(Fold(**{**fold, "recorded_score": _score(fold["recorded_score"])}) for fold in served["folds"]),
        labels_source=served["labels_source"],
        multi_label=served["multi_label"],
        threshold=served["threshold"],
        runtime_reason=served["runtime_reason"],
        precision_reason=served["precision_reason"],
        evaluation=served["evaluation"],
        calibration=served["calibration"],
    )


def write(cache: ModelCache, key: dict[str, Any], classifier: Classifier, openvino_key: dict[str, Any]) -> None:
    """Remember what `classifier` (served by OpenVINO, from the cache entry under `openvino_key`) is."""
    head = classifier.runtime.head  # type: ignore[attr-defined]  # an OpenVINORuntime's
    ckpt = classifier.checkpoint
    served = {
        "openvino_key": openvino_key,
        "precision": classifier.runtime.precision,
        "head": dataclasses.asdict(head),
        "split": classifier.split.to_dict(),
        "architecture": classifier.architecture,
        "class_names": list(classifier.class_names),
        "data_config": classifier.data_config,
        "checkpoint": {
            "path": str(ckpt.path),
            "format": ckpt.format,
            "sha256": ckpt.sha256,
            "weights_key": ckpt.weights_key,
            "architecture": ckpt.architecture,
            "num_classes": ckpt.num_classes,
            "class_names": ckpt.class_names,
            "recorded_score": ckpt.recorded_score,
        },
        "folds": [dataclasses.asdict(fold) for fold in classifier.folds],
        "labels_source": classifier.labels_source,
        "multi_label": classifier.multi_label,
        "threshold": classifier.threshold,
        "runtime_reason": classifier.runtime_reason,
        "precision_reason": classifier.precision_reason,
        "evaluation": classifier.evaluation,
        "calibration": classifier.calibration,
    }
    cache.put(key, lambda folder: None, extra={"served": served})


def _digest(path: Path) -> str:
    """sha256 of a checkpoint file, or of every file of a folder (a timm model folder) with its name."""
    if not path.is_dir():
        return file_sha256(path)
    digest = hashlib.sha256()
    for member in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{member.relative_to(path)}\0{file_sha256(member)}\0".encode())
    return digest.hexdigest()


def _code_digest() -> str:
    digest = hashlib.sha256()
    for root in _LOADING_CODE:
        for source in sorted(root.rglob("*.py")) if root.is_dir() else [root]:
            digest.update(source.read_bytes())
    return digest.hexdigest()


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _tuples(values: dict[str, Any]) -> dict[str, Any]:
    """JSON's lists back to the tuples the dataclasses and timm's data config hold."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}


def _score(value: Any) -> tuple[str, float] | None:
    return None if value is None else (str(value[0]), float(value[1]))
