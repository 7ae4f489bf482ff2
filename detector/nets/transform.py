"""The input transform: ``uint8`` pixels to a network's normalised input, ``(x / 255 - mean) / std`` per channel.

The ensemble's members, MultiBox and the exported graphs take their input through this module, with the bundle's
``preprocess.mean`` and ``preprocess.std`` (pixels scaled to [0, 1]), so that a network sees the same numbers
wherever it runs:

- ``Normalize`` computes it as one multiply-add, ``x * scale + shift`` with ``scale = 1 / (255 std)`` and
  ``shift = -mean / std`` in float32;
- ``fold_into_conv`` is the same map for an exported graph: the scale goes into the first convolution's weights
  and only ``255 mean`` is subtracted from the pixels (``detector/runtimes/export.py`` says why).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Normalize(nn.Module):
    """``uint8 Tensor[N, 3, H, W]`` -> float32 ``Tensor[N, 3, H, W]`` on this module's device (default layout).

    ``mean`` and ``std``: three floats each, per RGB channel, for pixels scaled to [0, 1]. The constants are
    buffers that are not saved in a state dict: they come from the bundle's ``preprocess``.
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * std_t), persistent=False)
        self.register_buffer("shift", -torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) / std_t,
                             persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        return images.to(self.scale.device, non_blocking=True).float() * self.scale + self.shift


def fold_into_conv(conv: nn.Conv2d, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """Fold ``Normalize(mean, std)`` into ``conv``, a network's first convolution (changed in place).

    Its weights are scaled by ``1 / (255 std)`` per input channel (in float64, then cast back). Returns the
    ``255 mean`` to subtract from the float pixels before the convolution, ``Tensor[1, 3, 1, 1]`` float32.
    """
    scale = 1.0 / (255.0 * torch.tensor(std, dtype=torch.float64))
    with torch.no_grad():
        conv.weight.copy_((conv.weight.double() * scale.view(1, 3, 1, 1)).to(conv.weight.dtype))
    return 255.0 * torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
