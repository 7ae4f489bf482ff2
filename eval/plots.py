"""Precision-recall curves and a per-class AP bar chart of a detection result, as PNG (matplotlib, Agg backend)."""

from __future__ import annotations

import math
import os

from eval.ilsvrc import DetectionResult


def write_plots(result: DetectionResult, out_dir: str) -> list[str]:
    """Write ``pr_curves.png`` (one small panel per class with positives) and ``ap_per_class.png`` (classes sorted
    by AP) into ``out_dir``; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    scored = [c for c in result.classes if c.ap is not None]
    title = f"{result.mode}: mAP {100 * result.map:.2f}% over {len(scored)} classes"

    cols = min(10, len(scored))
    rows = math.ceil(len(scored) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.8 * cols, 1.6 * rows + 0.6), sharex=True, sharey=True,
                             squeeze=False)
    for ax in axes.flat[len(scored):]:
        ax.axis("off")
    for ax, c in zip(axes.flat, scored):
        ax.plot(c.recall, c.precision, lw=1)
        ax.set_title(f"{c.name[:18]} {100 * c.ap:.1f}", fontsize=6)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.tick_params(labelsize=5)
    fig.suptitle(f"precision (y) vs recall (x) -- {title}", fontsize=8)
    fig.tight_layout()
    pr_path = os.path.join(out_dir, "pr_curves.png")
    fig.savefig(pr_path, dpi=100)
    plt.close(fig)

    ranked = sorted(scored, key=lambda c: c.ap)
    fig, ax = plt.subplots(figsize=(6, 0.14 * len(ranked) + 1.2))
    ax.barh(range(len(ranked)), [100 * c.ap for c in ranked], height=0.8)
    ax.set_yticks(range(len(ranked)), [f"{c.name} ({c.det_id})" for c in ranked], fontsize=5)
    ax.axvline(100 * result.map, color="k", lw=0.8, ls="--", label="mAP")
    ax.set_xlim(0, 100)
    ax.set_xlabel("AP (%)")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    bar_path = os.path.join(out_dir, "ap_per_class.png")
    fig.savefig(bar_path, dpi=100)
    plt.close(fig)
    return [pr_path, bar_path]
