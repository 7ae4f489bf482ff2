"""The devkit's detection submission files: lines ``<image_index> <det_id> <confidence> <xmin> <ymin> <xmax>
<ymax>`` with devkit inclusive integer boxes (``eval.boxes``)."""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterable
from typing import TextIO

import numpy as np

from eval.boxes import MAX_COORD, check_box, from_devkit, to_devkit_ints
from eval.detections import DetectionTable, as_tables, text_output
from eval.parsing import MAX_IMAGE_INDEX, check_index, excerpt, line_batches, located, split_fields, whole_number

_SUBMISSION_LINE = "'<image_index> <det_id> <confidence> <xmin> <ymin> <xmax> <ymax>'"
_BATCH_CHARS = 8 << 20  # characters of lines parsed by one np.loadtxt call


def write_submission(out: str | os.PathLike | TextIO,
                     detections: DetectionTable | Iterable[DetectionTable]) -> int:
    """Write devkit submission lines ``<image_index> <det_id> <confidence> <xmin> <ymin> <xmax> <ymax>``.

    ``out`` is a path or an open text file; ``detections`` one table or tables written one after another
    (``as_tables``). Boxes become devkit inclusive integers exactly as ``eval.annotations.write_annotation`` writes
    ground truth; confidences are written in full (shortest round-trip repr) so that ties and order survive reading
    back. Returns the number of lines written.
    """
    rows = 0
    with text_output(out) as f:
        for table in as_tables(detections):
            ints = to_devkit_ints(table.boxes).tolist()
            f.writelines(f"{i} {c} {s!r} {b[0]} {b[1]} {b[2]} {b[3]}\n" for i, c, s, b in
                         zip(table.image.tolist(), table.det_id.tolist(), table.score.tolist(), ints))
            rows += len(table)
    return rows


def read_submission(path: str) -> DetectionTable:
    """Devkit submission lines -> ``DetectionTable`` (boxes ``x1 = xmin, x2 = xmax + 1``; float coordinates allowed,
    as the devkit reads them with ``%f``). Raises ValueError naming the file and line of a malformed line.

    The file is read in batches of lines (``line_batches``: lines of at most ``MAX_TEXT_LINE_CHARS``, files of at
    most ``MAX_LINES_FILE_BYTES``), each parsed by numpy's C parser, or line by line where that fails.
    """
    parts = [_parse_lines(path, first, lines)
             for first, lines in line_batches(path, "a devkit submission", _BATCH_CHARS)]
    table = np.concatenate(parts) if parts else np.zeros((0, 7))
    return DetectionTable(table[:, 0].astype(np.int64), table[:, 1].astype(np.int64), table[:, 2].copy(),
                          from_devkit(table[:, 3:]))


def _parse_lines(path: str, first: int, lines: list[str]) -> np.ndarray:
    """Lines ``first``, ``first + 1``, .. of a submission -> float64 array[N, 7]."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "input contained no data": blank lines are fine
            table = np.loadtxt(lines, dtype=np.float64, ndmin=2, comments=None)  # fast path, C parser
    except ValueError:
        table = None
    if table is not None and table.size == 0:
        return np.zeros((0, 7))
    if table is None or table.shape[1] != 7 or not _submission_ok(table):
        return _parse_lines_slowly(path, first, lines)  # finds the bad line and raises, naming it
    return table


def _submission_ok(table: np.ndarray) -> bool:
    ids = table[:, :2]
    coords = table[:, 3:]
    return bool((ids == np.floor(ids)).all() and ((table[:, 0] >= 1) & (table[:, 0] <= MAX_IMAGE_INDEX)).all()
                and ((table[:, 1] >= 1) & (table[:, 1] <= 200)).all() and np.isfinite(table[:, 2]).all()
                and (np.abs(coords) <= MAX_COORD).all())  # NaN fails every comparison


def _parse_lines_slowly(path: str, first: int, lines: list[str]) -> np.ndarray:
    rows = []
    for number, line in enumerate(lines, first):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        tokens = split_fields(line, 7, f"7 fields {_SUBMISSION_LINE}", where)
        with located(where):
            index, det_id = (whole_number(t, name) for t, name in zip(tokens[:2], ("image index", "DET id")))
            check_index(index)
            if not 1 <= det_id <= 200:
                raise ValueError(f"DET id {det_id} out of range 1..200")
            values = [_float(t) for t in tokens[2:]]
            _check_score(values[0])
            check_box(values[1:], "box")
        rows.append([index, det_id, *values])
    return np.array(rows, dtype=np.float64).reshape(-1, 7)


def _float(token: str) -> float:
    try:
        return float(token)
    except ValueError:
        raise ValueError(f"{excerpt(token)} is not a number") from None


def _check_score(v: float) -> None:
    if not math.isfinite(v):
        raise ValueError(f"score {v!r} is not a finite number")
