"""What every runtime shares: the interface (``Runtime``), the error a runtime raises when it cannot run here
(``BackendError``) and the cache of exports and measurements (``cache_dir``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

from torch import Tensor, nn


class BackendError(RuntimeError):
    """A runtime that cannot run here (not installed, CPU without bfloat16); the message says what to do."""


class Runtime(Protocol):
    """One member network on one runtime, built by ``Runtime(member, mean, std, precision=..., size=...,
    channels_last=..., int8_model=...)``:

    - ``member``: the torch module (the reference; a runtime may export it), ``mean``/``std`` its input transform;
    - ``precision``: one of the runtime's ``RuntimeInfo.precisions``; ``size``: the input side to prepare for now
      (None: on first use); ``channels_last``: the torch layout (others ignore it); ``int8_model``: with
      precision int8, the member's calibrated model for ``size``.

    Raises ``BackendError`` at construction when it cannot run here. Calling it maps uint8 pixels
    ``Tensor[N, 3, S, S]`` to the member's softmax probabilities ``Tensor[N, K]`` float32 on the pixels' device.
    """

    def __init__(self, member: nn.Module, mean: tuple[float, ...], std: tuple[float, ...], *, precision: str,
                 size: int | None, channels_last: bool, int8_model: Path | None) -> None: ...

    def __call__(self, pixels: Tensor) -> Tensor: ...


def cache_dir() -> Path:
    """Where exported models live: ``$IRCNN_CACHE_DIR``, else ``$XDG_CACHE_HOME/inception-rcnn``."""
    root = os.environ.get("IRCNN_CACHE_DIR")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "inception-rcnn"
