"""Member architectures a bundle may hold: the paper's GoogLeNet (the default) and EfficientNet-Lite0..4.

Each member is an ``nn.Module`` with a ``config`` attribute (``GoogLeNetConfig`` or ``EfficientNetLiteConfig``),
taking ``Tensor[N, 3, S, S]`` normalised input and returning ``Tensor[N, K]`` logits in eval mode. In
``model.json`` an arch is a JSON object; ``"name": "efficientnet-lite"`` marks EfficientNet-Lite, no ``name`` (or
``"googlenet"``) GoogLeNet, so every bundle written before EfficientNet-Lite existed still reads the same. The few
places that need a layer by role (the first convolution for a backend's folded scaling, the classifier layers for
fine-tuning) ask here instead of knowing each architecture's names.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from detector.nets import efficientnet_lite
from detector.nets.efficientnet_lite import EfficientNetLiteConfig
from detector.nets.googlenet import GoogLeNet, GoogLeNetConfig

ArchConfig = GoogLeNetConfig | EfficientNetLiteConfig
GOOGLENET = "googlenet"
ARCH_NAMES = (GOOGLENET, efficientnet_lite.NAME)
MAX_CLASSES = 100_000  # the largest head a bundle may declare (checked before any network is built)
# the layers whose outputs are classes, replaced when a classifier is fine-tuned to other classes
_HEAD_PREFIXES = {GOOGLENET: ("fc.", "aux1.fc2.", "aux2.fc2."), efficientnet_lite.NAME: ("_fc.",)}


def arch_name(config: ArchConfig) -> str:
    return efficientnet_lite.NAME if isinstance(config, EfficientNetLiteConfig) else GOOGLENET


def arch_from_dict(d: object) -> ArchConfig:
    """One member's arch from ``model.json``; ``ValueError`` naming the bad field (types and ranges are checked
    here, before anything is allocated)."""
    if not isinstance(d, dict):
        raise ValueError(f"arch must be a JSON object, got {type(d).__name__}")
    name = d.get("name", GOOGLENET)
    classes = d.get("num_classes", 1000)
    if isinstance(classes, bool) or not isinstance(classes, int) or not 1 <= classes <= MAX_CLASSES:
        raise ValueError(f"num_classes must be an int in 1..{MAX_CLASSES}, got {classes!r}")
    if name == efficientnet_lite.NAME:
        return EfficientNetLiteConfig.from_dict(d)
    if name != GOOGLENET:
        raise ValueError(f"unknown arch name {name!r}; expected one of {', '.join(ARCH_NAMES)}")
    fields = {k: v for k, v in d.items() if k != "name"}
    for key in ("width", "dropout", "aux_dropout"):
        if fields.get(key) is not None and (isinstance(fields[key], bool) or not isinstance(fields[key], (int, float))):
            raise ValueError(f"{key} must be a number, got {fields[key]!r}")
    if "aux_logits" in fields and not isinstance(fields["aux_logits"], bool):
        raise ValueError(f"aux_logits must be true or false, got {fields['aux_logits']!r}")
    return GoogLeNetConfig.from_dict(fields)


def build_member(config: ArchConfig) -> nn.Module:
    """A randomly initialised member for ``config``."""
    if isinstance(config, EfficientNetLiteConfig):
        return efficientnet_lite.efficientnet_lite(config)
    return GoogLeNet(config)


def first_conv(member: nn.Module) -> nn.Conv2d:
    if isinstance(member.config, EfficientNetLiteConfig):
        return efficientnet_lite.first_conv(member)
    return member.conv1.conv


def is_head(config: ArchConfig, name: str) -> bool:
    """Whether state-dict key ``name`` belongs to a layer whose outputs are classes."""
    return name.startswith(_HEAD_PREFIXES[arch_name(config)])


def with_classes(config: ArchConfig, num_classes: int, size: int | None = None) -> ArchConfig:
    """The same architecture with a ``num_classes``-way head (and, for EfficientNet-Lite, paddings computed for
    ``size`` px inputs when given)."""
    if isinstance(config, EfficientNetLiteConfig) and size is not None:
        return dataclasses.replace(config, num_classes=num_classes, image_size=size)
    return dataclasses.replace(config, num_classes=num_classes)


def describe_arch(config: ArchConfig) -> str:
    """A short human name: ``GoogLeNet (torchvision)``, ``EfficientNet-Lite0``."""
    if isinstance(config, EfficientNetLiteConfig):
        return f"EfficientNet-Lite{config.variant[4:]}"
    width = "" if config.width == 1.0 else f", width {config.width:g}"
    return f"GoogLeNet ({config.variant}{width})"
