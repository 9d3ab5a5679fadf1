"""PyTorch-runtime checks on real weights and torch.compile: slower than the unit tier."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.helpers import load_model, random_pixels
from tests.support import DECODE_BUDGET


def test_bf16_autocast_stays_close_to_fp32(demo_dir: Path, chelsea_jpeg: bytes) -> None:
    from api.engine.images.decode import decode_image

    fp32 = load_model(demo_dir, device="cpu")
    bf16 = load_model(demo_dir, device="cpu", precision="bf16")
    image = fp32.prepare(decode_image(chelsea_jpeg, max_pixels=10**8, budget=DECODE_BUDGET).image)
    a, b = fp32.forward([image])[0], bf16.forward([image])[0]
    assert b.dtype == torch.float32  # answers are float32 whatever the compute dtype
    # chelsea's top two (tiger cat 0.38, Egyptian cat 0.37) are closer than bf16's rounding: compare the top 3
    assert set(a.topk(3).indices.tolist()) == set(b.topk(3).indices.tolist())
    assert (a - b).abs().max() < 0.05


def test_compiled_model_is_warmed_for_every_batch_size_and_matches_eager(four_class_checkpoint: Path) -> None:
    eager = load_model(four_class_checkpoint, model_name="test_resnet", device="cpu")
    compiled = load_model(four_class_checkpoint, model_name="test_resnet", device="cpu", compile=True, max_batch_size=3)
    assert compiled.runtime.padded_sizes == (1, 2, 3)
    batch = random_pixels(eager, 3)
    for rows in (1, 2, 3):
        torch.testing.assert_close(compiled.forward(batch[:rows]), eager.forward(batch[:rows]), rtol=1e-3, atol=1e-4)


def test_split_preprocessing_matches_the_whole_timm_transform(demo_dir: Path, chelsea_jpeg: bytes) -> None:
    """uint8 pixels from the decode pool + batched normalisation == timm's transform, image by image."""
    from api.engine.images.decode import decode_image

    classifier = load_model(demo_dir, device="cpu")
    image = decode_image(chelsea_jpeg, max_pixels=10**8, budget=DECODE_BUDGET).image
    prepared = classifier.prepare(image)
    assert prepared.dtype.name == "uint8" and prepared.shape == (224, 224, 3)
    split = classifier.forward([prepared, prepared])
    normalised = torch.stack([classifier.transform(image)] * 2).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        whole = classifier.runtime.scores(normalised)  # type: ignore[attr-defined]
    torch.testing.assert_close(split, whole, rtol=1e-4, atol=1e-5)
