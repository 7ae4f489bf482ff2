"""``DetectionTable``: the detections of many images in flat arrays, as every predictions reader returns them and
every writer takes them (``eval.submission``, ``eval.coco``, ``eval.records``) and ``eval.ilsvrc`` scores them."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TextIO

import numpy as np


@dataclass
class DetectionTable:
    """Detections of many images in flat arrays (one row per detection).

    ``image (int64 array[D])`` is the 1-based imageset index, ``det_id (int64 array[D])`` the DET class 1..200,
    ``score (float64 array[D])``, ``boxes (float64 array[D, 4])`` x1, y1, x2, y2.
    """

    image: np.ndarray
    det_id: np.ndarray
    score: np.ndarray
    boxes: np.ndarray

    def __len__(self) -> int:
        return len(self.image)

    @staticmethod
    def empty() -> DetectionTable:
        return DetectionTable(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0), np.zeros((0, 4)))

    @staticmethod
    def concat(parts: Iterable[DetectionTable]) -> DetectionTable:
        parts = list(parts)
        if not parts:
            return DetectionTable.empty()
        return DetectionTable(*(np.concatenate([getattr(p, f) for p in parts]) for f in
                                ("image", "det_id", "score", "boxes")))


# ---- for the writers -------------------------------------------------------------------------------------


def as_tables(detections: DetectionTable | Iterable[DetectionTable]) -> Iterable[DetectionTable]:
    """One table, or tables that a writer writes one after another (a run over millions of images hands them
    over an image at a time and never holds them all)."""
    return (detections,) if isinstance(detections, DetectionTable) else detections


@contextmanager
def text_output(out: str | os.PathLike | TextIO) -> Iterator[TextIO]:
    """An open text file: ``out`` itself, or the file at path ``out`` opened for writing (and closed after)."""
    if isinstance(out, (str, os.PathLike)):
        with open(out, "w", encoding="utf-8") as f:
            yield f
    else:
        yield out
