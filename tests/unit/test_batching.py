"""Micro-batching: concurrent requests share a forward pass and get the answers they would alone."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import pytest
import torch

from api.config import Settings
from api.engine.model.classifier import Classifier
from api.engine.serving.batching import Batcher
from api.errors import GatewayTimeout, Overloaded
from tests.helpers import load_model, noise_image, tiny_model


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> Classifier:
    path = tmp_path_factory.mktemp("batch") / "m.pt"
    torch.save(tiny_model(num_classes=6).state_dict(), path)
    return load_model(path, model_name="test_resnet", device="cpu")


def _images(classifier: Classifier, count: int) -> list:
    """Prepared (resized, cropped uint8) real-looking images, as the decode pool hands them over."""
    return [classifier.prepare(noise_image(200 + 10 * i, 180, seed=i)) for i in range(count)]


def _options(**options: object) -> dict[str, object]:
    """The service's own batching settings (the Batcher has no defaults of its own), with `options`."""
    group = Settings(_env_file=None).batching_group  # type: ignore[call-arg]
    defaults = {
        "max_batch_size": group.max_batch_size,
        "max_wait_s": group.max_batch_wait_s,
        "max_queue": group.max_queue,
        "timeout_s": group.request_timeout_s,
    }
    return {**defaults, **options}


def _batcher(classifier: Classifier, **options: object) -> Batcher:
    batcher = Batcher(**_options(**options))  # type: ignore[arg-type]
    batcher.start(lambda: classifier)
    return batcher


def test_concurrent_requests_form_one_batch_with_the_same_answers(classifier: Classifier) -> None:
    batches: list[int] = []
    batcher = _batcher(classifier, max_batch_size=16, max_wait_s=5.0, on_batch=lambda n, s: batches.append(n))
    images = _images(classifier, 8)

    async def scenario() -> list[torch.Tensor]:
        # All eight are admitted (decoding) before any is queued, as under concurrent load.
        with contextlib.ExitStack() as stack:
            entered = [stack.enter_context(batcher.admit(1)) for _ in images]
            results = await asyncio.gather(*(batcher.predict(t, [img]) for t, img in zip(entered, images, strict=True)))
        assert [runs[0].size for _, runs in results] == [8] * 8  # each caller learns its batch's size
        assert all(runs[0].queued_s >= 0 and runs[0].forward_s > 0 for _, runs in results)
        return [scores[0] for scores, _ in results]

    try:
        together = asyncio.run(scenario())
    finally:
        batcher.close()
    assert batches == [8], f"expected one forward pass of 8, got {batches}"
    alone = [classifier.forward([img])[0] for img in images]
    for a, b in zip(together, alone, strict=True):
        torch.testing.assert_close(torch.from_numpy(a), b, rtol=1e-4, atol=1e-5)
    assert batcher.admission.admitted == 0


def test_a_lone_request_does_not_wait_for_company(classifier: Classifier) -> None:
    wait_s = 10.0  # a batch may wait this long for company, but nothing else is on its way
    batcher = _batcher(classifier, max_wait_s=wait_s)

    async def one() -> float:
        with batcher.admit(1) as ticket:
            _, runs = await batcher.predict(ticket, _images(classifier, 1))
        return runs[0].queued_s

    try:
        queued = asyncio.run(one())
    finally:
        batcher.close()
    assert queued < wait_s / 10, f"a lone request waited {queued:.2f}s of the {wait_s}s batch window"


def test_admission_is_bounded(classifier: Classifier) -> None:
    batcher = _batcher(classifier, max_queue=3)
    try:
        with batcher.admit(2), batcher.admit(1):
            with pytest.raises(Overloaded) as caught, batcher.admit(1):
                pass
            assert caught.value.status == 503 and caught.value.headers["Retry-After"] == "1"
            assert batcher.admission.admitted == 3
        assert batcher.admission.admitted == 0
        with batcher.admit(3):  # room again once answered
            pass
    finally:
        batcher.close()


class _Gated:
    """The classifier, with every forward pass held until the test opens the gate."""

    def __init__(self, inner: Classifier):
        self.inner = inner
        self.gate = threading.Event()
        self.started = threading.Event()
        self.passes: list[int] = []

    def forward(self, items: list) -> torch.Tensor:
        self.started.set()
        self.gate.wait(timeout=60)
        self.passes.append(len(items))
        return self.inner.forward(items)


def test_past_deadline_is_504_and_the_image_is_dropped(classifier: Classifier) -> None:
    """An image whose caller gave up is never run: the thread, busy when it came, drops it after."""
    gated = _Gated(classifier)
    batcher = Batcher(**_options(max_batch_size=1))  # type: ignore[arg-type]
    batcher.start(lambda: gated)  # type: ignore[arg-type,return-value]

    async def scenario() -> None:
        with batcher.admit(1) as first, batcher.admit(1) as second:
            busy = asyncio.ensure_future(batcher.predict(first, _images(classifier, 1)))
            await asyncio.to_thread(gated.started.wait, 10)  # the thread is in the first pass
            with pytest.raises(GatewayTimeout):  # queued behind it, and its deadline passes
                await batcher.predict(second, _images(classifier, 1), deadline=time.monotonic() + 0.05)
            gated.gate.set()
            await busy

    try:
        asyncio.run(scenario())
    finally:
        gated.gate.set()
        batcher.close()
    assert gated.passes == [1], f"the abandoned image was run: passes {gated.passes}"
    assert batcher.admission.admitted == 0


def test_failed_decodes_release_their_room(classifier: Classifier) -> None:
    batcher = _batcher(classifier, max_queue=2)
    try:
        with pytest.raises(ValueError), batcher.admit(2):
            raise ValueError("decode failed")
        assert batcher.admission.admitted == 0 and batcher.admission.decoding == 0
    finally:
        batcher.close()
