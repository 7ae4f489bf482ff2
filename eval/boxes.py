"""The box conventions of the files eval reads and writes, and the conversions between them.

Boxes inside the code follow the project convention: float ``x1, y1, x2, y2`` in absolute pixels, width
``x2 - x1``, no ``+1``. The devkit's files hold integer *inclusive* pixel indices ``xmin..xmax`` (a one-pixel-wide
box has ``xmin == xmax``, devkit width ``xmax - xmin + 1``). The two meet at pixel edges:

    reading   x1 = xmin        x2 = xmax + 1         (exact; floats in a submission are kept as they are)
    writing   xmin = round(x1) xmax = round(x2) - 1  (round half up, ``floor(v + 0.5)``)

so a pixel-aligned box survives a write/read round trip exactly, the devkit width ``xmax - xmin + 1`` equals our
width ``x2 - x1``, and the same boxes written with ``eval.annotations.write_annotation`` and
``eval.submission.write_submission`` come back identical. COCO ``bbox`` is ``[x, y, w, h]`` with ``x = x1,
w = x2 - x1`` (no rounding, no ``+1``).
"""

from __future__ import annotations

import numpy as np

from eval.parsing import excerpt

# Coordinates beyond this many pixels are refused as corrupt input (the largest ILSVRC images are ~5000 px).
MAX_COORD = 1e6


def to_devkit_ints(boxes: np.ndarray) -> np.ndarray:
    """Project boxes -> devkit inclusive integer pixels, as files are written (see the module docstring).

    Args:
        boxes (float array[N, 4]): x1, y1, x2, y2.
    Returns:
        int64 array[N, 4]: xmin, ymin, xmax, ymax with ``xmin = round(x1)``, ``xmax = round(x2) - 1``.
    """
    ints = np.floor(np.asarray(boxes, dtype=np.float64).reshape(-1, 4) + 0.5).astype(np.int64)  # [N, 4]
    ints[:, 2:] -= 1
    return ints


def from_devkit(coords: np.ndarray) -> np.ndarray:
    """Devkit inclusive pixels ``xmin, ymin, xmax, ymax`` (float array[N, 4]) -> project x1, y1, x2, y2."""
    boxes = np.asarray(coords, dtype=np.float64).reshape(-1, 4).copy()
    boxes[:, 2:] += 1
    return boxes


def to_xywh(boxes: np.ndarray) -> np.ndarray:
    """x1, y1, x2, y2 (float array[N, 4]) -> COCO x, y, w, h (float array[N, 4])."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)


def from_xywh(xywh: np.ndarray) -> np.ndarray:
    """COCO x, y, w, h (float array[N, 4]) -> x1, y1, x2, y2 (float array[N, 4])."""
    return np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)


def check_box(values, what: str) -> None:
    """Refuse NaN, infinite and absurd coordinates: ValueError ``"<what> coordinate <v> is not ..."``."""
    for v in values:
        if not abs(v) <= MAX_COORD:  # also NaN and inf; a JSON integer of any size compares without overflow
            raise ValueError(f"{what} coordinate {excerpt(v)} is not a finite number within +-{MAX_COORD:g} pixels")
