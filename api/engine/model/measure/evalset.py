"""API_EVAL_DIR: the user's own held-out images, split into a calibration part and a held-out part.

A folder with one subfolder per class (labels known: accuracy is reported for the labels the model
has) or with images at its top (unlabeled: agreement with fp32 needs no labels). The split is fixed by
each file's name, so the same folder always gives the same parts: the calibration part (INT8's
statistics) is never used to judge a candidate. The digest names, sizes and modification times
(no file is read twice at each start); a changed folder is a new evaluation.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from api.engine.images.recipe import Recipe

logger = logging.getLogger(__name__)

SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
MAX_IMAGES = 2000  # beyond: a fixed subset (by name), so a start never reads a whole photo archive
CALIBRATION_SHARE = 0.4  # of the images, up to MAX_CALIBRATION, calibrate INT8; the rest are held out
MAX_CALIBRATION = 300  # NNCF's own default subset size
MIN_HELD_OUT = 100  # fewer held-out images than this: the gate says so and does not pass


@dataclass(frozen=True)
class EvalSet:
    folder: Path
    files: tuple[Path, ...]  # in split order: the calibration part first
    labels: tuple[str, ...] | None  # each file's class (its subfolder), or None when unlabeled
    calibration: int  # how many of `files` calibrate
    digest: str

    @property
    def held_out(self) -> int:
        return len(self.files) - self.calibration

    def describe(self) -> dict[str, object]:
        return {
            "folder": str(self.folder),
            "images": len(self.files),
            "labeled": self.labels is not None,
            "calibration_images": self.calibration,
            "held_out_images": self.held_out,
            "digest": self.digest[:12],
        }


def scan(folder: Path) -> EvalSet:
    """The images of `folder` (class subfolders, else its top), in split order, with their digest."""
    subfolders = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    labeled = [(f, sub.name) for sub in subfolders for f in sorted(sub.iterdir()) if _image(f)]
    found = labeled or [(f, "") for f in sorted(folder.iterdir()) if _image(f)]
    # split order: by a hash of the relative name, so classes mix and the parts stay fixed
    found.sort(key=lambda item: hashlib.sha256(str(item[0].relative_to(folder)).encode()).digest())
    if len(found) > MAX_IMAGES:
        logger.warning("API_EVAL_DIR: %d images; the first %d (by name hash) are used", len(found), MAX_IMAGES)
        found = found[:MAX_IMAGES]
    digest = hashlib.sha256()
    for path, _ in found:
        stat = path.stat()
        digest.update(f"{path.relative_to(folder)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    calibration = min(MAX_CALIBRATION, int(len(found) * CALIBRATION_SHARE))
    return EvalSet(
        folder,
        tuple(path for path, _ in found),
        tuple(label for _, label in found) if labeled else None,
        calibration,
        digest.hexdigest(),
    )


def _image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in SUFFIXES and not path.name.startswith(".")


def read_pixels(files: tuple[Path, ...], recipe: Recipe) -> tuple[np.ndarray, list[int]]:
    """The files through the serving preprocessing (resize + crop, uint8), and the indexes that decoded."""
    height, width = recipe.crop
    pixels, kept = [], []
    for i, path in enumerate(files):
        try:
            with Image.open(path) as image:
                pixels.append(recipe.pixels(image.convert("RGB")))
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as error:
            logger.warning("API_EVAL_DIR: %s skipped (%s)", path, error)
            continue
        kept.append(i)
    return (np.stack(pixels) if pixels else np.zeros((0, height, width, 3), np.uint8)), kept
