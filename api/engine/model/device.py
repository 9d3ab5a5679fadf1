"""Pick the torch device from `API_DEVICE` and say why."""

from __future__ import annotations

import torch

from api.errors import ConfigError, first_line

_GPU_HINT = (
    "set API_DEVICE=auto or cpu, or give the process a GPU (NVIDIA driver; in Docker the NVIDIA "
    "Container Toolkit and a GPU reservation)"
)


def _cuda_unavailable_reason() -> str:
    try:
        torch.cuda.init()
    except Exception as error:  # torch explains a missing driver/device only through this exception
        return first_line(error)
    return "torch.cuda.is_available() is False"


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend and backend.is_available())


def resolve_device(requested: str) -> tuple[torch.device, str]:
    """Return the device to run on and a sentence explaining the choice.

    `auto` prefers CUDA, then MPS, then CPU. An explicit device that is not usable is a
    configuration error: silently running a GPU deployment on the CPU is worse than not starting.
    """
    if requested == "cpu":
        return torch.device("cpu"), "API_DEVICE=cpu"
    if requested == "auto":
        if torch.cuda.is_available():
            name = torch.cuda.get_device_name(0)
            return torch.device("cuda:0"), f"API_DEVICE=auto: CUDA is available ({name})"
        if _mps_available():
            return torch.device("mps"), "API_DEVICE=auto: no CUDA, Apple MPS is available"
        return torch.device("cpu"), f"API_DEVICE=auto: no GPU usable ({_cuda_unavailable_reason()}), using CPU"
    if requested == "mps":
        if not _mps_available():
            raise ConfigError(f"API_DEVICE='mps' but torch reports MPS is not available; {_GPU_HINT}")
        return torch.device("mps"), "API_DEVICE=mps"
    # cuda or cuda:N (the settings validator guarantees the shape)
    if not torch.cuda.is_available():
        raise ConfigError(
            f"API_DEVICE={requested!r} but torch reports no usable CUDA device "
            f"({_cuda_unavailable_reason()}); {_GPU_HINT}"
        )
    index = torch.device(requested).index or 0
    count = torch.cuda.device_count()
    if index >= count:
        raise ConfigError(f"API_DEVICE={requested!r} but only {count} CUDA device(s) are visible; use cuda:0..")
    # always with its index, so health, logs and metrics name the GPU that serves
    return torch.device("cuda", index), f"API_DEVICE={requested}: {torch.cuda.get_device_name(index)}"
