"""Load a classifier: checkpoint + timm architecture + labels + preprocessing + device, warmed up."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from PIL import Image

from api.checkpoint import Checkpoint, read_checkpoint
from api.config import DEFAULT_MODEL_NAME, DEFAULT_NUM_CLASSES
from api.device import resolve_device
from api.errors import CheckpointMismatch, ConfigError
from api.labels import resolve_class_names
from api.preprocess import SplitTransform, build_transform, split_transform

logger = logging.getLogger(__name__)

_AUTOCAST: dict[str, torch.dtype | None] = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Classifier:
    """A loaded, warmed-up model and everything needed to turn its outputs into answers."""

    model: torch.nn.Module
    architecture: str
    class_names: list[str]
    transform: Callable[[Image.Image], torch.Tensor]
    data_config: dict[str, Any]
    device: torch.device
    device_reason: str
    checkpoint: Checkpoint
    multi_label: bool = False
    threshold: float = 0.5
    labels_source: str = ""
    load_seconds: float = 0.0
    dtype: torch.dtype = torch.float32
    autocast: torch.dtype | None = None  # fp16/bf16 autocast of the forward pass (API_PRECISION)
    padded_sizes: tuple[int, ...] = ()  # batches are padded to these sizes (compiled / CUDA: no new shapes)
    graphs: CudaGraphs | None = None  # on CUDA: the forward pass replayed per padded size (API_CUDA_GRAPHS)
    split: SplitTransform | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.split = split_transform(self.transform)
        if self.split is not None:
            self._mean = torch.tensor(self.split.mean, device=self.device).view(1, -1, 1, 1)
            self._std = torch.tensor(self.split.std, device=self.device).view(1, -1, 1, 1)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_size(self) -> tuple[int, int, int]:
        return tuple(self.data_config["input_size"])  # type: ignore[return-value]

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """RGB image -> normalised CHW float tensor (on the CPU): the whole timm transform."""
        return self.transform(image)

    def prepare(self, image: Image.Image) -> np.ndarray | torch.Tensor:
        """The per-image part of preprocessing, for the decode pool: uint8 pixels when the
        transform splits (no torch op), else the whole transform."""
        return self.split.pixels(image) if self.split else self.transform(image)

    @torch.inference_mode()
    def predict_prepared(self, items: list[np.ndarray] | list[torch.Tensor]) -> torch.Tensor:
        """Scores for `prepare`d images: the batched half of preprocessing, then the forward pass."""
        if self.split is None:
            return self.predict(torch.stack(items))  # type: ignore[arg-type]
        pixels = self._to_device(torch.from_numpy(np.stack(items)))  # N x H x W x 3 uint8
        # NHWC permuted to NCHW is channels_last in memory already: no copy for the model's layout.
        batch = pixels.permute(0, 3, 1, 2).float().div_(255).sub_(self._mean).div_(self._std)
        return self._forward(batch)

    def _to_device(self, batch: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":  # pinned host memory lets the copy overlap with compute
            return batch.pin_memory().to(self.device, non_blocking=True)
        return batch.to(self.device)

    @property
    def resize_short_side(self) -> int:
        """The shorter side the eval transform resizes to before cropping (timm: size / crop_pct)."""
        size = max(self.input_size[1:])
        return math.ceil(size / float(self.data_config.get("crop_pct") or 1.0))

    @torch.inference_mode()
    def predict(self, batch: torch.Tensor) -> torch.Tensor:
        """Normalised NCHW batch -> per-class scores on the CPU (softmax, or sigmoid for multi-label)."""
        return self._forward(self._to_device(batch.contiguous(memory_format=torch.channels_last)))

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        rows = batch.shape[0]
        if self.padded_sizes:
            size = next((s for s in self.padded_sizes if s >= rows), rows)
            if size > rows:
                batch = torch.cat([batch, batch.new_zeros((size - rows, *batch.shape[1:]))])
        if self.graphs is not None and batch.shape[0] in self.graphs.sizes:
            scores = self.graphs.replay(batch)  # the graph's own output: copied out below, before the next replay
        else:
            scores = self.scores(batch)
        return scores[:rows].cpu()

    def scores(self, batch: torch.Tensor) -> torch.Tensor:
        """Normalised batch on the model's device -> float32 scores on that device (the eager pass)."""
        # no autocast weight cache: each pass casts every weight once anyway, and a CUDA graph
        # must not keep pointers to a cache that is freed when the context ends
        context = (
            torch.autocast(self.device.type, dtype=self.autocast, cache_enabled=False)
            if self.autocast
            else nullcontext()
        )
        with context:
            logits = self.model(batch)
        if isinstance(logits, tuple | list):  # some scripted models return (logits, aux)
            logits = logits[0]
        logits = logits.float()
        return logits.sigmoid() if self.multi_label else logits.softmax(dim=-1)

    def rank(self, scores: torch.Tensor, top_k: int) -> list[tuple[int, str, float]]:
        """One image's scores -> [(index, label, score)], best first.

        Single-label: the `top_k` best. Multi-label: every label at or above the threshold.
        """
        if self.multi_label:
            indices = torch.nonzero(scores >= self.threshold).flatten()
            order = indices[scores[indices].argsort(descending=True)]
        else:
            order = scores.topk(min(top_k, scores.numel())).indices
        return [(int(i), self.class_names[int(i)], float(scores[int(i)])) for i in order]


