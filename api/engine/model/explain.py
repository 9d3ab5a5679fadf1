"""Why the model answered what it did: a Grad-CAM heatmap of one label (Captum's `LayerGradCam`).

Grad-CAM weighs a convolutional layer's feature maps by the gradient of the label's logit and keeps
what speaks for the label (ReLU). The layer is the deepest feature stage timm lists (`feature_info`)
whose maps are still at least MIN_SIDE pixels across at the served input size: the last stage for
224 px models (7 x 7), an earlier one where the input is small (a 32 px model's last stage is 1 x 1:
no picture at all). Where that stage holds no positive evidence for the label (an empty map, which
explains nothing) the next shallower stage is used. Each map is scaled up to the input size and to
[0, 1]; a fold ensemble's heatmap is the mean of its folds' maps for the ensemble's label.

It runs PyTorch in fp32 even where OpenVINO serves: the folds are read again from their checkpoints
(api/engine/model/loader.py `read_folds`), in the process that explains (api/remote/host/explainer.py).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from captum.attr import LayerAttribution, LayerGradCam

from api.config import ModelSettings
from api.engine.images.recipe import Recipe
from api.errors import ConfigError

MIN_SIDE = 7


@dataclass(frozen=True)
class Heatmap:
    values: np.ndarray  # H x W float32 in [0, 1], the model's input size
    layer: str  # the stage(s) explained at, comma-separated where folds differ
    seconds: float

    def gray(self) -> np.ndarray:
        """H x W uint8, 255 where the evidence is strongest: what answers carry (a PNG)."""
        return np.round(self.values * 255).astype(np.uint8)


class GradCam:
    """Grad-CAM of `folds` (PyTorch modules on the CPU, fp32) for images prepared by `recipe`."""

    def __init__(
        self,
        folds: Sequence[torch.nn.Module],
        recipe: Recipe,
        input_size: tuple[int, int, int],
        layer: str | None = None,  # API_EXPLAIN_LAYER
    ):
        self.recipe = recipe
        self.folds = [fold.eval().float() for fold in folds]
        # per fold, its stages to try: the deepest that fits first
        self._cams = [
            [(name, LayerGradCam(fold, module)) for name, module in target_layers(fold, input_size, layer)]
            for fold in self.folds
        ]
        self._mean = torch.tensor(recipe.mean).view(1, -1, 1, 1)
        self._std = torch.tensor(recipe.std).view(1, -1, 1, 1)

    def explain(self, pixels: np.ndarray, label: int) -> Heatmap:
        """`pixels` (H x W x 3 uint8, resized and cropped) -> the heatmap of `label`."""
        started = time.perf_counter()
        batch = torch.from_numpy(np.array(pixels)).permute(2, 0, 1)[None].float().div(255)
        batch = (batch - self._mean) / self._std
        height, width = pixels.shape[:2]
        maps, used = [], []
        for stages in self._cams:
            name, values = _first_map(stages, batch, label, (height, width))
            peak = float(values.max())
            maps.append(values / peak if peak > 0 else values)
            used.append(name)
        heatmap = np.clip(np.mean(maps, axis=0), 0.0, 1.0).astype(np.float32)
        return Heatmap(heatmap, ",".join(dict.fromkeys(used)), time.perf_counter() - started)


def _first_map(
    stages: list[tuple[str, LayerGradCam]], batch: torch.Tensor, label: int, size: tuple[int, int]
) -> tuple[str, np.ndarray]:
    """The first of `stages` whose Grad-CAM map of `label` holds any positive evidence (else the last's)."""
    for stage, cam in stages:  # noqa: B007 (the stage that gave the map is answered)
        attribution = cam.attribute(batch, target=label, relu_attributions=True)
        values = (
            LayerAttribution.interpolate(attribution, size, interpolate_mode="bilinear")[0].mean(0).detach().numpy()
        )
        if values.max() > 0:
            break
    return stage, values


def target_layers(
    model: torch.nn.Module, input_size: tuple[int, int, int], named: str | None = None
) -> list[tuple[str, torch.nn.Module]]:
    """The feature stages to explain at, deepest first: `named` alone (API_EXPLAIN_LAYER), else from
    the deepest whose maps are at least MIN_SIDE across at `input_size` down to the shallowest."""
    if named is not None:
        try:
            return [(named, model.get_submodule(named))]
        except AttributeError:
            known = ", ".join(str(s["module"]) for s in getattr(model, "feature_info", []))
            raise ConfigError(
                f"API_EXPLAIN_LAYER={named}: the model has no such module; its feature stages are {known or 'none'}"
            ) from None
    stages = getattr(model, "feature_info", None)
    if not stages:
        raise ConfigError(
            f"explain=true needs a convolutional timm model (one with feature_info); {type(model).__name__} has none"
        )
    side = min(input_size[1:])
    fitting = [s for s in stages if side // int(s["reduction"]) >= MIN_SIDE] or [stages[0]]
    return [(str(s["module"]), model.get_submodule(str(s["module"]))) for s in reversed(fitting)]


def load_explainer(settings: ModelSettings) -> GradCam:
    """The served model's folds (or its one checkpoint) as PyTorch modules, ready to explain."""
    from api.engine.model.loader import read_folds

    _, _, builts = read_folds(settings)
    if any(b.scripted for b in builts):
        raise ConfigError("explain=true needs the model's weights: a TorchScript archive is not explained")
    return GradCam([b.model for b in builts], builts[0].split, builts[0].input_size, settings.explain_layer)
