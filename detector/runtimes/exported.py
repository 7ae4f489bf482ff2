"""One member on an exported runtime (ONNX Runtime or OpenVINO): exported per input size on first use, or the
bundle's int8 model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from detector.config import BACKENDS
from detector.runtimes.base import INSTALL, BackendError
from detector.runtimes.export import export_onnx
from detector.runtimes.ort import OnnxRuntimeMember
from detector.runtimes.ov import OpenVinoMember, openvino_supports_bf16


class BackendMember:
    """One member on a backend: ``__call__(uint8 ndarray [n, 3, S, S]) -> float32 ndarray [n, K]`` probabilities.

    Exported and loaded for ``size`` now, if given (so a failing export shows at construction; a missing runtime
    always does); any other input size is exported and loaded the first time it is seen. ``precision="int8"``
    runs ``int8_model``, the member's quantised graph for input side ``size`` (``detector/quantize.py``), which
    takes no other size.
    """

    def __init__(self, member: nn.Module, mean: tuple[float, ...], std: tuple[float, ...], backend: str,
                 precision: str = "fp32", threads: int | None = None, size: int | None = None,
                 int8_model: Path | None = None) -> None:
        if backend not in BACKENDS[1:]:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS[1:])}, got {backend!r}")
        if backend == "onnxruntime" and precision not in ("fp32", "int8"):
            raise ValueError("backend onnxruntime runs fp32 or int8; use backend openvino (or torch) for bf16")
        if (precision == "int8") != (int8_model is not None) or (int8_model is not None and size is None):
            raise ValueError("precision int8 runs a quantised model: give int8_model and its input size (only then)")
        try:  # fail on a missing runtime before spending seconds on the export
            __import__(backend)
        except ImportError:
            raise BackendError(f"backend {backend} is not installed: {INSTALL[backend]}") from None
        if precision == "bf16" and not openvino_supports_bf16():
            raise BackendError("precision bf16 needs a CPU with AVX512_BF16 or AMX; this one has neither, "
                               "use precision fp32")
        self.member, self.mean, self.std = member, tuple(mean), tuple(std)
        self.backend, self.precision, self.int8_model, self.int8_size = backend, precision, int8_model, size
        self.threads = threads or torch.get_num_threads()
        self.runners: dict[int, OnnxRuntimeMember | OpenVinoMember] = {}
        if size is not None:
            self._runner(size)

    def _runner(self, size: int) -> OnnxRuntimeMember | OpenVinoMember:
        if size not in self.runners:
            if self.int8_model is not None:
                if size != self.int8_size:
                    raise BackendError(f"the int8 models are calibrated for {self.int8_size} px input, not {size} "
                                       "px; use precision fp32 for other sizes")
                path = self.int8_model
            else:
                path = export_onnx(self.member, self.mean, self.std, size)
            # OpenVINO runs a quantised (QDQ) graph's int8 parts in int8 whatever the hint; fp32 for the rest
            self.runners[size] = (OnnxRuntimeMember(path, self.threads) if self.backend == "onnxruntime"
                                  else OpenVinoMember(path, "fp32" if self.precision == "int8" else self.precision,
                                                      self.threads))
        return self.runners[size]

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[1] != 3 or pixels.shape[2] != pixels.shape[3]:
            raise ValueError(f"expected uint8 [N, 3, S, S], got {pixels.dtype} {pixels.shape}")
        return self._runner(pixels.shape[2])(pixels)
