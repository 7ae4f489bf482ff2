"""What every runtime shares: the error a runtime raises when it cannot run (``BackendError``), the cache of exports
and measurements (``cache_dir``) and how to install each optional runtime (``INSTALL``)."""

from __future__ import annotations

import os
from pathlib import Path

INSTALL = {"onnxruntime": 'pip install "inception-rcnn[onnx]"', "openvino": 'pip install "inception-rcnn[openvino]"'}


class BackendError(RuntimeError):
    """A backend that cannot run here (not installed, CPU without bfloat16); the message says what to do."""


def cache_dir() -> Path:
    """Where exported models live: ``$IRCNN_CACHE_DIR``, else ``$XDG_CACHE_HOME/inception-rcnn``."""
    root = os.environ.get("IRCNN_CACHE_DIR")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "inception-rcnn"


