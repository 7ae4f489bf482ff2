"""A bundle's MultiBox: ``proposals.multibox.MultiBox`` on a GoogLeNet trunk, stored as ``multibox.safetensors``.

``proposals/multibox.py`` has the network around any trunk, the priors and the loss; this module builds the trunk
(GoogLeNet up to inception (5b), the paper's and Erhan et al.'s choice) with the bundle's normalisation and keeps
the weights in the bundle. The file carries its own ``MultiBoxConfig`` and provenance in the safetensors metadata,
so it describes itself and survives a rewrite of ``model.json``; ``model.json`` only names it (``"multibox"``), and
that entry is read and written by ``detector/bundle/format.py`` like the rest of the manifest.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from detector.bundle.format import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BundleError,
    Preprocess,
    multibox_file,
    read_manifest,
    set_multibox,
)
from detector.files import atomic_path
from detector.nets.googlenet import VARIANTS, GoogLeNet, GoogLeNetConfig
from detector.nets.transform import Normalize
from eval.parsing import dataclass_fields
from proposals.multibox import HeadConfig, MultiBox

MULTIBOX_FILE = "multibox.safetensors"
FILE_FORMAT = "1"  # the "format" entry of the safetensors metadata


@dataclass(frozen=True)
class MultiBoxConfig:
    k: int = 200  # boxes per image; section 8 adds "200 region proposals coming from multi-box"
    variant: str = "paper"  # GoogLeNet trunk: "paper" (Table 1) or "torchvision" (batch norm; its checkpoint)
    width: float = 1.0  # trunk channel multiplier; 1.0 is the paper's network, smaller widths are for tests
    size: int = 224  # network input side; the whole image is resized to size x size
    grid: int = 1  # 5b features average pooled to grid x grid before the heads; 1 = global average pool
    mean: tuple[float, float, float] = IMAGENET_MEAN  # input normalisation, pixels scaled to [0, 1]
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        HeadConfig(self.k, self.size, self.grid)  # the network's own checks of k, size and grid
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}; choose one of {', '.join(VARIANTS)}")
        if not 0.0 < self.width <= 4.0:
            raise ValueError(f"width must be in (0, 4], got {self.width}")
        Preprocess.from_dict(self.preprocess.to_dict())  # same checks as a bundle's preprocessing

    @property
    def head(self) -> HeadConfig:
        return HeadConfig(self.k, self.size, self.grid)

    @property
    def preprocess(self) -> Preprocess:
        return Preprocess(self.size, tuple(self.mean), tuple(self.std))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> MultiBoxConfig:
        d = dataclass_fields(cls, d, "a MultiBox config", "MultiBox config")
        for key in ("mean", "std"):
            if key in d:
                d[key] = tuple(float(v) for v in d[key])
        return cls(**d)


class GoogLeNetTrunk(GoogLeNet):
    """GoogLeNet without its classifiers: ``forward(Tensor[N, 3, S, S])`` returns the 5b feature map
    ``Tensor[N, num_features, h, w]``. The layers keep GoogLeNet's names, so a classifier's weights load into it."""

    def __init__(self, variant: str, width: float) -> None:
        super().__init__(GoogLeNetConfig(variant=variant, num_classes=1, aux_logits=False, width=width))
        self.fc = None  # the classifier head is not part of MultiBox (nor of its state dict)

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)[0]


class GoogLeNetMultiBox(MultiBox):
    """MultiBox on a ``GoogLeNetTrunk`` normalising with ``config.mean`` and ``config.std``; ``config`` is what
    ``multibox.safetensors`` stores. ``priors`` as for ``MultiBox``."""

    def __init__(self, config: MultiBoxConfig = MultiBoxConfig(), priors: np.ndarray | Tensor | None = None) -> None:
        trunk = GoogLeNetTrunk(config.variant, config.width)
        super().__init__(trunk, trunk.num_features, Normalize(config.mean, config.std), config.head, priors)
        self.config = config

    def load_trunk(self, classifier: GoogLeNet) -> None:
        """Copy a classifier's weights below its head (``fc`` and the auxiliary heads are left out)."""
        arch = classifier.config
        if (arch.variant, arch.width) != (self.config.variant, self.config.width):
            raise ValueError(f"the classifier is a {arch.variant} GoogLeNet of width {arch.width}; this MultiBox's "
                             f"trunk is {self.config.variant} of width {self.config.width}")
        state = {k: v for k, v in classifier.state_dict().items() if not k.startswith(("fc.", "aux1.", "aux2."))}
        self.trunk.load_state_dict(state, strict=True)


def save_multibox(bundle_dir: str | os.PathLike, model: GoogLeNetMultiBox, provenance: dict | None = None) -> Path:
    """Write ``multibox.safetensors`` into an existing bundle and point ``model.json``'s ``multibox`` at it.

    The members and every other manifest field stay as they are. The MultiBox config (and ``provenance``) go into
    the safetensors metadata. Both files are replaced atomically. Returns the weights file.
    """
    path = Path(bundle_dir)
    read_manifest(path)  # refuses a directory that is no bundle, saying how to make one
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"format": FILE_FORMAT, "config": json.dumps(model.config.to_dict())}
    if provenance is not None:
        meta["provenance"] = json.dumps(provenance)
    file = path / MULTIBOX_FILE
    with atomic_path(file) as tmp:
        save_file(state, str(tmp), metadata=meta)
    set_multibox(path, MULTIBOX_FILE)
    return file


def load_multibox(bundle_dir: str | os.PathLike, device: str | torch.device = "cpu") -> GoogLeNetMultiBox | None:
    """The bundle's MultiBox in eval mode, or ``None`` when its ``model.json`` has ``"multibox": null``."""
    path = Path(bundle_dir)
    file = multibox_file(path)
    if file is None:
        return None
    if not file.is_file():
        raise BundleError(f"{path}: MultiBox file {file.name} is missing; train one with `ircnn train multibox "
                          f"--out {path}` or set \"multibox\" to null in model.json")
    try:
        with safe_open(str(file), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != FILE_FORMAT:
            raise ValueError(f"metadata format {meta.get('format')!r}, expected {FILE_FORMAT!r}")
        model = GoogLeNetMultiBox(MultiBoxConfig.from_dict(json.loads(meta["config"])))
        model.load_state_dict(load_file(str(file), device="cpu"), strict=True)
    except Exception as e:  # safetensors, JSON and shape errors all mean the same thing to the user
        raise BundleError(f"{file} is not a usable MultiBox: {str(e)[:500]}") from None
    return model.to(device).eval()


def multibox_provenance(bundle_dir: str | os.PathLike) -> dict:
    """The provenance stored with the bundle's MultiBox weights (``{}`` if none)."""
    file = multibox_file(Path(bundle_dir))
    if file is None:
        return {}
    with safe_open(str(file), "pt") as f:
        return json.loads((f.metadata() or {}).get("provenance", "{}"))
