"""The OpenVINO runtime: the timm module converted in-process, compiled for this CPU.

`openvino.convert_model` reads the PyTorch module directly (no ONNX file). Normalisation and the
NHWC -> NCHW turn are folded into the graph (PrePostProcessor), so the runtime takes the decode
pool's uint8 pixels as they are. One model with a dynamic batch dimension serves every batch size:
measured here against one compiled shape per padded size, the same speed within noise, with no
padding and one compiled copy of the weights. Threads come from the CPU quota; one stream, since
the batcher already forms the batches.
"""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from api.engine.model.runtimes.base import Head
from api.errors import ConfigError, first_line

logger = logging.getLogger(__name__)

# what the layers that are not quantized compute in: an INT8 model keeps the rest exact (f32), where the
# plugin's default on a bf16 CPU would be bf16 (measured on the demo: 0.87 vs 0.82 top-1 agreement)
OV_PRECISION = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}


def openvino_version() -> str:
    import openvino

    return str(openvino.__version__).split("-")[0]


def convert(model: torch.nn.Module, input_size: tuple[int, int, int], head: Head) -> Any:
    """timm module -> an `openvino.Model` taking N x H x W x 3 uint8 and answering logits."""
    import openvino
    from openvino.preprocess import PrePostProcessor

    channels, height, width = input_size
    try:
        converted = openvino.convert_model(model, example_input=torch.zeros(1, channels, height, width))
    except Exception as error:  # the converter fails in many ways (unsupported ops, tracing)
        raise ConfigError(f"OpenVINO cannot convert this model: {first_line(error)}") from None
    converted.reshape([-1, channels, height, width])
    ppp = PrePostProcessor(converted)
    ppp.input().tensor().set_element_type(openvino.Type.u8).set_layout(openvino.Layout("NHWC"))
    ppp.input().model().set_layout(openvino.Layout("NCHW"))
    ppp.input().preprocess().convert_element_type(openvino.Type.f32).mean([255.0 * m for m in head.mean]).scale(
        [255.0 * s for s in head.std]
    )
    return ppp.build()


@dataclass(frozen=True, eq=False)
class OpenVINORuntime:
    compiled: Any  # openvino.CompiledModel
    request: Any  # its one InferRequest: only the inference thread runs it
    head: Head
    precision: str
    threads: int
    name: str = "openvino"
    padded_sizes: tuple[int, ...] = ()

    def forward(self, pixels: np.ndarray) -> torch.Tensor:
        logits = self.request.infer({0: np.ascontiguousarray(pixels)})[0]
        return self.head.scores(torch.from_numpy(np.array(logits, copy=True)))

    def describe(self) -> dict[str, Any]:
        return {
            "runtime": self.name,
            "precision": self.precision,
            "openvino": openvino_version(),
            "threads": self.threads,
            "compiled": False,
            "cuda_graphs": False,
            "padded_sizes": [],
        }


def quantize_int8(model: Any, calibration: np.ndarray) -> Any:
    """An `openvino.Model` quantized to INT8 by NNCF's post-training quantization, its statistics
    gathered on `calibration` (N x H x W x 3 uint8, the serving preprocessing's output).

    NNCF's full bias correction (`fast_bias_correction=False`), since it measurably keeps more answers:
    on the demo's real weights and photos, 0.87 top-1 agreement with fp32 instead of 0.78, for twice
    the quantization time (11 s instead of 6 s on a 2-vCPU AMD EPYC) and the same speed. Its
    accuracy-aware mode was tried and is not used: on a CPU with bf16 it reverts layers to bf16, which
    disagree too (0.90), ran 11 minutes and gave up."""
    import nncf

    logging.getLogger("nncf").setLevel(logging.WARNING)
    dataset = nncf.Dataset(calibration, lambda image: image[None])
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # its progress bars: not in the service's log
            return nncf.quantize(model, dataset, subset_size=len(calibration), fast_bias_correction=False)
    except Exception as error:  # NNCF fails in many ways on graphs it does not know
        raise ConfigError(f"NNCF cannot quantize this model to INT8: {first_line(error)}") from None


def nncf_version() -> str:
    import nncf

    return str(nncf.__version__)


def compile_for_cpu(model: Any, *, head: Head, precision: str, threads: int) -> OpenVINORuntime:
    """An `openvino.Model` compiled for this CPU at `precision` (fp32 or bf16; int8 for a quantized
    model) with `threads` threads."""
    import openvino

    if precision not in OV_PRECISION:
        raise ConfigError(
            f"API_PRECISION={precision} is not available with API_RUNTIME=openvino; use int8, bf16 or fp32"
        )
    core = openvino.Core()
    compiled = core.compile_model(
        model,
        "CPU",
        {
            "INFERENCE_PRECISION_HINT": OV_PRECISION[precision],
            "INFERENCE_NUM_THREADS": threads,
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1,
        },
    )
    effective = executed_precision(compiled)
    if effective != precision and precision != "int8":
        logger.warning(
            "OpenVINO computes in %s here, not %s: this CPU has no bf16 hardware (AMX or AVX512-BF16)",
            effective,
            precision,
        )
    return OpenVINORuntime(compiled, compiled.create_infer_request(), head, effective, threads)


# the layers that carry a network's arithmetic; what they execute in is the model's precision
_COMPUTE_LAYERS = frozenset({"Convolution", "GroupConvolution", "FullyConnected", "MatMul"})


def executed_precision(compiled: Any) -> str:
    """What the compiled model really computes in, read from its runtime graph: "int8" when its
    convolutions and matrix products run on 8-bit integers, "bf16" when in bf16, else "fp32". (The
    precision hint read back says what was asked for, as a type object, not what the plugin chose for
    each layer.)"""
    precisions = set()
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if "layerType" in info and info["layerType"].astype(str) in _COMPUTE_LAYERS and "runtimePrecision" in info:
            precisions.add(info["runtimePrecision"].astype(str))
    if precisions & {"i8", "u8"}:
        return "int8"
    return "bf16" if "bf16" in precisions else "fp32"


def available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True
