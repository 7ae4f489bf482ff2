"""PyTorch running the member itself (the reference runtime): fp32, or bf16 under autocast; on the CPU or a GPU."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from detector.nets.transform import Normalize
from detector.runtimes import check_precision


class TorchRuntime:
    """``detector.runtimes.base.Runtime`` on the torch module. ``channels_last`` converts the member's weights
    in place (NHWC convolutions, faster on AVX-512 CPUs and GPUs)."""

    name = "torch"

    def __init__(self, member: nn.Module, mean: tuple[float, ...], std: tuple[float, ...], *,
                 precision: str = "fp32", size: int | None = None, channels_last: bool = False,
                 int8_model: Path | None = None) -> None:
        check_precision(self.name, precision)
        if int8_model is not None:
            raise ValueError("backend torch runs no int8 model")
        self.member, self.precision, self.channels_last = member, precision, channels_last
        device = next(member.parameters()).device
        self.transform = Normalize(mean, std).to(device)
        if channels_last:
            member.to(memory_format=torch.channels_last)

    @torch.inference_mode()
    def __call__(self, pixels: Tensor) -> Tensor:
        x = self.transform(pixels)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            return self.member(x).float().softmax(dim=1)
