"""OpenVINO running an exported member on the CPU, fp32 or bf16."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from detector.runtimes.base import INSTALL, BackendError


def openvino_supports_bf16() -> bool:
    """Whether this CPU runs bfloat16 natively (AVX512_BF16 or AMX), as OpenVINO reports it."""
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


class OpenVinoMember:
    """An exported member compiled by OpenVINO for the CPU, fp32 or bf16 (inference precision hint).

    OpenVINO caches the compiled kernels on disk next to the ONNX files. ``__call__(uint8 [n,3,S,S]) -> [n,K]``.
    """

    def __init__(self, path: Path, precision: str, threads: int) -> None:
        try:
            import openvino as ov
        except ImportError:
            raise BackendError(f"backend openvino is not installed: {INSTALL['openvino']}") from None
        # OpenVINO defaults to bf16 on CPUs that have it: fp32 must be asked for explicitly
        properties = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
                      "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads,
                      "CACHE_DIR": str(path.parent.parent / "openvino")}
        self.request = ov.Core().compile_model(str(path), "CPU", properties).create_infer_request()

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        self.request.infer({0: pixels})
        return self.request.get_output_tensor(0).data.copy()


