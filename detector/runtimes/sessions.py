"""The sessions the exported runtimes run a graph file in: ONNX Runtime's CPU provider (``OrtSession``) and an
OpenVINO CPU request (``OpenVinoSession``). Each takes ``uint8 ndarray [n, 3, S, S]`` and gives the graph's
``float32 ndarray [n, K]``. The export check (``detector.runtimes.export``) and the shared-trunk scorer use them
too."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from detector.runtimes import RUNTIMES
from detector.runtimes.base import BackendError


class OrtSession:
    """An exported member run by ONNX Runtime's CPU provider (fp32). ``__call__(uint8 [n,3,S,S]) -> [n,K]``."""

    def __init__(self, path: Path, threads: int) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendError(f"backend onnxruntime is not installed: {RUNTIMES['onnxruntime'].install}") from None
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # no busy-waiting between operators: on 2 cores it takes time from selective search and other processes
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input: pixels})[0]


def openvino_supports_bf16() -> bool:
    """Whether this CPU runs bfloat16 natively (AVX512_BF16 or AMX), as OpenVINO reports it."""
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


class OpenVinoSession:
    """An exported member compiled by OpenVINO for the CPU, fp32 or bf16 (inference precision hint).

    OpenVINO caches the compiled kernels on disk next to the ONNX files. ``__call__(uint8 [n,3,S,S]) -> [n,K]``.
    """

    def __init__(self, path: Path, precision: str, threads: int) -> None:
        try:
            import openvino as ov
        except ImportError:
            raise BackendError(f"backend openvino is not installed: {RUNTIMES['openvino'].install}") from None
        # OpenVINO defaults to bf16 on CPUs that have it: fp32 must be asked for explicitly
        properties = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
                      "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads,
                      "CACHE_DIR": str(path.parent.parent / "openvino")}
        self.request = ov.Core().compile_model(str(path), "CPU", properties).create_infer_request()

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        self.request.infer({0: pixels})
        return self.request.get_output_tensor(0).data.copy()