class CudaGraphs:
    """The eager forward pass captured as one CUDA graph per padded batch size, then replayed.

    An eager resnet50 launches hundreds of kernels per pass, each from Python: with decode threads
    and the event loop contending for the GIL, every launch can wait for it, and the GPU idles.
    A replay is one launch. Inputs are copied into the graph's own input tensor, outputs read from
    its own output tensor (valid until the next replay; only the inference thread replays).
    """

    def __init__(self, classifier: Classifier, sizes: tuple[int, ...]):
        channels, height, width = classifier.input_size
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        pool = None
        for size in sorted(sizes, reverse=True):  # largest first: the smaller graphs reuse its memory pool
            static_in = torch.zeros((size, channels, height, width), device=classifier.device).contiguous(
                memory_format=torch.channels_last
            )
            side = torch.cuda.Stream(classifier.device)  # capture needs a warmed-up pass on a side stream
            side.wait_stream(torch.cuda.current_stream(classifier.device))
            with torch.cuda.stream(side):
                classifier.scores(static_in)
            torch.cuda.current_stream(classifier.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                static_out = classifier.scores(static_in)
            pool = graph.pool()
            self._graphs[size] = (graph, static_in, static_out)

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(sorted(self._graphs))

    def replay(self, batch: torch.Tensor) -> torch.Tensor:
        graph, static_in, static_out = self._graphs[batch.shape[0]]
        static_in.copy_(batch)
        graph.replay()
        return static_out


@torch.inference_mode()
def _capture_graphs(classifier: Classifier) -> None:
    try:
        classifier.graphs = CudaGraphs(classifier, classifier.padded_sizes)
    except Exception as error:  # a model that cannot be captured still serves, eagerly
        classifier.graphs = None
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        logger.warning("API_CUDA_GRAPHS: capture failed (%s); serving the eager forward pass", reason)


def load_classifier(
    checkpoint_path: Path,
    *,
    model_name: str | None = None,
    num_classes: int | None = None,
    image_size: int | None = None,
    class_names_path: Path | None = None,
    use_ema: bool = True,
    multi_label: bool = False,
    threshold: float = 0.5,
    device: str = "auto",
    precision: str = "fp32",
    compile_model: bool = False,
    cuda_graphs: bool = True,
    max_batch_size: int = 1,
) -> Classifier:
    """Build the classifier described by the checkpoint, with settings as explicit overrides.

    Metadata in the checkpoint wins over settings; a setting that would give wrong answers
    (e.g. `num_classes` differing from the classifier's outputs) stops the load with both numbers.
    """
    started = time.perf_counter()
    torch_device, device_reason = resolve_device(device)
    ckpt = read_checkpoint(checkpoint_path, use_ema=use_ema)
    if ckpt.scripted is not None:
        model, architecture = ckpt.scripted, model_name or DEFAULT_MODEL_NAME
        with torch.device("meta"):  # only its data config is needed: no memory, no weights
            reference = timm.create_model(architecture, pretrained=False)
        transform, data_config = build_transform(reference, image_size=image_size)
        outputs = _scripted_outputs(model, data_config)
        classes = _reconcile_num_classes(ckpt, num_classes, outputs, what="TorchScript model output")
    else:
        architecture = _reconcile_architecture(ckpt, model_name)
        classes, model = _build_timm_model(ckpt, architecture, num_classes)
        transform, data_config = build_transform(model, image_size=image_size)
    names, labels_source = resolve_class_names(
        classes,
        from_checkpoint=ckpt.class_names,
        labels_path=class_names_path,
        checkpoint_path=checkpoint_path,
    )
    model = model.to(torch_device).eval()
    if torch_device.type != "mps":
        model = model.to(memory_format=torch.channels_last)
    padded: tuple[int, ...] = ()
    if torch_device.type == "cuda":
        # the loading thread also runs every pass: its streams, and graph capture, on this GPU
        torch.cuda.set_device(torch_device)
        # cuDNN picks the fastest kernels per input shape, on first sight of it: batches are padded
        # to a few sizes, each benchmarked in warm_up, so no request pays for a benchmark.
        torch.backends.cudnn.benchmark = True
        padded = batch_buckets(max_batch_size)
    if compile_model:
        model = torch.compile(model)  # a compiled graph per padded size, compiled in warm_up
        padded = batch_buckets(max_batch_size)
    classifier = Classifier(
        model=model,
        architecture=architecture,
        class_names=names,
        transform=transform,
        data_config=data_config,
        device=torch_device,
        device_reason=device_reason,
        checkpoint=ckpt,
        multi_label=multi_label,
        threshold=threshold,
        labels_source=labels_source,
        autocast=_AUTOCAST[precision],
        padded_sizes=padded,
    )
    ckpt.state_dict = {}  # the model owns the weights now; don't keep a second copy alive
    warm_up(classifier)
    if cuda_graphs and torch_device.type == "cuda" and not compile_model:
        _capture_graphs(classifier)  # after warm-up: cuDNN has benchmarked every size
        if classifier.graphs is not None:
            warm_up(classifier)  # every size replayed once, through the serving path
    classifier.load_seconds = time.perf_counter() - started
    return classifier


def batch_buckets(max_batch_size: int) -> tuple[int, ...]:
    """The batch sizes a padded model sees: powers of two up to, and including, the largest batch."""
    return tuple(sorted({min(2**i, max_batch_size) for i in range(max_batch_size.bit_length() + 1)}))


def warm_up(classifier: Classifier) -> None:
    """Forward passes at the serving input size through the serving path, so no request pays
    for the first one. A padded model (compiled, or on CUDA) is run at every batch size it will
    meet (compilation and cuDNN's benchmarks happen here, before the service reports ready); an
    eager CPU model once."""
    height, width = classifier.input_size[1:]
    item = classifier.prepare(Image.new("RGB", (width * 2, height * 2)))
    for size in classifier.padded_sizes or (1,):
        scores = classifier.predict_prepared([item] * size)
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
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
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
            reason = str(error).strip().splitlines()[0]
            raise CheckpointMismatch(f"TorchScript model failed a test forward pass: {reason}") from None
    if isinstance(out, tuple | list):
        out = out[0]
    return int(out.shape[-1])
