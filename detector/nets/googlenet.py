"""GoogLeNet (Inception v1), exactly as Table 1 of "Going deeper with convolutions".

Two variants share one module tree and torchvision's layer names:

- ``paper``: what Table 1 and section 5 describe. Convolutions with bias and ReLU, true 5x5 convolutions in the
  Inception modules, local response normalisation after the first max pool and after conv3 (the Caffe
  ``bvlc_googlenet`` settings: size 5, alpha 1e-4, beta 0.75), 3x3/2 max pools, 40% dropout, auxiliary heads on
  4a and 4d pooled 5x5/3.
- ``torchvision``: torchvision's ``googlenet`` so that its ImageNet checkpoint ``googlenet-1378be20.pth`` loads
  with ``strict=True`` and gives the same logits: batch-normalised convolutions without bias, no LRN, the 3x3
  convolution torchvision puts where the paper has 5x5 (a known slip of the original port, kept for the
  weights), 2x2 max pool before 5a, 20% dropout, auxiliary heads pooled adaptively to 4x4.

The auxiliary heads run only in training mode; the caller weights their losses by ``AUX_LOSS_WEIGHT``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eval.parsing import dataclass_fields

AUX_LOSS_WEIGHT = 0.3  # section 5: "the losses of the auxiliary classifiers were weighted by 0.3"
VARIANTS = ("paper", "torchvision")

# Table 1's Inception rows: (name, #1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj).
INCEPTION_SPECS = (
    ("3a", 64, 96, 128, 16, 32, 32),
    ("3b", 128, 128, 192, 32, 96, 64),
    ("4a", 192, 96, 208, 16, 48, 64),
    ("4b", 160, 112, 224, 24, 64, 64),
    ("4c", 128, 128, 256, 24, 64, 64),
    ("4d", 112, 144, 288, 32, 64, 64),
    ("4e", 256, 160, 320, 32, 128, 128),
    ("5a", 256, 160, 320, 32, 128, 128),
    ("5b", 384, 192, 384, 48, 128, 128),
)


@dataclass(frozen=True)
class GoogLeNetConfig:
    variant: str = "paper"  # "paper" (Table 1) or "torchvision" (loads torchvision's checkpoint)
    num_classes: int = 1000  # 1000 ILSVRC CLS classes; 201 for DET (200 + background)
    aux_logits: bool = True  # build the two auxiliary heads (used only in training mode)
    width: float = 1.0  # channel multiplier; 1.0 is the paper's network, smaller widths are for tests
    dropout: float | None = None  # before the classifier; None = variant default (paper 0.4, torchvision 0.2)
    aux_dropout: float = 0.7  # section 5: "a dropout layer with 70% ratio of dropped outputs"

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown GoogLeNet variant {self.variant!r}; choose one of {', '.join(VARIANTS)}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if not 0.0 < self.width <= 4.0:
            raise ValueError(f"width must be in (0, 4], got {self.width}")
        for name in ("dropout", "aux_dropout"):
            p = getattr(self, name)
            if p is not None and not 0.0 <= p < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {p}")

    @property
    def classifier_dropout(self) -> float:
        if self.dropout is not None:
            return self.dropout
        return 0.4 if self.variant == "paper" else 0.2

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GoogLeNetConfig:
        return cls(**dataclass_fields(cls, d, "arch", "arch"))


class GoogLeNetOutputs(NamedTuple):
    logits: Tensor  # [N, num_classes]
    aux_logits2: Tensor | None  # head on 4d, [N, num_classes]
    aux_logits1: Tensor | None  # head on 4a, [N, num_classes]


class BasicConv2d(nn.Module):
    """Convolution + ReLU; with batch norm (torchvision, no conv bias) or with conv bias (paper)."""

    def __init__(self, in_ch: int, out_ch: int, batch_norm: bool, **kwargs) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, bias=not batch_norm, **kwargs)
        self.bn = nn.BatchNorm2d(out_ch, eps=0.001) if batch_norm else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x, inplace=True)


class LocalResponseNorm(nn.Module):
    """Cross-channel LRN, ``x / (k + alpha * mean(x^2 over `size` channels)) ** beta``, as ``nn.LocalResponseNorm``.

    Computed in float32 (also under bfloat16 autocast) as a 1-D average pool along the channels of the NHWC view,
    with ``d ** -0.75`` as ``rsqrt(d) * sqrt(rsqrt(d))``: faster than ``nn.LocalResponseNorm`` in channels-last
    layout and under bfloat16 autocast, where LRN otherwise dominates the paper variant's time. ``Tensor[N, C, H, W] -> Tensor[N, C, H, W]``.
    """

    def __init__(self, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0) -> None:
        super().__init__()
        self.size, self.alpha, self.beta, self.k = size, alpha, beta, k

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        sq = x.float().square().permute(0, 2, 3, 1).reshape(n * h * w, 1, c)
        # zero padding counted in the mean, as nn.LocalResponseNorm's avg_pool3d does
        mean = F.avg_pool1d(F.pad(sq, (self.size // 2, (self.size - 1) // 2)), self.size, stride=1)
        d = mean.mul_(self.alpha).add_(self.k).view(n, h, w, c).permute(0, 3, 1, 2)  # [N, C, H, W]
        if self.beta == 0.75:
            r = d.rsqrt()
            scale = r * r.sqrt()
        else:
            scale = d.pow(-self.beta)
        return (x.float() * scale).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.size}, alpha={self.alpha}, beta={self.beta}, k={self.k}"


class Inception(nn.Module):
    """Four parallel branches concatenated on channels: 1x1; 1x1 -> 3x3; 1x1 -> 5x5; 3x3 max pool -> 1x1."""

    def __init__(self, in_ch: int, ch1x1: int, ch3x3red: int, ch3x3: int, ch5x5red: int, ch5x5: int,
                 pool_proj: int, paper: bool) -> None:
        super().__init__()
        bn = not paper
        k5 = 5 if paper else 3  # torchvision's port uses 3x3 here; its checkpoint needs it
        self.branch1 = BasicConv2d(in_ch, ch1x1, bn, kernel_size=1)
        self.branch2 = nn.Sequential(
            BasicConv2d(in_ch, ch3x3red, bn, kernel_size=1),
            BasicConv2d(ch3x3red, ch3x3, bn, kernel_size=3, padding=1),
        )
        self.branch3 = nn.Sequential(
            BasicConv2d(in_ch, ch5x5red, bn, kernel_size=1),
            BasicConv2d(ch5x5red, ch5x5, bn, kernel_size=k5, padding=k5 // 2),
        )
        self.branch4 = nn.Sequential(
            nn.MaxPool2d(kernel_size=3, stride=1, padding=1, ceil_mode=True),
            BasicConv2d(in_ch, pool_proj, bn, kernel_size=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class InceptionAux(nn.Module):
    """Section 5's side network: 5x5/3 average pool -> 1x1 conv 128 -> FC 1024 -> 70% dropout -> linear."""

    def __init__(self, in_ch: int, num_classes: int, width: float, paper: bool, dropout: float) -> None:
        super().__init__()
        c = _scaled(128, width)
        f = _scaled(1024, width)
        self.paper = paper
        self.conv = BasicConv2d(in_ch, c, not paper, kernel_size=1)
        self.fc1 = nn.Linear(c * 4 * 4, f)
        self.fc2 = nn.Linear(f, num_classes)
        self.dropout = nn.Dropout(p=dropout)

    def forward(self, x: Tensor) -> Tensor:
        if self.paper and min(x.shape[-2:]) >= 5:
            x = F.avg_pool2d(x, kernel_size=5, stride=3)  # 14x14 -> 4x4 at 224 input
        x = F.adaptive_avg_pool2d(x, (4, 4))  # identity at 224 for the paper; torchvision's pooling otherwise
        x = torch.flatten(self.conv(x), 1)
        x = self.dropout(F.relu(self.fc1(x), inplace=True))
        return self.fc2(x)


