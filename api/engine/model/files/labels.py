"""Class names: which label each classifier output means.

Resolution order (first hit wins): the checkpoint's own metadata, a labels file
(`API_CLASS_NAMES_PATH`, else `classes.json` / `classes.txt` beside the checkpoint), the 67 breeds of
the public Cat Breeds Dataset when the model has 67 outputs (with a warning: the order must match
training), else `class_0..N-1`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from api.errors import CheckpointMismatch, CheckpointUnreadable

logger = logging.getLogger(__name__)

# The Cat Breeds Dataset (Petfinder) folder names, sorted as torchvision's ImageFolder indexes them.
CAT_BREEDS: tuple[str, ...] = (
    "Abyssinian", "American Bobtail", "American Curl", "American Shorthair", "American Wirehair",
    "Applehead Siamese", "Balinese", "Bengal", "Birman", "Bombay", "British Shorthair", "Burmese",
    "Burmilla", "Calico", "Canadian Hairless", "Chartreux", "Chausie", "Chinchilla", "Cornish Rex",
    "Cymric", "Devon Rex", "Dilute Calico", "Dilute Tortoiseshell", "Domestic Long Hair",
    "Domestic Medium Hair", "Domestic Short Hair", "Egyptian Mau", "Exotic Shorthair",
    "Extra-Toes Cat - Hemingway Polydactyl", "Havana", "Himalayan", "Japanese Bobtail", "Javanese",
    "Korat", "LaPerm", "Maine Coon", "Manx", "Munchkin", "Nebelung", "Norwegian Forest Cat", "Ocicat",
    "Oriental Long Hair", "Oriental Short Hair", "Oriental Tabby", "Persian", "Pixiebob", "Ragamuffin",
    "Ragdoll", "Russian Blue", "Scottish Fold", "Selkirk Rex", "Siamese", "Siberian", "Silver",
    "Singapura", "Snowshoe", "Somali", "Sphynx - Hairless Cat", "Tabby", "Tiger", "Tonkinese", "Torbie",
    "Tortoiseshell", "Turkish Angora", "Turkish Van", "Tuxedo", "York Chocolate",
)  # fmt: skip

LABEL_FILE_NAMES = ("classes.json", "classes.txt")


def names_from_mapping(value: Any) -> list[str] | None:
    """Turn the label containers people save into an index-ordered list.

    Accepts a list of names, `{index: name}` (idx_to_class) or `{name: index}` (class_to_idx).
    """
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [str(name) for name in value]
    if isinstance(value, dict) and value:
        keys, values = list(value.keys()), list(value.values())
        if all(_is_index(v) for v in values):  # class_to_idx
            ordered = sorted(value.items(), key=lambda item: int(item[1]))
            return [str(name) for name, _ in ordered]
        if all(_is_index(k) for k in keys):  # idx_to_class (JSON turns int keys into strings)
            ordered = sorted(value.items(), key=lambda item: int(item[0]))
            return [str(name) for _, name in ordered]
    return None


def _is_index(value: Any) -> bool:
    return isinstance(value, int) or (isinstance(value, str) and value.isdigit())


def read_labels_file(path: Path) -> list[str]:
    """Read a JSON list/dict or a text file with one class name per line."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise CheckpointUnreadable(
            f"cannot read labels file {path}: {error.strerror}; fix API_CLASS_NAMES_PATH or mount the file"
        ) from None
    if path.suffix.lower() == ".json":
        try:
            names = names_from_mapping(json.loads(text))
        except json.JSONDecodeError as error:
            raise CheckpointUnreadable(f"labels file {path} is not valid JSON: {error}") from None
        if names is None:
            raise CheckpointUnreadable(
                f"labels file {path} must hold a list of names, {{index: name}} or {{name: index}}"
            )
        return names
    return [line.strip() for line in text.splitlines() if line.strip()]


def resolve_class_names(
    num_classes: int,
    *,
    from_checkpoint: list[str] | None,
    labels_path: Path | None,
    checkpoint_path: Path,
) -> tuple[list[str], str]:
    """Return the class names for `num_classes` outputs and where they came from."""
    if from_checkpoint:
        names, source = from_checkpoint, "checkpoint"
    else:
        beside = checkpoint_path if checkpoint_path.is_dir() else checkpoint_path.parent
        candidates = [labels_path] if labels_path else [beside / name for name in LABEL_FILE_NAMES]
        found = next((p for p in candidates if p.is_file()), None)
        if labels_path and found is None:
            raise CheckpointUnreadable(
                f"API_CLASS_NAMES_PATH={str(labels_path)!r} does not exist; "
                "point it at a classes.json/classes.txt or unset it"
            )
        if found is not None:
            names, source = read_labels_file(found), str(found)
        elif num_classes == len(CAT_BREEDS):
            logger.warning(
                "no class names in the checkpoint or a labels file: using the 67 Cat Breeds Dataset names "
                "in alphabetical (ImageFolder) order; answers are wrong unless training used that order "
                "(add classes.json beside the checkpoint or set API_CLASS_NAMES_PATH)"
            )
            names, source = list(CAT_BREEDS), "cat-breeds-dataset"
        else:
            names, source = [f"class_{i}" for i in range(num_classes)], "generated"
    if len(names) != num_classes:
        raise CheckpointMismatch(
            f"{len(names)} class names (from {source}) for a classifier with {num_classes} outputs; "
            "the labels must match the model's outputs one to one"
        )
    return names, source
