"""OpenVINO running a member's export on the CPU, fp32 or bf16 (native bfloat16 only), or its int8 model."""

from __future__ import annotations

from pathlib import Path

from detector.runtimes.base import BackendError
from detector.runtimes.exported import ExportedRuntime
from detector.runtimes.sessions import OpenVinoSession, openvino_supports_bf16


class OpenVinoRuntime(ExportedRuntime):
    name = "openvino"

    def check(self, precision: str) -> None:
        if precision == "bf16" and not openvino_supports_bf16():
            raise BackendError("precision bf16 needs a CPU with AVX512_BF16 or AMX; this one has neither, "
                               "use precision fp32")

    def open(self, path: Path) -> OpenVinoSession:
        # OpenVINO runs a quantised (QDQ) graph's int8 parts in int8 whatever the hint; fp32 for the rest
        return OpenVinoSession(path, "fp32" if self.precision == "int8" else self.precision, self.threads)
