"""A real k-fold model on real data, trained in seconds: scikit-learn's handwritten digits.

1,797 labeled 8x8 digits ship with scikit-learn. Each is drawn 16 px tall at a random place on a blank
32 x 32 canvas (so there is a background to tell from the digit, and the model must find it). A fixed
360 are held out (written as PNGs in one subfolder per digit: an API_EVAL_DIR); the rest are split into
k folds and one resnet10t at 32 px is trained per fold on the others, saved as training writes it
(`fold_<i>/best_model.pt` with its architecture, labels and validation score). Inputs go through the
served preprocessing (timm's eval transform at API_IMAGE_SIZE=32), so the folds see in training what
they see when served.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image

from api.engine.model.preprocess import build_transform

ARCHITECTURE = "resnet10t"
IMAGE_SIZE = 32
DIGIT_SIZE = 16
HELD_OUT = 360
CLASSES = [str(d) for d in range(10)]


@dataclass(frozen=True)
class Digits:
    folds: Path  # fold_0/best_model.pt ... fold_<k-1>/best_model.pt
    eval_dir: Path  # the held-out digits, one subfolder per class
    images: np.ndarray  # the held-out digits as written (N x 32 x 32 uint8, white strokes on black)
    labels: np.ndarray  # their classes


def digit_image(pixels: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """An 8x8 digit (0..16) -> a 32x32 RGB image: white strokes, 16 px tall, at a random place on black."""
    small = Image.fromarray((pixels.reshape(8, 8) * (255 / 16)).round().astype(np.uint8))
    canvas = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE))
    x, y = rng.integers(0, IMAGE_SIZE - DIGIT_SIZE + 1, 2)
    canvas.paste(small.resize((DIGIT_SIZE, DIGIT_SIZE), Image.Resampling.BICUBIC), (int(x), int(y)))
    return canvas.convert("RGB")


def train_folds(root: Path, *, folds: int = 3, epochs: int = 4, seed: int = 0) -> Digits:
    from sklearn.datasets import load_digits

    data = load_digits()
    order = np.random.default_rng(seed).permutation(len(data.target))
    held, train = order[:HELD_OUT], order[HELD_OUT:]
    places = np.random.default_rng(seed)
    eval_dir = root / "eval"
    held_images = []
    for n, i in enumerate(held):
        image = digit_image(data.data[i], places)
        folder = eval_dir / str(data.target[i])
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"digit_{n:04d}.png")
        held_images.append(np.asarray(image)[..., 0])
    torch.manual_seed(seed)
    transform, _ = build_transform(timm.create_model(ARCHITECTURE, num_classes=10), image_size=IMAGE_SIZE)
    inputs = torch.stack([transform(digit_image(data.data[i], places)) for i in train])
    targets = torch.from_numpy(data.target[train]).long()
    parts = np.array_split(np.arange(len(train)), folds)
    for k in range(folds):
        fit = np.concatenate([p for j, p in enumerate(parts) if j != k])
        model = timm.create_model(ARCHITECTURE, num_classes=10)
        _train(model, inputs[fit], targets[fit], epochs=epochs, seed=seed + k)
        with torch.inference_mode():
            score = float((model.eval()(inputs[parts[k]]).argmax(1) == targets[parts[k]]).float().mean())
        folder = root / "checkpoints" / f"fold_{k}"
        folder.mkdir(parents=True)
        torch.save(
            {
                "state_dict": model.state_dict(),
                "architecture": ARCHITECTURE,
                "num_classes": 10,
                "class_names": CLASSES,
                "best_metric": round(score, 4),
            },
            folder / "best_model.pt",
        )
    return Digits(root / "checkpoints", eval_dir, np.stack(held_images), data.target[held])


def _train(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, *, epochs: int, seed: int) -> None:
    """Plain Adam at its default rate, batches of 32, a few epochs: folds of 90-97 %, as short training
    runs give, whose errors differ (where ensembling pays)."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(inputs), generator=generator).split(32):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(inputs[batch]), targets[batch])
            loss.backward()
            optimizer.step()
