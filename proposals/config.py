"""The proposal stage's configurations: selective search, merging, and the two together (``ProposalConfig``).

Plain frozen dataclasses that import nothing heavy (no OpenCV, NumPy or torch), so that `ircnn` checks the flags
that make them before it loads anything: a value out of range is a usage error within a second.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

MODES = ("fast", "quality")  # selective search strategies (proposals.selective_search.KS)
MIN_WORK_SIDE = 32  # the working image is at least this many px along both axes (thin strips are stretched)


@dataclass(frozen=True)
class SelectiveSearchConfig:
    mode: str = "fast"  # "fast" (R-CNN's: 2 colour spaces x 2 k x 2 strategies) or "quality" (5 x 4 x 4)
    coarsen: float = 2.0  # the paper's change: every Felzenszwalb k and min size multiplied by this (R-CNN: 1.0)
    resize_width: int = 500  # R-CNN segments images resized to 500 px wide; boxes are mapped back
    min_side_resized: float = 20.0  # R-CNN's FilterBoxesWidth: drop boxes under 20 px wide or high at that scale
    min_side: float = 4.0  # and boxes under this many px wide or high in the original image
    seed: int = 0  # srand() seed for OpenCV's randomised ranking: same image, same config -> same order
    max_boxes: int | None = None  # keep the first (best-ranked) boxes only

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not 0.25 <= self.coarsen <= 16:  # below 0.25 the superpixel count (and OpenCV's n^2 matrix) explodes
            raise ValueError(f"coarsen must be in 0.25..16, got {self.coarsen}")
        if not MIN_WORK_SIDE <= self.resize_width <= 2000:
            raise ValueError(f"resize_width must be in {MIN_WORK_SIDE}..2000, got {self.resize_width}")
        for name in ("min_side_resized", "min_side"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be in 0..2**32-1 (C unsigned int), got {self.seed}")
        if self.max_boxes is not None and self.max_boxes < 0:
            raise ValueError(f"max_boxes must be None or >= 0, got {self.max_boxes}")


@dataclass(frozen=True)
class MergeConfig:
    dedup_iou: float = 0.9  # a box this close to a kept one adds nothing to coverage at IoU 0.5 or 0.7
    max_proposals: int = 3000  # R-CNN's fast mode gives about 2,000 per image; the cap only guards the networks

    def __post_init__(self) -> None:
        if not 0.0 < self.dedup_iou <= 1.0:
            raise ValueError(f"dedup_iou must be in (0, 1], got {self.dedup_iou}")
        if not 1 <= self.max_proposals <= 100_000:
            raise ValueError(f"max_proposals must be in 1..100000, got {self.max_proposals}")


@dataclass(frozen=True)
class ProposalConfig:
    """Where one image's proposals come from (section 8): what the detector, `ircnn detect` and `ircnn proposals`
    build their ``ProposalGenerator`` from (``ProposalGenerator.from_config``)."""

    selective_search: bool = True  # selective search boxes (in a worker process, ``SelectiveSearchRunner``)
    search: SelectiveSearchConfig = field(default_factory=SelectiveSearchConfig)  # its mode and 2x coarsening
    multibox: bool = True  # the MultiBox network's boxes, when there is a network (a bundle's ``multibox``)
    multibox_top: int | None = None  # the N most confident MultiBox boxes only; None: all K (the paper's 200)
    merge: MergeConfig = field(default_factory=MergeConfig)  # de-duplication and the per-image cap

    def __post_init__(self) -> None:
        if self.multibox_top is not None and self.multibox_top < 1:
            raise ValueError(f"multibox_top must be None or >= 1, got {self.multibox_top}")
