"""ONNX Runtime's CPU provider running a member's export (fp32) or its calibrated int8 model."""

from __future__ import annotations

from pathlib import Path

from detector.runtimes.exported import ExportedRuntime
from detector.runtimes.sessions import OrtSession


class OnnxRuntimeRuntime(ExportedRuntime):
    name = "onnxruntime"

    def open(self, path: Path) -> OrtSession:
        return OrtSession(path, self.threads)
