"""Every runtime and precision ranks real photos as PyTorch fp32 does (the demo model's real ImageNet
weights), and the three architectures agree on top-1 under OpenVINO; the model cache is reused and
a corrupt entry rebuilt, never served."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import timm
import torch
from PIL import Image

from api.engine.model.classifier import Classifier
from api.engine.model.runtimes.base import cpu_flags
from tests.helpers import architecture_checkpoint, load_model, scores_of

# OpenVINO's CPU plugin computes bf16 where bf16 is a hardware type (AMX, or AVX512-BF16 alone: 2x f32
# for resnet50 on an AMD EPYC with AVX512-BF16) and f32 elsewhere whatever the hint; the runtime reads
# what its layers execute from the compiled graph, and this expectation comes from the CPU's flags.
OPENVINO_BF16 = bool({"amx_bf16", "avx512_bf16"} & cpu_flags())

PHOTOS = ["chelsea", "coffee", "astronaut", "cat", "rocket", "camera", "immunohistochemistry", "retina"]


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    return [Image.fromarray(getattr(skimage.data, name)()).convert("RGB") for name in PHOTOS]


@pytest.fixture(scope="module")
def reference(demo_dir: Path, photos: list[Image.Image]) -> torch.Tensor:
    return scores_of(load_model(demo_dir, runtime="torch", precision="fp32"), *photos)


# (runtime, precision, max |probability difference| allowed against PyTorch fp32)
CASES = [("openvino", "fp32", 1e-4), ("openvino", "bf16", 0.08), ("torch", "bf16", 0.08)]


@pytest.mark.parametrize(("runtime", "precision", "tolerance"), CASES, ids=[f"{r}-{p}" for r, p, _ in CASES])
def test_each_runtime_ranks_real_photos_as_pytorch_fp32(
    runtime: str,
    precision: str,
    tolerance: float,
    demo_dir: Path,
    photos: list[Image.Image],
    reference: torch.Tensor,
) -> None:
    classifier = load_model(demo_dir, runtime=runtime, precision=precision)
    # OpenVINO says what it really computes in: f32 on a CPU without bf16 hardware, bf16 with it
    effective = "fp32" if runtime == "openvino" and not OPENVINO_BF16 else precision
    assert classifier.describe()["runtime"] == runtime and classifier.describe()["precision"] == effective
    scores = scores_of(classifier, *photos)
    assert scores.argmax(-1).tolist() == reference.argmax(-1).tolist()
    difference = float((scores - reference).abs().max())
    print(f"{runtime} {precision}: max |probability difference| {difference:.2g} over {len(photos)} photos")
    assert difference <= tolerance


def test_auto_precision_without_images_is_exact_and_says_what_bf16_and_int8_measured(demo_dir: Path) -> None:
    classifier = load_model(demo_dir, runtime="openvino", precision="auto")
    described = classifier.describe()
    assert described["precision"] == "fp32" and classifier.runtime.precision == "fp32"
    measured = {(c["runtime"], c["precision"]) for c in described["evaluation"]["candidates"]}
    assert measured == {("openvino", "fp32"), ("openvino", "int8")} | (
        {("openvino", "bf16")} if OPENVINO_BF16 else set()
    )
    assert all(c["passed"] is None and c["top1_agreement"] is None for c in described["evaluation"]["candidates"])
    assert "API_EVAL_DIR" in described["precision_reason"]
    multi = load_model(demo_dir, runtime="openvino", precision="auto", multi_label=True)
    assert multi.describe()["precision"] == "fp32"  # a threshold turns a few percent into another answer
    assert multi.describe()["evaluation"] is None  # one candidate, no images: nothing to measure


@pytest.mark.parametrize("architecture", ["resnet50", "efficientnet_b3", "convnext_base"])
def test_architectures_agree_on_top1_under_openvino(architecture: str, tmp_path: Path) -> None:
    path = architecture_checkpoint(architecture, tmp_path)
    torch_fp32 = load_model(path, runtime="torch", precision="fp32")
    # fp32: random weights on random pixels leave near-ties that bf16 rounding flips (1 in 40 on an
    # AVX512-BF16 host); bf16 is held to PyTorch fp32 on real weights and photos, above
    openvino = load_model(path, runtime="openvino", precision="fp32")
    _, height, width = torch_fp32.input_size
    rng = np.random.default_rng(1)
    agree = total = 0
    for _ in range(5):  # 5 batches of 8 random images
        pixels = list(rng.integers(0, 256, (8, height, width, 3), dtype=np.uint8))
        a, b = torch_fp32.forward(pixels), openvino.forward(pixels)
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += len(pixels)
    assert agree / total >= 0.99, f"{architecture}: top-1 agrees on {agree}/{total}"


def _cached_load(demo_dir: Path, cache: Path) -> tuple[Classifier, float]:
    started = time.perf_counter()
    classifier = load_model(demo_dir, runtime="openvino", precision="auto", cache_dir=cache)  # exact: OpenVINO f32
    return classifier, time.perf_counter() - started


def test_a_second_start_reads_the_cache_and_a_corrupt_entry_is_rebuilt(
    demo_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = tmp_path / "cache"
    caplog.set_level(logging.INFO, logger="api.engine")
    first, cold = _cached_load(demo_dir, cache)
    assert "converted the model to OpenVINO" in caplog.text and "candidates measured" in caplog.text
    caplog.clear()
    second, warm = _cached_load(demo_dir, cache)
    assert "served as the cache's snapshot describes it" in caplog.text and "converted" not in caplog.text
    assert "candidates measured" not in caplog.text
    assert second.transform is None  # timm's transform was never built: the snapshot's recipe serves
    described = [{k: v for k, v in c.describe().items() if k != "load_seconds"} for c in (first, second)]
    assert described[1] == described[0]
    print(f"load: {cold:.1f}s converting and timing, {warm:.1f}s from the cache")
    assert warm < cold  # neither converted nor timed again

    (weights,) = [p for p in cache.glob("openvino-*/model.bin") if "int8" not in p.parent.name]  # the converted one
    data = bytearray(weights.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)  # flipped weights: loads fine, answers wrong
    weights.write_bytes(bytes(data))
    caplog.clear()
    third, _ = _cached_load(demo_dir, cache)
    assert "unusable" in caplog.text and "converted the model to OpenVINO" in caplog.text
    photo = Image.fromarray(skimage.data.chelsea())
    torch.testing.assert_close(scores_of(third, photo), scores_of(second, photo))


WARM_START = """
import dataclasses, json, sys
from pathlib import Path
import skimage.data
from PIL import Image
from api.config import Settings
from api.engine.model.loader import load_classifier
group = Settings(_env_file=None, checkpoint_path=Path(sys.argv[1])).model_group
settings = dataclasses.replace(group, device="cpu", runtime="openvino", precision="auto", cache_dir=Path(sys.argv[2]))
classifier = load_classifier(settings)
pixels = classifier.prepare(Image.fromarray(skimage.data.chelsea()))
heavy = sorted(m for m in ("timm", "torchvision", "captum", "nncf") if m in sys.modules)
print(json.dumps({"imported": heavy, "scores": classifier.forward([pixels])[0].tolist(), "transform": classifier.transform is None}))
"""


def test_a_restart_on_a_warm_cache_builds_no_pytorch_model(demo_dir: Path, tmp_path: Path) -> None:
    """The engine holds no PyTorch copy of what OpenVINO serves: a fresh process on a warm cache never
    imports timm or torchvision, and answers what the full load answers."""
    cache = tmp_path / "cache"
    first = load_model(demo_dir, runtime="openvino", precision="auto", cache_dir=cache)
    photo = Image.fromarray(skimage.data.chelsea())
    expected = scores_of(first, photo)
    done = subprocess.run(
        [sys.executable, "-c", WARM_START, str(demo_dir), str(cache)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer["imported"] == [] and answer["transform"], answer
    torch.testing.assert_close(torch.tensor(answer["scores"]), expected[0])


def test_openvino_refuses_what_it_cannot_run(demo_dir: Path, tmp_path: Path) -> None:
    from api.errors import ConfigError

    scripted = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(timm.create_model("test_resnet", num_classes=3).eval()), scripted)
    with pytest.raises(ConfigError, match="API_RUNTIME=openvino: a TorchScript checkpoint"):
        load_model(scripted, model_name="test_resnet", runtime="openvino")
    fallback = load_model(scripted, model_name="test_resnet", runtime="auto")
    assert fallback.describe()["runtime"] == "torch" and "TorchScript" in fallback.runtime_reason
