"""Runtimes: how one member network runs. Each runtime is one class in one module with the small interface of
``detector.runtimes.base.Runtime``; ``RUNTIMES`` below names them, and every caller asks this table: the
configuration's checks and the CLI's choices (``detector.config``), the ensemble (which builds a runtime per
member), ``backend="auto"`` (which measures whatever the table holds, ``detector.runtimes.auto``) and the service's
settings. A new runtime is one new module plus one line here.

The table imports nothing heavy: a runtime's module is imported only when it is used (``runtime_class``).
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass


@dataclass(frozen=True)
class RuntimeInfo:
    """What the rest of the package knows of a runtime before importing it."""

    module: str  # the module that holds the class
    cls: str  # the class: detector.runtimes.base.Runtime
    precisions: tuple[str, ...]  # what it runs: "fp32", "bf16" (native where measured by auto), "int8"
    packages: tuple[str, ...] = ()  # packages it needs beyond torch
    install: str = ""  # how to install them
    devices: tuple[str, ...] = ("cpu",)  # device types it runs members on
    layouts: tuple[bool, ...] = (False,)  # channels_last settings that auto measures


_EXPORTER = ("onnx", "onnxscript")  # the ONNX exporter, for the runtimes that run exports
RUNTIMES: dict[str, RuntimeInfo] = {
    "torch": RuntimeInfo("detector.runtimes.eager", "TorchRuntime", ("fp32", "bf16"), devices=("cpu", "cuda"),
                         layouts=(False, True)),
    "onnxruntime": RuntimeInfo("detector.runtimes.ort", "OnnxRuntimeRuntime", ("fp32", "int8"),
                               ("onnxruntime",) + _EXPORTER, 'pip install "inception-rcnn[onnx]"'),
    "openvino": RuntimeInfo("detector.runtimes.ov", "OpenVinoRuntime", ("fp32", "bf16", "int8"),
                            ("openvino",) + _EXPORTER, 'pip install "inception-rcnn[openvino]"'),
}
REFERENCE = "torch"  # the runtime every other one is checked against
AUTO = "auto"  # the backend name that measures RUNTIMES and picks the fastest


def runtime_info(name: str) -> RuntimeInfo:
    if name not in RUNTIMES:
        raise ValueError(f"backend must be one of {', '.join((AUTO,) + tuple(RUNTIMES))}, got {name!r}")
    return RUNTIMES[name]


def check_precision(name: str, precision: str) -> None:
    """Raise ValueError unless runtime ``name`` runs ``precision``, naming the runtimes that do."""
    precisions = runtime_info(name).precisions
    if precision not in precisions:
        others = [n for n, info in RUNTIMES.items() if precision in info.precisions]
        raise ValueError(f"backend {name} runs {' or '.join(precisions)}; precision {precision} runs on backend "
                         f"{' or '.join(others)} (or auto)")


def runtime_class(name: str) -> type:
    """The runtime's class, its module imported now."""
    info = runtime_info(name)
    return getattr(importlib.import_module(info.module), info.cls)


def installed(name: str) -> bool:
    """Whether the packages ``name`` needs are importable here (the reference always is)."""
    return all(importlib.util.find_spec(p) is not None for p in runtime_info(name).packages)
