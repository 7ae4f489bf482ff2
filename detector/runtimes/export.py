"""Optional inference backends for the ensemble: each member exported once to ONNX, run by ONNX Runtime or OpenVINO.

PyTorch stays the reference. A backend runs the same eval graph, exported with ``torch.onnx.export``
(``write_onnx``: the TorchScript exporter where its graph checks out, else the ``dynamo`` one), with the bundle's
normalisation folded in so that it takes the raw ``uint8`` pixels ``Tensor[N, 3, S, S]`` and returns softmax
probabilities ``Tensor[N, K]``:

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

int8 members are quantised copies of the dynamo exporter's graphs (``onnx/<sha256>.dynamo.onnx``; see
``detector/runtimes/calibrate.py``), run by either runtime.

``detector/runtimes/auto.py`` (``backend="auto"``) measures which of them runs a member fastest on this machine.
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

from detector.files import file_sha256, write_text_atomic
from detector.nets.members import first_conv
from detector.nets.transform import fold_into_conv
from detector.runtimes.base import BackendError, cache_dir
from detector.runtimes.sessions import OrtSession

# Bump when the exported function changes, so old cache entries are not reused. Not bumped for the switch from the
# dynamo to the TorchScript exporter: both graphs compute the same function (held to torch alike), and a bump would
# invalidate every int8/ copy quantised from the old exports.
EXPORT_VERSION = 1
OPSET = 18
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


EXPORTERS = ("torchscript", "dynamo")  # tried in this order (``write_onnx``)
_EXPORTER_NAMES = {"torchscript": "TorchScript", "dynamo": "dynamo"}


def export_onnx(member: nn.Module, mean: tuple[float, ...], std: tuple[float, ...], size: int = 224,
                directory: Path | None = None, exporter: str | None = None) -> Path:
    """The member's ``PixelGraph`` as ONNX for ``size`` x ``size`` input (dynamic batch), exported once and cached.

    The spatial size is static: ``torch.export`` cannot express the ceil-mode pooling sizes symbolically, and
    static shapes compile to faster kernels anyway. Returns the cached file's path, ``<export_key>.onnx``; a second
    call with the same weights, normalisation and size exports nothing. ``exporter="dynamo"``: the dynamo
    exporter's graph only (``<export_key>.dynamo.onnx``), whose optimiser folds EfficientNet's explicit padding into
    the convolutions; int8 quantisation takes that form (``detector.runtimes.calibrate``).
    """
    if not 32 <= size <= 1024:
        raise ValueError(f"size must be in 32..1024, got {size}")
    if exporter not in (None, *EXPORTERS):
        raise ValueError(f"exporter must be one of {', '.join(EXPORTERS)}, or None for the first that works")
    directory = (directory or cache_dir()) / "onnx"
    path = directory / f"{export_key(member, mean, std, size)}{'.dynamo' if exporter == 'dynamo' else ''}.onnx"
    if cached(path):
        return path
    example = torch.zeros(2, 3, size, size, dtype=torch.uint8)
    write_onnx(PixelGraph(member, mean, std), example, path, ("pixels", "probs"), {0: ("batch", 1, 4096)},
               (exporter,) if exporter else EXPORTERS)
    return path


def cached(path: Path) -> bool:
    """Whether the cache holds a good graph at ``path``: the file hashes to what ``write_onnx`` recorded beside it
    (``<name>.sha256``). A graph replaced by another, truncated, emptied, or without its hash (an older cache) is
    removed, so that the caller exports it again: a bad entry is rebuilt, never used and never fatal."""
    record = _hash_file(path)
    try:
        if path.is_file() and file_sha256(path) == record.read_text(encoding="ascii").strip():
            return True
    except (OSError, UnicodeDecodeError):
        pass
    for stale in (path, record):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
    return False


def _hash_file(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def write_onnx(module: nn.Module, example: Tensor, path: Path, names: tuple[str, str],
               dynamic: dict[int, tuple], exporters: tuple[str, ...] = EXPORTERS) -> None:
    """``module`` traced at ``example`` and written as ONNX (``OPSET``) to ``path`` atomically (a concurrent reader
    never sees half a file). ``names``: the input's and output's; ``dynamic``: the input's dynamic dimensions,
    ``{dim: (name, min, max)}`` or ``{dim: (name, min, max, multiple)}`` for sizes that are multiples of one.

    ``exporters`` are tried in turn; the first graph that ONNX Runtime runs as the module, on an input whose dynamic
    sizes differ from ``example``'s, is written (BackendError naming each failure when none does: nothing is cached
    then). The TorchScript exporter goes first by default: it wrote GoogLeNet in 0.7 s where the dynamo exporter took
    11.7 s (the graphs ran equally fast in ONNX Runtime and agreed with torch within 2e-9), and every member of every
    bundle pays the export once per machine. But a trace can keep a size it saw as a constant (EfficientNet's trunk
    at another image size did), which the check catches; the dynamo exporter is then used, and also where this
    torch no longer has the TorchScript one. Without ONNX Runtime to check with, only the dynamo graph is trusted.
    """
    module.eval()  # (the TorchScript exporter sets the module's mode back to what it was: so eval, all through)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".onnx.tmp")
    os.close(fd)
    failures = []
    # the exporters print progress lines on stdout (they would corrupt `--json` output) and deprecation warnings
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            for exporter in exporters:
                try:
                    _EXPORT[exporter](module, example, tmp, names, dynamic)
                    checked = _runs_as(module, tmp, example, dynamic)
                except Exception as e:  # gone from this torch, unable to trace the module, onnxscript missing
                    checked = f"{type(e).__name__}: {str(e)[:200]}"
                if checked is True or (checked == _NO_CHECKER and exporter == "dynamo"):
                    write_text_atomic(_hash_file(path), file_sha256(Path(tmp)) + "\n")  # what the graph must hash to
                    os.replace(tmp, path)
                    return
                failures.append(f"the {_EXPORTER_NAMES[exporter]} exporter's: {checked}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise BackendError(f"no ONNX export of {type(module).__name__} runs as torch does: {'; '.join(failures)}")


def _export_torchscript(module: nn.Module, example: Tensor, tmp: str, names: tuple[str, str],
                        dynamic: dict[int, tuple]) -> None:
    torch.onnx.export(module, (example,), tmp, dynamo=False, input_names=[names[0]], output_names=[names[1]],
                      opset_version=OPSET, dynamic_axes={names[0]: {d: spec[0] for d, spec in dynamic.items()}})


def _export_dynamo(module: nn.Module, example: Tensor, tmp: str, names: tuple[str, str],
                   dynamic: dict[int, tuple]) -> None:
    if importlib.util.find_spec("onnxscript") is None:
        raise BackendError("the dynamo exporter needs onnx and onnxscript: pip install onnx onnxscript")
    shapes = {}
    for d, (name, low, high, *multiple) in dynamic.items():
        if multiple:
            shapes[d] = multiple[0] * torch.export.Dim(name, min=max(1, low // multiple[0]),
                                                       max=high // multiple[0])
        else:
            shapes[d] = torch.export.Dim(name, min=low, max=high)
    program = torch.onnx.export(module, (example,), dynamo=True, input_names=[names[0]], output_names=[names[1]],
                                dynamic_shapes={"x": shapes}, opset_version=OPSET, optimize=True, verbose=False)
    program.save(tmp, external_data=False)


_EXPORT = {"torchscript": _export_torchscript, "dynamo": _export_dynamo}


_NO_CHECKER = "onnxruntime is not installed to check the graph"


def _runs_as(module: nn.Module, graph: str, example: Tensor, dynamic: dict[int, tuple]) -> bool | str:
    """True when ONNX Runtime runs ``graph`` as ``module`` on an input whose dynamic sizes differ from
    ``example``'s; else why not."""
    if importlib.util.find_spec("onnxruntime") is None:
        return _NO_CHECKER
    shape = list(example.shape)
    for d, (_, low, high, *multiple) in dynamic.items():
        step = multiple[0] if multiple else 1
        shape[d] = shape[d] + step if shape[d] + step <= high else shape[d] - step
        if shape[d] < low:
            return f"no other size to check dimension {d} at"
    g = torch.Generator().manual_seed(0)
    if example.dtype == torch.uint8:
        x = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    else:
        x = torch.randn(shape, generator=g, dtype=example.dtype)
    with torch.inference_mode():
        expected = module(x).float().numpy()
    got = OrtSession(Path(graph), torch.get_num_threads())(x.numpy())
    if got.shape != expected.shape:
        return f"the graph gave shape {got.shape} for {tuple(expected.shape)} at input {tuple(shape)}"
    scale = max(1.0, float(np.abs(expected).max()))
    diff = float(np.abs(got - expected).max())
    return True if diff <= 1e-4 * scale else f"the graph differs from the module by {diff:.2g} at input {tuple(shape)}"