def _scaled(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


class GoogLeNet(nn.Module):
    """Table 1's network. Input ``Tensor[N, 3, H, W]`` (normalised; 224x224 in the paper).

    Eval mode returns logits ``Tensor[N, num_classes]``; training mode with auxiliary heads returns
    ``GoogLeNetOutputs(logits, aux_logits2, aux_logits1)`` (torchvision's order).
    """

    def __init__(self, config: GoogLeNetConfig = GoogLeNetConfig()) -> None:
        super().__init__()
        self.config = config
        paper = config.variant == "paper"
        bn = not paper
        w = config.width
        c64, c192 = _scaled(64, w), _scaled(192, w)

        self.conv1 = BasicConv2d(3, c64, bn, kernel_size=7, stride=2, padding=3)
        self.maxpool1 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.lrn1 = LocalResponseNorm(5, alpha=1e-4, beta=0.75) if paper else None
        self.conv2 = BasicConv2d(c64, c64, bn, kernel_size=1)
        self.conv3 = BasicConv2d(c64, c192, bn, kernel_size=3, padding=1)
        self.lrn2 = LocalResponseNorm(5, alpha=1e-4, beta=0.75) if paper else None
        self.maxpool2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)

        in_ch = c192
        for name, *chs in INCEPTION_SPECS:
            chs = [_scaled(c, w) for c in chs]
            setattr(self, f"inception{name}", Inception(in_ch, *chs, paper=paper))
            in_ch = chs[0] + chs[2] + chs[4] + chs[5]
            if name == "4a":
                aux1_in = in_ch
            elif name == "4d":
                aux2_in = in_ch
        self.maxpool3 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        # Table 1 says 3x3/2 before 5a; torchvision's checkpoint was trained with 2x2/2 (same 7x7 output).
        self.maxpool4 = nn.MaxPool2d(3 if paper else 2, stride=2, ceil_mode=True)

        if config.aux_logits:
            self.aux1 = InceptionAux(aux1_in, config.num_classes, w, paper, config.aux_dropout)
            self.aux2 = InceptionAux(aux2_in, config.num_classes, w, paper, config.aux_dropout)
        else:
            self.aux1 = self.aux2 = None
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(p=config.classifier_dropout)
        self.fc = nn.Linear(in_ch, config.num_classes)
        self.num_features = in_ch
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``torchvision``: torchvision's initialisation, truncated normal (std 0.01) weights, unit batch norm.

        ``paper``: Caffe ``bvlc_googlenet``'s fillers, "xavier" weights U(+-sqrt(3 / fan_in)) and 0.2 biases
        (0 on the classifiers). Without batch norm, std 0.01 lets the signal vanish over 22 layers and training
        from scratch does not start.
        """
        classifiers = {self.fc} | {aux.fc2 for aux in (self.aux1, self.aux2) if aux is not None}
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                if self.config.variant == "paper":
                    nn.init.kaiming_uniform_(m.weight, nonlinearity="linear")
                    nn.init.constant_(m.bias, 0.0 if m in classifiers else 0.2)
                else:
                    nn.init.trunc_normal_(m.weight, mean=0.0, std=0.01, a=-2, b=2)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def stem(self, x: Tensor) -> Tensor:
        x = self.maxpool1(self.conv1(x))
        if self.lrn1 is not None:
            x = self.lrn1(x)
        x = self.conv3(self.conv2(x))
        if self.lrn2 is not None:
            x = self.lrn2(x)
        return self.maxpool2(x)

    def features(self, x: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Returns the 5b feature map ``Tensor[N, C, h, w]`` and the inputs of the two auxiliary heads."""
        x = self.inception3b(self.inception3a(self.stem(x)))
        x = self.inception4a(self.maxpool3(x))
        a1 = x
        x = self.inception4d(self.inception4c(self.inception4b(x)))
        a2 = x
        x = self.inception4e(x)
        x = self.inception5b(self.inception5a(self.maxpool4(x)))
        return x, a1, a2

    def forward(self, x: Tensor) -> Tensor | GoogLeNetOutputs:
        x, a1, a2 = self.features(x)
        logits = self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))
        if self.training and self.aux1 is not None:
            return GoogLeNetOutputs(logits, self.aux2(a2), self.aux1(a1))
        return logits


def googlenet_loss(outputs: Tensor | GoogLeNetOutputs, target: Tensor) -> Tensor:
    """Cross-entropy of the main head plus 0.3 x each auxiliary head's (section 5). ``target``: ``Tensor[N]``."""
    if isinstance(outputs, Tensor):
        return F.cross_entropy(outputs, target)
    loss = F.cross_entropy(outputs.logits, target)
    for aux in (outputs.aux_logits1, outputs.aux_logits2):
        if aux is not None:
            loss = loss + AUX_LOSS_WEIGHT * F.cross_entropy(aux, target)
    return loss
