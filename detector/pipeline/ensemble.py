"""An ensemble of networks (GoogLeNets, EfficientNet-Lites, or a mix) whose softmax probabilities are averaged
(section 7, step 3 of the paper).

Input stays ``uint8`` until the last moment: the ensemble normalises ``Tensor[N, 3, S, S]`` uint8 crops itself,
in chunks of ``batch_size``, in channels-last layout (faster than the default layout on AVX-512 CPUs) and optionally under bfloat16 autocast. ``EnsembleConfig(backend=...)`` names the runtime of
``detector.runtimes.RUNTIMES`` the members run on (the exported ones run ONNX exports, with the same input and
output); ``backend="auto"`` measures which of those is fastest here, per member architecture, and runs each member
on its choice (``detector.runtimes.auto``).

Members may take different input sizes (a bundle merged from EfficientNet-Lite0, Lite1 and Lite2: 224, 240 and
260 px): ``by_size`` takes the same inputs at each size and runs every member on its own, and a size's members
weigh as many as they are in the average over all.
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
    """Members' softmax probabilities, averaged. ``forward(Tensor[N, 3, S, S] uint8) -> Tensor[N, K]``;
    ``by_size`` for members of different input sizes.

    Each member runs on the runtime its ``Choice`` names (``runners``: ``detector.runtimes.base.Runtime``); the
    torch modules stay in ``members`` as the reference."""

    def __init__(self, members: list[nn.Module], mean: tuple[float, ...], std: tuple[float, ...],
                 config: EnsembleConfig = EnsembleConfig(), size: int | Sequence[int] | None = None,
                 int8_models: Sequence[Path] | None = None) -> None:
        """``size``: the input side a runtime prepares for now, one for all members or one per member
        (``from_bundle`` passes the bundle's); other sizes, or all when None, are prepared on first use.
        ``int8_models``: with precision int8, each member's quantised model for its ``size`` (``from_bundle``
        reads the bundle's)."""
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.sizes = per_member(size, len(members))  # each member's input side, None where not known
        self.members = nn.ModuleList(members)
        self.config = config
        self.transform = Normalize(mean, std)
        self.to(next(members[0].parameters()).device)  # the buffers go where the members are (a bundle on cuda)
        self.eval()
        if (config.precision == "int8") != (int8_models is not None) or (
                int8_models is not None and len(int8_models) != len(members)):
            raise ValueError("precision int8 needs one int8 model per member (int8_models), and only it does")
        self.choices = member_choices(members, mean, std, config, self.sizes)  # [Choice] per member
        device = next(members[0].parameters()).device
        for choice in self.choices:  # a runtime elsewhere than the members would move every batch, unannounced
            if device.type not in RUNTIMES[choice.backend].devices:
                raise BackendError(f"backend {choice.backend} ({choice.precision}) runs on "
                                   f"{' or '.join(RUNTIMES[choice.backend].devices)}, and the members are on "
                                   f"{device}: use --device cpu for it, or on the GPU --backend torch with precision "
                                   "fp32 or bf16")
        int8_models = list(int8_models) if int8_models is not None else [None] * len(members)
        self.runners = [runtime_class(c.backend)(m, mean, std, precision=c.precision, size=s,
                                                 channels_last=c.channels_last, int8_model=q)
                        for m, c, s, q in zip(members, self.choices, self.sizes, int8_models)]

    @classmethod
    def from_bundle(cls, bundle: Bundle, config: EnsembleConfig = EnsembleConfig()) -> Ensemble:
        int8_models = None
        if config.precision == "int8":
            int8_models = load_int8(bundle)
        return cls(bundle.members, bundle.preprocess.mean, bundle.preprocess.std, config, size=bundle.input_sizes,
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
        chosen = self._chosen(members)
        if len(set(self.sizes)) > 1 and any(self.sizes[i] != images.shape[-1] for i in chosen):
            raise ValueError(f"members {chosen} take {sorted({self.sizes[i] for i in chosen})} px inputs, got "
                             f"{images.shape[-1]} px: score members of different sizes with by_size")
        probs = []
        for start in range(0, images.shape[0], self.config.batch_size):
            chunk = images[start:start + self.config.batch_size]
            probs.append(sum(self.runners[i](chunk) for i in chosen) / len(chosen))
        if not probs:
            return torch.zeros(0, self.members[0].config.num_classes, device=self.device)
        return torch.cat(probs)

    @torch.inference_mode()
    def by_size(self, images: dict[int, Tensor], members: Sequence[int] | None = None) -> Tensor:
        """The same N inputs at each input size of ``size_groups(members)`` (``images[s]``: uint8
        ``Tensor[N, 3, s, s]``) -> ``Tensor[N, K]``, the softmax averaged over ``members`` (default all), each on
        the inputs at its own size. With one size, exactly ``forward``."""
        groups = self.size_groups(members)
        if len(groups) == 1:
            size, chosen = groups[0]
            return self(images[size], chosen)
        total = sum(self(images[size], chosen) * len(chosen) for size, chosen in groups)  # a size weighs its members
        return total / sum(len(chosen) for _, chosen in groups)

    def size_groups(self, members: Sequence[int] | None = None) -> list[tuple[int, list[int]]]:
        """``members`` (indices, default all) grouped by input size: ``[(size, [member, ...]), ...]``, the sizes in
        the order of their first member."""
        if None in self.sizes:
            raise ValueError("the ensemble was made without its members' input sizes: pass size (from_bundle does)")
        groups: dict[int, list[int]] = {}
        for i in self._chosen(members):
            groups.setdefault(self.sizes[i], []).append(i)
        return list(groups.items())

    def _chosen(self, members: Sequence[int] | None) -> list[int]:
        chosen = list(range(len(self.members))) if members is None else list(members)
        if not chosen or any(not 0 <= i < len(self.members) for i in chosen):
            raise ValueError(f"members must be a non-empty list of indices in 0..{len(self.members) - 1}, got {chosen}")
        return chosen


def member_choices(members: Sequence[nn.Module], mean: tuple[float, ...], std: tuple[float, ...],
                   config: EnsembleConfig, size: int | Sequence[int | None] | None) -> list[Choice]:
    """How each member runs: as ``config`` says, or, for ``backend="auto"``, what ``choose_backend`` measured for
    its architecture at its input ``size`` (one for all members, or one per member; members of one architecture
    and size share the cached measurement)."""
    if config.backend != AUTO:
        return [Choice(config.backend, config.precision, config.channels_last)] * len(members)
    if config.precision == "int8":  # the calibrated models are ONNX: ONNX Runtime, the plain install's runtime
        return [Choice("onnxruntime", "int8", False, "int8 asked for: ONNX Runtime runs the calibrated models")] * len(
            members)
    sizes = per_member(size, len(members))
    if None in sizes:
        raise ValueError("backend auto measures the members at their input size: pass size (from_bundle does)")
    return [choose_backend(m, mean, std, s, config.precision, config.batch_size) for m, s in zip(members, sizes)]


def per_member(size: int | Sequence[int | None] | None, count: int) -> list[int | None]:
    """``size`` (one input side for all ``count`` members, one per member, or None: not known) as one per member."""
    sizes = [size] * count if size is None or isinstance(size, int) else list(size)
    if len(sizes) != count:
        raise ValueError(f"size gives {len(sizes)} input sizes for {count} members; give one per member")
    return sizes
