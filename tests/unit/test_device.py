"""Device resolution says what it chose and why; an explicit device that is missing stops start-up."""

from __future__ import annotations

import pytest
import torch

from api.engine.model.device import resolve_device
from api.errors import ConfigError


def test_auto_prefers_cuda_and_names_the_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # torch's answer, not ours to build
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "Test GPU 80GB")
    device, reason = resolve_device("auto")
    assert device == torch.device("cuda:0")
    assert reason == "API_DEVICE=auto: CUDA is available (Test GPU 80GB)"


def test_auto_without_a_gpu_uses_the_cpu_and_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    device, reason = resolve_device("auto")
    assert device == torch.device("cpu")
    assert reason.startswith("API_DEVICE=auto: no GPU usable (") and reason.endswith("), using CPU")


def test_cpu_is_always_available() -> None:
    assert resolve_device("cpu")[0] == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_gpu_is_a_clear_config_error() -> None:
    with pytest.raises(ConfigError) as caught:
        resolve_device("cuda")
    message = str(caught.value)
    assert message.startswith("API_DEVICE='cuda' but torch reports no usable CUDA device")
    assert "API_DEVICE=auto or cpu" in message
    assert "\n" not in message
