"""An ensemble of networks (GoogLeNets, EfficientNet-Lites, or a mix) whose softmax probabilities are averaged
(section 7, step 3 of the paper).

Input stays ``uint8`` until the last moment: the ensemble normalises ``Tensor[N, 3, S, S]`` uint8 crops itself,
in chunks of ``batch_size``, in channels-last layout (faster than the default layout on AVX-512 CPUs) and optionally under bfloat16 autocast. ``EnsembleConfig(backend=...)`` names the runtime of
``detector.runtimes.RUNTIMES`` the members run on (the exported ones run ONNX exports, with the same input and
output); ``backend="auto"`` measures which of those is fastest here, per member architecture, and runs each member
on its choice (``detector.runtimes.auto``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from detector.bundle.format import Bundle
from detector.bundle.int8 import load_int8
from detector.config import AUTO, EnsembleConfig
from detector.nets.transform import Normalize
from detector.runtimes import RUNTIMES, runtime_class
from detector.runtimes.auto import Choice, choose_backend
from detector.runtimes.base import BackendError


class Ensemble(nn.Module):
    """Members' softmax probabilities, averaged. ``forward(Tensor[N, 3, S, S] uint8) -> Tensor[N, K]``.

    Each member runs on the runtime its ``Choice`` names (``runners``: ``detector.runtimes.base.Runtime``); the
    torch modules stay in ``members`` as the reference."""

    def __init__(self, members: list[nn.Module], mean: tuple[float, ...], std: tuple[float, ...],
                 config: EnsembleConfig = EnsembleConfig(), size: int | None = None,
                 int8_models: Sequence[Path] | None = None) -> None:
        """``size``: the input side a runtime prepares for now (``from_bundle`` passes the bundle's); other sizes,
        or all when None, are prepared on first use. ``int8_models``: with precision int8, each member's quantised
        model for ``size`` (``from_bundle`` reads the bundle's)."""
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)
        self.config = config
        self.transform = Normalize(mean, std)
        self.to(next(members[0].parameters()).device)  # the buffers go where the members are (a bundle on cuda)
        self.eval()
        if (config.precision == "int8") != (int8_models is not None) or (
                int8_models is not None and len(int8_models) != len(members)):
            raise ValueError("precision int8 needs one int8 model per member (int8_models), and only it does")
        self.choices = member_choices(members, mean, std, config, size)  # [Choice] per member
        device = next(members[0].parameters()).device
        for choice in self.choices:  # a runtime elsewhere than the members would move every batch, unannounced
            if device.type not in RUNTIMES[choice.backend].devices:
                raise BackendError(f"backend {choice.backend} ({choice.precision}) runs on "
                                   f"{' or '.join(RUNTIMES[choice.backend].devices)}, and the members are on "
                                   f"{device}: use --device cpu for it, or on the GPU --backend torch with precision "
                                   "fp32 or bf16")
        int8_models = list(int8_models) if int8_models is not None else [None] * len(members)
        self.runners = [runtime_class(c.backend)(m, mean, std, precision=c.precision, size=size,
                                                 channels_last=c.channels_last, int8_model=q)
                        for m, c, q in zip(members, self.choices, int8_models)]

    @classmethod
    def from_bundle(cls, bundle: Bundle, config: EnsembleConfig = EnsembleConfig()) -> Ensemble:
        int8_models = None
        if config.precision == "int8":
            int8_models = load_int8(bundle)
        return cls(bundle.members, bundle.preprocess.mean, bundle.preprocess.std, config, size=bundle.preprocess.size,
                   int8_models=int8_models)

    @property
    def device(self) -> torch.device:
        return self.transform.scale.device

    def normalize(self, images: Tensor) -> Tensor:
        """``Tensor[N, 3, S, S]`` uint8 -> float32 network input (default layout)."""
        return self.transform(images)

    @torch.inference_mode()
    def forward(self, images: Tensor, members: Sequence[int] | None = None) -> Tensor:
        """``images`` uint8 ``Tensor[N, 3, S, S]`` -> ``Tensor[N, K]``, the softmax averaged over ``members``
        (indices; default all), e.g. ``members=[0]`` for a cascade's first stage."""
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 Tensor[N, 3, S, S], got {images.dtype} {tuple(images.shape)}")
        chosen = list(range(len(self.members))) if members is None else list(members)
        if not chosen or any(not 0 <= i < len(self.members) for i in chosen):
            raise ValueError(f"members must be a non-empty list of indices in 0..{len(self.members) - 1}, got {chosen}")
        probs = []
        for start in range(0, images.shape[0], self.config.batch_size):
            chunk = images[start:start + self.config.batch_size]
            probs.append(sum(self.runners[i](chunk) for i in chosen) / len(chosen))
        if not probs:
            return torch.zeros(0, self.members[0].config.num_classes, device=self.device)
        return torch.cat(probs)


def member_choices(members: Sequence[nn.Module], mean: tuple[float, ...], std: tuple[float, ...],
                   config: EnsembleConfig, size: int | None) -> list[Choice]:
    """How each member runs: as ``config`` says, or, for ``backend="auto"``, what ``choose_backend`` measured for
    its architecture at ``size`` (members of one architecture share the cached measurement)."""
    if config.backend != AUTO:
        return [Choice(config.backend, config.precision, config.channels_last)] * len(members)
    if config.precision == "int8":  # the calibrated models are ONNX: ONNX Runtime, the plain install's runtime
        return [Choice("onnxruntime", "int8", False, "int8 asked for: ONNX Runtime runs the calibrated models")] * len(
            members)
    if size is None:
        raise ValueError("backend auto measures the members at their input size: pass size (from_bundle does)")
    return [choose_backend(m, mean, std, size, config.precision, config.batch_size) for m in members]
