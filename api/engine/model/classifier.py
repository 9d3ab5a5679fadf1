"""A loaded classifier: what is served (architecture, labels, preprocessing, checkpoint) and the
runtime that scores it. Built complete by the loader and never changed afterwards."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from api.engine.images.device_resize import resize_crop, resize_mode
from api.engine.images.recipe import Recipe
from api.engine.model.ensemble import Fold
from api.engine.model.files.checkpoint import Checkpoint
from api.engine.model.runtimes.base import Runtime
from api.engine.model.served import Served


@dataclass(frozen=True, eq=False)
class Classifier:
    runtime: Runtime
    split: Recipe  # resize + crop in the decode pool; normalisation in the runtime
    # timm's whole eval transform (the reference); None when served as the cache's snapshot describes it
    transform: Callable[[Image.Image], torch.Tensor] | None
    architecture: str
    class_names: tuple[str, ...]
    data_config: dict[str, Any]
    device: torch.device
    device_reason: str
    checkpoint: Checkpoint  # a fold ensemble's: the folds' folder, and a digest over theirs
    folds: tuple[Fold, ...]  # one, or the k folds served as one model
    labels_source: str
    multi_label: bool
    threshold: float
    runtime_reason: str = ""
    precision_reason: str = ""
    load_seconds: float = 0.0
    evaluation: dict[str, Any] | None = None  # the candidates measured on a CPU (Evaluation.to_dict())
    calibration: dict[str, Any] | None = None  # the temperature and what it did (Calibration.to_dict())

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_size(self) -> tuple[int, int, int]:
        return tuple(self.data_config["input_size"])

    @property
    def resize_short_side(self) -> int:
        """The shorter side the eval transform resizes to before cropping (timm: size / crop_pct)."""
        size = max(self.input_size[1:])
        return math.ceil(size / float(self.data_config.get("crop_pct") or 1.0))

    def prepare(self, image: Image.Image) -> np.ndarray:
        """The per-image half, for the decode pool: RGB image -> H x W x 3 uint8, resized and cropped."""
        return self.split.pixels(image)

    def ship_decoded_bytes(self, preprocess: str) -> int:
        """How large a decoded image goes to this side's resize (torch's) as it is, under
        API_PREPROCESS=`preprocess` (0: never; the decode thread resizes with Pillow, API_RESIZE).

        Up to twice the resize target on each side: a reduced-scale JPEG decode (never below the
        target) of an ordinary photo fits; anything larger is resized where it was decoded."""
        if preprocess == "frontend" or resize_mode(self.split) is None:
            return 0
        side = 2 * self.resize_short_side
        return 3 * side * side * 3 // 2

    def resize_crop(self, pixels: np.ndarray) -> np.ndarray:
        """One decoded image (H x W x 3 uint8) -> the model's input, resized and cropped on the CPU.

        What an engine on a CPU does to an image a front-end shipped, as it arrives: its main thread
        resizes while the inference thread runs the batch before (api/remote/host/host.py)."""
        return resize_crop([pixels], self.split, torch.device("cpu"))[0].numpy()

    def forward(self, items: Sequence[np.ndarray]) -> torch.Tensor:
        """The batched half: `prepare`d images -> N x C float32 scores (softmax or sigmoid) on the CPU,
        N x 2C for a fold ensemble (the scores, then their spread across folds: `Served.split`).

        Images not yet resized and cropped (decoded ones a front-end shipped, API_PREPROCESS=engine)
        are resized and cropped here, on the model's device (api/engine/images/device_resize.py)."""
        crop = self.split.crop
        if all(item.shape[:2] == crop for item in items):
            return self.runtime.forward(np.stack(items))
        batch = resize_crop(items, self.split, self.device)
        if self.runtime.name == "torch":  # takes the device tensor as it is
            return self.runtime.forward(batch)  # type: ignore[arg-type]
        return self.runtime.forward(batch.cpu().numpy())

    @property
    def served(self) -> Served:
        return Served(
            self.architecture,
            self.class_names,
            str(self.device),
            self.checkpoint.sha256,
            multi_label=self.multi_label,
            threshold=self.threshold,
            runtime=self.runtime.name,
            precision=self.runtime.precision,
            folds=len(self.folds),
        )

    def describe(self) -> dict[str, Any]:
        """What is being served, in one place: the model-info route and the ready line both read it."""
        ckpt = self.checkpoint
        runtime = self.runtime.describe()
        return {
            "architecture": self.architecture,
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "labels_source": self.labels_source,
            "multi_label": self.multi_label,
            "threshold": self.threshold if self.multi_label else None,
            "preprocessing": {k: list(v) if isinstance(v, tuple) else v for k, v in self.data_config.items()},
            "device": str(self.device),
            "device_reason": self.device_reason,
            "runtime": runtime.pop("runtime"),
            "runtime_reason": self.runtime_reason,
            "precision": runtime.pop("precision"),
            "precision_reason": self.precision_reason,
            "dtype": {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "int8": "int8"}[self.runtime.precision],
            "evaluation": self.evaluation,
            "calibration": self.calibration,
            "fold_count": len(self.folds),
            "folds": [fold.to_dict() for fold in self.folds],
            "runtime_details": runtime,
            "checkpoint_path": str(ckpt.path),
            "checkpoint_format": ckpt.format,
            "checkpoint_sha256": ckpt.sha256,
            "version": ckpt.sha256[:12],
            "weights_key": ckpt.weights_key,
            "load_seconds": round(self.load_seconds, 3),
        }
