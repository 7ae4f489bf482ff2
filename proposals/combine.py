"""The paper's proposals (section 8): coarsened selective search plus the 200 boxes of MultiBox, merged.

"the selective search approach was combined with multi-box predictions for higher object bounding box recall ...
the super-pixel size was increased by 2x ... adding back 200 region proposals coming from multi-box resulting, in
total, in about 60% of the proposals used by R-CNN, while increasing the coverage from 92% to 93%."

Merging keeps MultiBox's boxes first (in confidence order), then selective search's (in its rank order), and drops
a box whose IoU with an already kept box is above ``dedup_iou``: greedy NMS with priority in place of score.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import nms

from proposals.config import MergeConfig, ProposalConfig
from proposals.selective_search import SelectiveSearchRunner

SELECTIVE_SEARCH, MULTIBOX = 0, 1
SOURCE_NAMES = ("selective_search", "multibox")


@dataclass
class Proposals:
    """``boxes (Tensor[N, 4])`` x1, y1, x2, y2 in original pixels; ``source (Tensor[N] int64)`` 0 = selective
    search, 1 = MultiBox; ``scores (Tensor[N])`` MultiBox confidence, NaN for selective search."""

    boxes: Tensor
    source: Tensor
    scores: Tensor

    def __len__(self) -> int:
        return len(self.boxes)

    @staticmethod
    def from_selective_search(boxes: np.ndarray | Tensor) -> Proposals:
        boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        n = len(boxes)
        return Proposals(boxes, torch.full((n,), SELECTIVE_SEARCH), torch.full((n,), float("nan")))

    @staticmethod
    def from_multibox(boxes: Tensor, scores: Tensor) -> Proposals:
        boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        return Proposals(boxes, torch.full((len(boxes),), MULTIBOX), torch.as_tensor(scores, dtype=torch.float32))

    def to_json(self) -> list[dict]:
        return [{"box": [round(v, 2) for v in b], "source": SOURCE_NAMES[s],
                 "score": None if np.isnan(c) else round(c, 6)}
                for b, s, c in zip(self.boxes.tolist(), self.source.tolist(), self.scores.tolist())]


def merge(parts: list[Proposals], config: MergeConfig = MergeConfig()) -> Proposals:
    """Concatenate in priority order (earlier parts and earlier boxes first), then drop near-duplicates and cap."""
    parts = [p for p in parts if len(p)]
    if not parts:
        return Proposals(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), torch.zeros(0))
    boxes = torch.cat([p.boxes for p in parts])
    source = torch.cat([p.source for p in parts])
    scores = torch.cat([p.scores for p in parts])
    priority = torch.arange(len(boxes), 0, -1, dtype=torch.float32)  # descending: the first box wins
    keep = nms(boxes, priority, config.dedup_iou)  # sorted by priority, i.e. in input order
    keep = keep[: config.max_proposals]
    return Proposals(boxes[keep], source[keep], scores[keep])


class ProposalGenerator:
    """The paper's proposal step for one image: selective search and MultiBox, merged.

    ``selective_search``: a callable ``uint8 [H, W, 3] -> float32 [N, 4]`` (a ``SelectiveSearchRunner``, which
    runs OpenCV in a worker process) or None; ``multibox``: a ``MultiBox`` network or None. ``__call__`` returns
    the merged ``Proposals`` and the seconds each source took.
    """

    def __init__(self, selective_search=None, multibox=None, config: MergeConfig = MergeConfig(),
                 multibox_top: int | None = None) -> None:
        if selective_search is None and multibox is None:
            raise ValueError("no proposal source: enable selective search or MultiBox")
        self.selective_search = selective_search
        self.multibox = multibox
        self.config = config
        self.multibox_top = multibox_top  # None: every box the network predicts

    @classmethod
    def from_config(cls, config: ProposalConfig = ProposalConfig(), multibox=None) -> ProposalGenerator:
        """The generator ``config`` describes, over ``multibox`` (a ``MultiBox`` network, or None for none). Starts
        the selective search worker process when selective search is on; ``close()`` stops it."""
        multibox = multibox if config.multibox else None
        if not config.selective_search and multibox is None:
            raise ValueError("no proposal source: selective search is off and there is no MultiBox network")
        runner = SelectiveSearchRunner(config.search) if config.selective_search else None
        return cls(runner, multibox, config.merge, config.multibox_top)

    def parts(self, image: np.ndarray) -> tuple[dict[str, Proposals], dict[str, float]]:
        """Each source's proposals before merging, in priority order (``multibox``, ``selective_search``), and the
        seconds each took."""
        parts, seconds = {}, {}
        if self.multibox is not None:
            start = time.perf_counter()
            (boxes, scores), = self.multibox.propose([image])
            parts["multibox"] = Proposals.from_multibox(boxes[: self.multibox_top], scores[: self.multibox_top])
            seconds["multibox"] = time.perf_counter() - start
        if self.selective_search is not None:
            start = time.perf_counter()
            parts["selective_search"] = Proposals.from_selective_search(self.selective_search(image))
            seconds["selective_search"] = time.perf_counter() - start
        return parts, seconds

    def __call__(self, image: np.ndarray) -> tuple[Proposals, dict[str, float]]:
        parts, seconds = self.parts(image)
        return merge(list(parts.values()), self.config), seconds

    def close(self) -> None:
        """Stop the selective search worker process, if this generator runs one."""
        if hasattr(self.selective_search, "close"):
            self.selective_search.close()

    def __enter__(self) -> ProposalGenerator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
