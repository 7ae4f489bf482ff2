"""ONNX Runtime's CPU provider running an exported member."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from detector.runtimes.base import INSTALL, BackendError


class OnnxRuntimeMember:
    """An exported member run by ONNX Runtime's CPU provider (fp32). ``__call__(uint8 [n,3,S,S]) -> [n,K]``."""

    def __init__(self, path: Path, threads: int) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendError(f"backend onnxruntime is not installed: {INSTALL['onnxruntime']}") from None
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


