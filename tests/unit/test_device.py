"""Device resolution says what it chose and why; an explicit device that is missing stops start-up."""

from __future__ import annotations

import pytest
import torch

from api.engine.device import resolve_device
from api.errors import ConfigError


def test_auto_picks_the_best_available_and_explains() -> None:
    device, reason = resolve_device("auto")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    if expected == "cpu" and torch.backends.mps.is_available():
        expected = "mps"
    assert device.type == expected
    assert reason.startswith("API_DEVICE=auto")


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
