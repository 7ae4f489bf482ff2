"""How well proposals cover ground-truth objects: the figures of R-CNN and of the paper's section 8.

Pure functions plus an accumulator (``reset`` / ``process`` / ``evaluate``). Per mode (a name such as "SS 2x"):
mean proposals per image, coverage (the fraction of ground-truth objects with a proposal at IoU >= 0.5, the
paper's "coverage"), recall at IoU 0.7, average best overlap (ABO, Uijlings et al.), seconds per image, and
recall at IoU 0.5 of the first n proposals for a grid of n (the proposals' own order).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import box_iou

CURVE_POINTS = (10, 20, 50, 100, 200, 300, 500, 700, 1000, 1500, 2000, 3000, 5000)


def best_overlaps(proposals: Tensor, gt: Tensor, points: tuple[int, ...] = CURVE_POINTS) -> tuple[Tensor, Tensor]:
    """Best IoU of each ground-truth box: over all ``proposals (Tensor[N, 4])``, ``Tensor[M]``; and over the
    first n proposals for each n in ``points``, ``Tensor[len(points), M]``. Zero where there is no proposal."""
    m = len(gt)
    if m == 0 or len(proposals) == 0:
        return torch.zeros(m), torch.zeros(len(points), m)
    running = box_iou(proposals.float(), gt.float()).cummax(dim=0).values  # [N, M]: best among the first n
    at = torch.tensor([min(n, len(proposals)) - 1 for n in points])
    return running[-1], running[at]


class CoverageEvaluator:
    """Accumulates proposals against ground truth per mode; ``evaluate()`` gives one dict per mode."""

    def __init__(self, points: tuple[int, ...] = CURVE_POINTS) -> None:
        self.points = points
        self.reset()

    def reset(self) -> None:
        self._best: dict[str, list[Tensor]] = defaultdict(list)
        self._curve: dict[str, list[Tensor]] = defaultdict(list)
        self._counts: dict[str, list[int]] = defaultdict(list)
        self._seconds: dict[str, list[float]] = defaultdict(list)

    def process(self, mode: str, proposals: Tensor, gt: Tensor, seconds: float) -> None:
        """One image: ``proposals (Tensor[N, 4])`` in their ranked order, ``gt (Tensor[M, 4])``."""
        best, curve = best_overlaps(proposals, gt, self.points)
        self._best[mode].append(best)
        self._curve[mode].append(curve)
        self._counts[mode].append(len(proposals))
        self._seconds[mode].append(seconds)

    def evaluate(self) -> list[dict]:
        out = []
        for mode in self._best:
            best = torch.cat(self._best[mode])
            curve = torch.cat(self._curve[mode], dim=1)  # [len(points), objects]
            counts = np.array(self._counts[mode])
            objects = len(best)
            out.append({
                "mode": mode,
                "images": len(counts),
                "objects": objects,
                "proposals_per_image": float(counts.mean()) if len(counts) else 0.0,
                "coverage": float((best >= 0.5).float().mean()) if objects else None,
                "recall_0.7": float((best >= 0.7).float().mean()) if objects else None,
                "abo": float(best.mean()) if objects else None,
                "seconds_per_image": float(np.mean(self._seconds[mode])) if counts.size else 0.0,
                "recall_curve": [{"proposals": n, "recall_0.5": float((row >= 0.5).float().mean()) if objects else None}
                                 for n, row in zip(self.points, curve) if n <= max(counts.max(initial=0), 1)],
            })
        return out


def plot_recall_curves(results: list[dict], path: str) -> None:
    """Recall at IoU 0.5 against the number of proposals, one line per mode, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    for row in results:
        xs = [p["proposals"] for p in row["recall_curve"]]
        ys = [p["recall_0.5"] for p in row["recall_curve"]]
        ax.plot(xs, ys, marker="o", markersize=3,
                label=f"{row['mode']} ({row['proposals_per_image']:.0f}/image, coverage {row['coverage']:.3f})")
    ax.set_xscale("log")
    ax.set_xlabel("proposals per image (first n)")
    ax.set_ylabel("recall at IoU 0.5")
    ax.set_ylim(0, 1.01)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
