"""Optional inference backends for the ensemble: each member exported once to ONNX, run by ONNX Runtime or OpenVINO.

PyTorch stays the reference. A backend runs the same eval graph, exported with ``torch.onnx.export`` (the
``dynamo`` exporter; needs ``onnx`` and ``onnxscript``), with the bundle's normalisation folded in so that it takes
the raw ``uint8`` pixels ``Tensor[N, 3, S, S]`` and returns softmax probabilities ``Tensor[N, K]``:

- the ``1 / (255 std)`` scale goes into the first convolution's weights (exact, also at the zero-padded border,
  because scaling commutes with zero padding);
- the ``255 mean`` is subtracted from the pixels as they are cast to float (an offset does *not* commute with
  the padding, so it cannot go into the convolution's bias without changing the border outputs).

Exports are cached in ``$IRCNN_CACHE_DIR`` (default ``$XDG_CACHE_HOME/inception-rcnn``, i.e.
``~/.cache/inception-rcnn``) under ``onnx/<sha256>.onnx``, keyed by the SHA-256 of the member's weights, its
architecture, the normalisation and ``EXPORT_VERSION``: each member is exported once, whichever bundle file or
in-memory model it came from. OpenVINO also keeps its compiled kernels there (``openvino/``).

    pip install inception-rcnn                # ONNX Runtime, fp32 (part of the plain install)
    pip install "inception-rcnn[openvino]"    # OpenVINO, fp32 or bf16 (bf16 needs AVX512_BF16 or AMX)

int8 members are quantised copies of these graphs (``detector/quantize.py``), run by either runtime.

``detector/autobackend.py`` (``backend="auto"``) measures which of them runs a member fastest on this machine.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import io
import json
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from detector.config import BACKENDS
from detector.members import first_conv
from detector.transform import fold_into_conv

EXPORT_VERSION = 1  # bump when the exported graph changes, so old cache entries are not reused
OPSET = 18
_INSTALL = {"onnxruntime": 'pip install "inception-rcnn[onnx]"', "openvino": 'pip install "inception-rcnn[openvino]"'}


class BackendError(RuntimeError):
    """A backend that cannot run here (not installed, CPU without bfloat16); the message says what to do."""


def cache_dir() -> Path:
    """Where exported models live: ``$IRCNN_CACHE_DIR``, else ``$XDG_CACHE_HOME/inception-rcnn``."""
    root = os.environ.get("IRCNN_CACHE_DIR")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "inception-rcnn"


class PixelGraph(nn.Module):
    """One member as exported: ``Tensor[N, 3, S, S]`` uint8 -> softmax ``Tensor[N, K]`` float32.

    ``(x / 255 - mean) / std`` is computed as ``(x - 255 mean)`` into a first convolution whose weights are
    pre-scaled by ``1 / (255 std)`` per input channel. The member is copied, never changed.
    """

    def __init__(self, member: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.net = copy.deepcopy(member).cpu().eval().to(memory_format=torch.contiguous_format)
        self.register_buffer("pixel_mean", fold_into_conv(first_conv(self.net), mean, std))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.float() - self.pixel_mean).softmax(dim=1)


def export_key(member: nn.Module, mean: tuple[float, ...], std: tuple[float, ...], size: int) -> str:
    """SHA-256 of everything the exported graph depends on: weights (in a fixed layout), arch, normalisation,
    input size."""
    h = hashlib.sha256()
    h.update(json.dumps({"version": EXPORT_VERSION, "opset": OPSET, "arch": member.config.to_dict(), "size": size,
                         "mean": [float(v) for v in mean], "std": [float(v) for v in std]}, sort_keys=True).encode())
    for name, t in sorted(member.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def export_onnx(member: nn.Module, mean: tuple[float, ...], std: tuple[float, ...], size: int = 224,
                directory: Path | None = None) -> Path:
    """The member's ``PixelGraph`` as ONNX for ``size`` x ``size`` input (dynamic batch), exported once and cached.

    The spatial size is static: ``torch.export`` cannot express the ceil-mode pooling sizes symbolically, and
    static shapes compile to faster kernels anyway. Returns the cached file's path; a second call with the same
    weights, normalisation and size exports nothing.
    """
    if not 32 <= size <= 1024:
        raise ValueError(f"size must be in 32..1024, got {size}")
    directory = (directory or cache_dir()) / "onnx"
    path = directory / f"{export_key(member, mean, std, size)}.onnx"
    if path.is_file():
        return path
    if importlib.util.find_spec("onnxscript") is None:  # the dynamo exporter needs it; say so before torch does
        raise BackendError("exporting to ONNX needs onnx and onnxscript, which both extras install: "
                           f"{_INSTALL['onnxruntime']} or {_INSTALL['openvino']}")
    directory.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(2, 3, size, size, dtype=torch.uint8)
    write_onnx(PixelGraph(member, mean, std), example, path, ("pixels", "probs"),
               {"x": {0: torch.export.Dim("batch", min=1, max=4096)}})
    return path


def write_onnx(module: nn.Module, example: Tensor, path: Path, names: tuple[str, str], dynamic_shapes: dict) -> None:
    """``torch.onnx.export`` (the dynamo exporter, ``OPSET``) of ``module`` traced at ``example``, written to
    ``path`` atomically (a concurrent reader never sees half a file). ``names``: the input's and output's."""
    # the exporter prints progress lines on stdout; they would corrupt `--json` output
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, (example,), dynamo=True, input_names=[names[0]],
                                    output_names=[names[1]], dynamic_shapes=dynamic_shapes, opset_version=OPSET,
                                    optimize=True, verbose=False)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".onnx.tmp")
    os.close(fd)
    try:
        program.save(tmp, external_data=False)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class OnnxRuntimeMember:
    """An exported member run by ONNX Runtime's CPU provider (fp32). ``__call__(uint8 [n,3,S,S]) -> [n,K]``."""

    def __init__(self, path: Path, threads: int) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendError(f"backend onnxruntime is not installed: {_INSTALL['onnxruntime']}") from None
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


class OpenVinoMember:
    """An exported member compiled by OpenVINO for the CPU, fp32 or bf16 (inference precision hint).

    OpenVINO caches the compiled kernels on disk next to the ONNX files. ``__call__(uint8 [n,3,S,S]) -> [n,K]``.
    """

    def __init__(self, path: Path, precision: str, threads: int) -> None:
        try:
            import openvino as ov
        except ImportError:
            raise BackendError(f"backend openvino is not installed: {_INSTALL['openvino']}") from None
        # OpenVINO defaults to bf16 on CPUs that have it: fp32 must be asked for explicitly
        properties = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
                      "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads,
                      "CACHE_DIR": str(path.parent.parent / "openvino")}
        self.request = ov.Core().compile_model(str(path), "CPU", properties).create_infer_request()

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        self.request.infer({0: pixels})
        return self.request.get_output_tensor(0).data.copy()


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
            raise BackendError(f"backend {backend} is not installed: {_INSTALL[backend]}") from None
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
