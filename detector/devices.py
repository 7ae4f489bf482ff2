"""The device a command runs its networks on, checked before anything is moved there: a GPU that this machine
does not have is a usage error that says so, not a driver traceback."""

from __future__ import annotations

import torch


def check_device(device: str | torch.device) -> torch.device:
    """``device`` ("cpu", "cuda", "cuda:N") as a ``torch.device``; ValueError if it is no device name or names a
    GPU this machine does not have."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be cpu or cuda[:N], got {device!r}") from None
    if parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda[:N], got {device!r}")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device} asked for, but this machine has no usable CUDA GPU (or this PyTorch "
                             "is a CPU build); use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"device {device} asked for, but this machine has {torch.cuda.device_count()} CUDA "
                             f"GPU(s): cuda:0..cuda:{torch.cuda.device_count() - 1}")
    return parsed
