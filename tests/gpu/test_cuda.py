"""On an NVIDIA GPU: the CUDA path gives fp32-on-CPU answers.

Covers fp16/bf16 autocast, pinned non-blocking copies, batches padded to sizes benchmarked before
ready, torch.compile and the service end to end. Skipped where torch sees no CUDA device (CI, this
project's CPU machines); `bench/gpu.sh` runs it on a GPU machine before the GPU benchmark.
"""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import httpx
import pytest
import torch

from api.engine.images.decode import decode_image
from api.engine.model.classifier import Classifier
from tests.digits import IMAGE_SIZE, Digits
from tests.helpers import IMAGENET_CATS, load_model, make_settings, running_server
from tests.support import DECODE_BUDGET, scrape

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

PREDICT = "/api/v1/predict"


@pytest.fixture(scope="module")
def cpu_fp32(demo_dir: Path) -> Classifier:
    return load_model(demo_dir, device="cpu")


def _prepared(classifier: Classifier, *jpegs: bytes) -> list:
    return [classifier.prepare(decode_image(data, max_pixels=10**8, budget=DECODE_BUDGET).image) for data in jpegs]


@pytest.mark.parametrize(("precision", "tolerance"), [("fp32", 2e-3), ("fp16", 0.02), ("bf16", 0.05)])
def test_cuda_answers_stay_close_to_cpu_fp32(
    demo_dir: Path, cpu_fp32: Classifier, chelsea_jpeg: bytes, coffee_jpeg: bytes, precision: str, tolerance: float
) -> None:
    gpu = load_model(demo_dir, device="cuda", precision=precision, max_batch_size=8)
    assert gpu.device == torch.device("cuda", 0)
    assert gpu.runtime.padded_sizes == (1, 2, 4, 8)  # every size cuDNN will see was benchmarked in warm-up
    assert (
        gpu.runtime.graphs is not None and gpu.runtime.graphs.sizes == gpu.runtime.padded_sizes
    )  # and captured as a CUDA graph
    items = _prepared(gpu, chelsea_jpeg, coffee_jpeg, chelsea_jpeg)  # 3 rows: padded to 4
    reference, scores = cpu_fp32.forward(items), gpu.forward(items)
    assert scores.device.type == "cpu" and scores.dtype == torch.float32 and scores.shape == reference.shape
    assert (scores - reference).abs().max() < tolerance
    for row in range(len(items)):  # chelsea's top two are 0.38 vs 0.37: compare the top 3 as sets
        assert set(scores[row].topk(3).indices.tolist()) == set(reference[row].topk(3).indices.tolist())
    torch.testing.assert_close(scores[0], scores[2])  # the same image in one batch: the same row


def test_padded_batches_answer_each_image_as_if_alone(demo_dir: Path, chelsea_jpeg: bytes, coffee_jpeg: bytes) -> None:
    gpu = load_model(demo_dir, device="cuda", precision="fp16", max_batch_size=8)
    items = _prepared(gpu, chelsea_jpeg, coffee_jpeg, coffee_jpeg, chelsea_jpeg, coffee_jpeg)  # padded to 8
    together = gpu.forward(items)
    alone = torch.cat([gpu.forward([item]) for item in items])
    torch.testing.assert_close(together, alone, atol=5e-3, rtol=0)


def test_cuda_graph_replays_match_the_eager_pass_call_after_call(
    demo_dir: Path, chelsea_jpeg: bytes, coffee_jpeg: bytes
) -> None:
    graphed = load_model(demo_dir, device="cuda", precision="fp16", max_batch_size=4)
    eager = load_model(demo_dir, device="cuda", precision="fp16", max_batch_size=4, cuda_graphs=False)
    assert graphed.runtime.graphs is not None and eager.runtime.graphs is None
    # different images and sizes one after another: each replay reads this call's input, never the last one's
    for jpegs in ([chelsea_jpeg], [coffee_jpeg], [coffee_jpeg, chelsea_jpeg, coffee_jpeg], [chelsea_jpeg] * 4):
        items = _prepared(eager, *jpegs)
        torch.testing.assert_close(graphed.forward(items), eager.forward(items), atol=2e-3, rtol=0)


def test_a_fold_ensemble_on_cuda_is_one_graph_and_answers_as_on_the_cpu(digits: Digits) -> None:
    """The digits' 3 folds: one CUDA graph per padded size replays all folds; the mean and the spread
    agree with PyTorch fp32 on the CPU, and a labeled folder fits a temperature on the GPU too."""
    from PIL import Image

    gpu = load_model(digits.folds, image_size=IMAGE_SIZE, device="cuda", max_batch_size=8, eval_dir=digits.eval_dir)
    cpu = load_model(
        digits.folds, image_size=IMAGE_SIZE, device="cpu", temperature=gpu.describe()["calibration"]["temperature"]
    )
    assert gpu.runtime.graphs is not None and gpu.describe()["calibration"]["source"] == "fitted"
    items = [gpu.prepare(Image.fromarray(image).convert("RGB")) for image in digits.images[:5]]
    torch.testing.assert_close(gpu.forward(items), cpu.forward(items), atol=2e-3, rtol=0)


def test_compiled_cuda_model_matches_eager(tiny_checkpoint: Path, chelsea_jpeg: bytes, coffee_jpeg: bytes) -> None:
    # a tiny architecture: Triton compiles every fused kernel, a few per layer, for each padded size
    eager = load_model(tiny_checkpoint, model_name="test_resnet", device="cuda", max_batch_size=2)
    compiled = load_model(tiny_checkpoint, model_name="test_resnet", device="cuda", compile=True, max_batch_size=2)
    assert compiled.runtime.padded_sizes == (1, 2)
    for jpegs in ([chelsea_jpeg], [chelsea_jpeg, coffee_jpeg]):
        items = _prepared(eager, *jpegs)
        torch.testing.assert_close(compiled.forward(items), eager.forward(items), atol=2e-3, rtol=0)


def test_service_on_cuda_batches_concurrent_requests_and_reports_gpu_memory(
    demo_dir: Path, chelsea_jpeg: bytes
) -> None:
    settings = make_settings(checkpoint_path=demo_dir, device="cuda", precision="fp16", max_batch_size=8)
    with running_server(settings) as url:
        assert httpx.get(url + "/health").json()["device"] == "cuda:0"

        def predict(_: int) -> httpx.Response:
            return httpx.post(url + PREDICT, files={"file": ("chelsea.jpg", chelsea_jpeg, "image/jpeg")}, timeout=60)

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            responses = list(pool.map(predict, range(32)))
        assert [r.status_code for r in responses] == [200] * 32, responses[0].text
        for response in responses:
            top3 = {p["index"] for p in response.json()["predictions"][:3]}
            assert top3 <= IMAGENET_CATS
        metrics = scrape(url)
        allocated = metrics["cat_breeds_api_gpu_memory_allocated_bytes"]
        assert allocated > 10_000_000  # the model's weights at least (EfficientNet-Lite0: ~19 MB in fp32)
        batches = metrics["cat_breeds_api_inference_batch_size_count"]
        assert batches < 32  # concurrent requests shared forward passes
