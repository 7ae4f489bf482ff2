"""What the runtimes that run an ONNX export share (``ExportedRuntime``): the member exported per input size on
first use (``detector.runtimes.export``, cached by weight hash), or the bundle's int8 model, run in a session of
the runtime's own (``open``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from detector.runtimes import check_precision, runtime_info
from detector.runtimes.base import BackendError
from detector.runtimes.export import export_onnx


class ExportedRuntime:
    """A member on an exported runtime (``detector.runtimes.base.Runtime``). Exported and loaded for ``size`` now,
    if given (so a failing export shows at construction; a missing runtime always does); any other input size is
    exported and loaded the first time it is seen. Precision int8 runs ``int8_model``, the member's quantised
    graph for input side ``size``, which takes no other size. A subclass names itself (``name``) and opens a graph
    file in its session (``open``)."""

    name = ""

    def __init__(self, member: nn.Module, mean: tuple[float, ...], std: tuple[float, ...], *,
                 precision: str = "fp32", size: int | None = None, channels_last: bool = False,
                 int8_model: Path | None = None, threads: int | None = None) -> None:
        check_precision(self.name, precision)
        info = runtime_info(self.name)
        if (precision == "int8") != (int8_model is not None) or (int8_model is not None and size is None):
            raise ValueError("precision int8 runs a quantised model: give int8_model and its input size (only then)")
        try:  # fail on a missing runtime before spending seconds on the export
            __import__(info.packages[0])
        except ImportError:
            raise BackendError(f"backend {self.name} is not installed: {info.install}") from None
        self.check(precision)
        self.member, self.mean, self.std = member, tuple(mean), tuple(std)
        self.precision, self.int8_model, self.int8_size = precision, int8_model, size
        self.threads = threads or torch.get_num_threads()
        self.sessions: dict[int, object] = {}
        if size is not None:
            self._session(size)

    def check(self, precision: str) -> None:
        """Raise BackendError if ``precision`` cannot run on this machine."""

    def open(self, path: Path):
        """A session over the graph file: ``uint8 ndarray [n, 3, S, S] -> float32 ndarray [n, K]``."""
        raise NotImplementedError

    def _session(self, size: int):
        if size not in self.sessions:
            if self.int8_model is not None:
                if size != self.int8_size:
                    raise BackendError(f"the int8 models are calibrated for {self.int8_size} px input, not {size} "
                                       "px; use precision fp32 for other sizes")
                path = self.int8_model
            else:
                path = export_onnx(self.member, self.mean, self.std, size)
            self.sessions[size] = self.open(path)
        return self.sessions[size]

    def run(self, pixels: np.ndarray) -> np.ndarray:
        """``uint8 ndarray [N, 3, S, S]`` -> ``float32 ndarray [N, K]`` probabilities."""
        if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[1] != 3 or pixels.shape[2] != pixels.shape[3]:
            raise ValueError(f"expected uint8 [N, 3, S, S], got {pixels.dtype} {pixels.shape}")
        return self._session(pixels.shape[2])(pixels)

    def __call__(self, pixels: Tensor) -> Tensor:
        out = self.run(np.ascontiguousarray(pixels.cpu().numpy()))
        return torch.from_numpy(out).to(pixels.device)
