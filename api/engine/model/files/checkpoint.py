"""Read a checkpoint in any format we accept into weights plus the metadata it carries.

Formats: a raw state_dict, dicts wrapping it (`state_dict_ema`/`model_ema`, `model_state_dict`,
`state_dict`, `model`), `.safetensors`, timm's model folder (`config.json` + `model.safetensors` or
`pytorch_model.bin`, as `timm.models.save_for_hf` writes) and TorchScript archives.

Pickles are always opened with `weights_only=True`: a checkpoint can never run code here.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import pickle
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import safetensors
import safetensors.torch
import torch

from api.engine.model.files.labels import names_from_mapping
from api.errors import CheckpointNotFound, CheckpointUnreadable, UnsafeCheckpoint, first_line

logger = logging.getLogger(__name__)

Format = Literal["state_dict", "safetensors", "timm_folder", "torchscript"]

# Where training loops put the weights, most specific first. timm's own `load_state_dict` knows all
# but `model_state_dict` (the PyTorch tutorial convention) and does not hand back the metadata we
# need from the same read, so the selection lives here; prefix cleaning is timm's.
_EMA_KEYS = ("state_dict_ema", "model_ema", "ema_state_dict", "ema")
_WEIGHT_KEYS = ("model_state_dict", "state_dict", "model", "net", "weights")
_ARCH_KEYS = ("architecture", "arch", "model_name")
_LABEL_KEYS = ("class_names", "classes", "label_names", "labels", "idx_to_class", "class_to_idx")
# the validation score a training loop records beside the weights (timm's train.py: `metric`)
_SCORE_KEYS = ("best_score", "best_metric", "best_acc", "best_accuracy", "val_acc", "val_accuracy", "metric", "score")
_FOLDER_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")
_MOUNT_HINT = (
    "set API_CHECKPOINT_PATH to your checkpoint file or timm model folder "
    "(in Docker, mount its folder at /app/models and use /app/models/<file>)"
)


@dataclass
class Checkpoint:
    """What one checkpoint holds: weights (or a scripted module) and optional metadata."""

    path: Path
    format: Format
    sha256: str
    state_dict: dict[str, torch.Tensor] = field(default_factory=dict)
    scripted: torch.jit.ScriptModule | None = None
    weights_key: str = ""
    architecture: str | None = None
    num_classes: int | None = None
    class_names: list[str] | None = None
    pretrained_cfg: dict[str, Any] = field(default_factory=dict)
    model_args: dict[str, Any] = field(default_factory=dict)
    recorded_score: tuple[str, float] | None = None  # (its key, its value): what training said of these weights


def read_checkpoint(path: Path, *, use_ema: bool = True) -> Checkpoint:
    """Open `path` (file or timm folder) without ever executing code from it."""
    if not path.exists():
        raise CheckpointNotFound(f"checkpoint not found: {path}; {_MOUNT_HINT}")
    if path.is_dir():
        return _read_folder(path, use_ema=use_ema)
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    if _is_torchscript(path):
        return _read_torchscript(path)
    return _from_object(path, "state_dict", _torch_load(path), use_ema=use_ema)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _torch_load(path: Path) -> Any:
    try:
        # timm's training checkpoints keep their argparse.Namespace of hyper-parameters in `args`.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "Weights only load failed" not in str(error):
            raise CheckpointUnreadable(f"cannot read checkpoint {path}: {error}; {_MOUNT_HINT}") from None
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception:  # the scan itself can fail on odd archives; the refusal stands regardless
            names = []
        detail = f" (it references {', '.join(names)})" if names else ""
        raise UnsafeCheckpoint(
            f"refusing to load {path}: it needs arbitrary Python objects to unpickle{detail}, which could run "
            "code; re-save only the weights, e.g. torch.save(model.state_dict(), path), or export safetensors"
        ) from None
    except Exception as error:  # a damaged pickle fails with whatever the unpickler tripped on
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointUnreadable(
            f"cannot read checkpoint {path}: {reason} (truncated or not a PyTorch checkpoint?); "
            "copy it again, or set API_CHECKPOINT_PATH to a complete checkpoint"
        ) from None


def _from_object(path: Path, fmt: Format, obj: Any, *, use_ema: bool, sha256: str = "") -> Checkpoint:
    ckpt = Checkpoint(path=path, format=fmt, sha256=sha256 or file_sha256(path))
    if not isinstance(obj, dict):
        raise CheckpointUnreadable(f"checkpoint {path} holds a {type(obj).__name__}, not a dict of weights")
    keys = (*_EMA_KEYS, *_WEIGHT_KEYS) if use_ema else _WEIGHT_KEYS
    weights_key = next((k for k in keys if isinstance(obj.get(k), dict) and _looks_like_weights(obj[k])), "")
    weights = obj[weights_key] if weights_key else obj
    if not _looks_like_weights(weights):
        found = ", ".join(sorted(map(str, obj))[:8])
        raise CheckpointUnreadable(
            f"no weights found in checkpoint {path} (top-level keys: {found}); expected a state_dict "
            f"or a dict with one of {', '.join(_WEIGHT_KEYS)}"
        )
    from timm.models import clean_state_dict  # here: a load from the cache's snapshot never imports timm

    ckpt.state_dict = clean_state_dict({k: v for k, v in weights.items() if isinstance(v, torch.Tensor)})
    ckpt.weights_key = weights_key
    if weights_key:  # metadata lives beside the weights, never inside them
        _read_metadata(ckpt, obj)
    return ckpt


def _looks_like_weights(value: Any) -> bool:
    return isinstance(value, dict) and bool(value) and any(isinstance(v, torch.Tensor) for v in value.values())


def _read_metadata(ckpt: Checkpoint, meta: dict[str, Any]) -> None:
    args = meta.get("args")
    arch = next((meta[k] for k in _ARCH_KEYS if isinstance(meta.get(k), str)), None)
    if arch is None and isinstance(args, argparse.Namespace):
        arch = getattr(args, "model", None)
    ckpt.architecture = arch or None
    num_classes = meta.get("num_classes")
    if num_classes is None and isinstance(args, argparse.Namespace):
        num_classes = getattr(args, "num_classes", None)
    ckpt.num_classes = int(num_classes) if isinstance(num_classes, int | str) and str(num_classes).isdigit() else None
    score_key = next((k for k in _SCORE_KEYS if _number(meta.get(k)) is not None), None)
    if score_key is not None:
        ckpt.recorded_score = (score_key, float(_number(meta[score_key]) or 0.0))
    for key in _LABEL_KEYS:
        if key in meta and (names := names_from_mapping(meta[key])):
            ckpt.class_names = names
            break


def _number(value: Any) -> float | None:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _read_safetensors(path: Path, *, sha256: str = "") -> Checkpoint:
    try:
        with safetensors.safe_open(str(path), framework="pt") as handle:
            meta = dict(handle.metadata() or {})
        tensors = safetensors.torch.load_file(str(path), device="cpu")
    except Exception as error:  # safetensors raises its own SafetensorError for any corruption
        raise CheckpointUnreadable(f"cannot read safetensors checkpoint {path}: {error}") from None
    ckpt = Checkpoint(path=path, format="safetensors", sha256=sha256 or file_sha256(path))
    from timm.models import clean_state_dict

    ckpt.state_dict = clean_state_dict(tensors)
    # safetensors metadata is str -> str; labels may be stored as JSON text.
    decoded = {k: _maybe_json(v) for k, v in meta.items()}
    _read_metadata(ckpt, decoded)
    return ckpt


def _maybe_json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _read_folder(path: Path, *, use_ema: bool) -> Checkpoint:
    config_file = path / "config.json"
    weights = next((path / name for name in _FOLDER_WEIGHTS if (path / name).is_file()), None)
    if not config_file.is_file() or weights is None:
        raise CheckpointUnreadable(
            f"{path} is a folder but not a timm model folder (needs config.json and model.safetensors "
            f"or pytorch_model.bin, as timm.models.save_for_hf writes); {_MOUNT_HINT}"
        )
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CheckpointUnreadable(f"cannot read {config_file}: {error}") from None
    if weights.suffix == ".safetensors":
        ckpt = _read_safetensors(weights)
    else:
        ckpt = _from_object(weights, "state_dict", _torch_load(weights), use_ema=use_ema)
    ckpt.path, ckpt.format = path, "timm_folder"
    pretrained_cfg = dict(config.get("pretrained_cfg") or {})
    ckpt.architecture = config.get("architecture") or ckpt.architecture
    ckpt.num_classes = config.get("num_classes", pretrained_cfg.get("num_classes")) or ckpt.num_classes
    ckpt.model_args = dict(config.get("model_args") or {})
    label_names = config.get("label_names") or pretrained_cfg.get("label_names")
    descriptions = config.get("label_descriptions") or pretrained_cfg.get("label_descriptions") or {}
    names = names_from_mapping(label_names) if label_names else None
    if names:
        # timm keeps stable ids (ImageNet synsets) in label_names and readable text in descriptions.
        ckpt.class_names = [str(descriptions.get(name, name)) for name in names]
    for key in ("label_names", "label_descriptions", "architecture", "num_classes"):
        pretrained_cfg.pop(key, None)
    ckpt.pretrained_cfg = pretrained_cfg
    return ckpt


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(name.endswith("constants.pkl") or "/code/" in name for name in names)


def _read_torchscript(path: Path) -> Checkpoint:
    logger.info("%s is a TorchScript archive (deprecated by PyTorch; a state_dict or safetensors is preferred)", path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # said once above, in our log, not per call
            module = torch.jit.load(str(path), map_location="cpu")
    except Exception as error:  # TorchScript raises bare RuntimeErrors with C++ traces
        raise CheckpointUnreadable(f"cannot read TorchScript archive {path}: {first_line(error)}") from None
    return Checkpoint(path=path, format="torchscript", sha256=file_sha256(path), scripted=module)
