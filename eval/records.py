"""Our detection JSON lines, the ``ircnn detect --format jsonl`` records (and the ``detect`` document of the CLI
and the HTTP API), built, written and read here only::

    {"image": path, "width": W, "height": H,
     "detections": [{"box": [x1, y1, x2, y2], "det_id": 26, "wnid": "...", "name": "bird", "score": 0.9}, ...]}
    {"image": path, "error": "message"}

Boxes are in the project convention (``eval.boxes``), rounded to 0.01 px; scores to 6 decimals.
"""

from __future__ import annotations

import json
from typing import TextIO

import numpy as np

from eval.annotations import ImageLookup
from eval.boxes import check_box
from eval.classes import det200
from eval.detections import DetectionTable
from eval.parsing import excerpt, json_det_id, json_lines, json_score, located, parse_json


def detections_json(boxes, scores, det_ids) -> list[dict]:
    """``[{"box": [x1, y1, x2, y2], "det_id", "wnid", "name", "score"}, ...]``, one entry per row, in order.

    Args:
        boxes (float array[D, 4]): x1, y1, x2, y2 in pixels; a list, a numpy array or a CPU tensor.
        scores (float array[D]).
        det_ids (int array[D]): DET ids 1..200.
    Raises ValueError for arrays of other shapes or lengths, or a DET id outside 1..200.
    """
    boxes = np.asarray(boxes, dtype=np.float64)
    scores, det_ids = np.asarray(scores, dtype=np.float64), np.asarray(det_ids)
    if boxes.size == 0:
        boxes = boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4 or scores.shape != (len(boxes),) or det_ids.shape != (len(boxes),):
        raise ValueError(f"boxes [D, 4], scores [D] and det_ids [D] must agree, got shapes {boxes.shape}, "
                         f"{scores.shape} and {det_ids.shape}")
    vocab = det200()
    out = []
    for box, det_id, score in zip(boxes.tolist(), det_ids.tolist(), scores.tolist()):
        if det_id not in vocab.row_of_id:
            raise ValueError(f"DET id {det_id!r} is not one of 1..200")
        row = vocab.row_of_id[det_id]
        out.append({"box": [round(v, 2) for v in box], "det_id": det_id, "wnid": vocab.wnids[row],
                    "name": vocab.names[row], "score": round(score, 6)})
    return out


def detection_record(image: str, width: int, height: int, boxes, scores, det_ids) -> dict:
    """The record of one image: ``{"image", "width", "height", "detections": detections_json(...)}``."""
    return {"image": str(image), "width": int(width), "height": int(height),
            "detections": detections_json(boxes, scores, det_ids)}


def error_record(image, error: Exception | str) -> dict:
    """The record of an image that could not be used: ``{"image", "error": message}``."""
    return {"image": str(image), "error": str(error)}


def write_record(f: TextIO, record: dict) -> None:
    """Append one record to an open JSON-lines file: ``json.dumps(record)`` and a newline."""
    f.write(json.dumps(record) + "\n")


def record_table(record: dict, index: int, where: str) -> DetectionTable:
    """The detections of one record with a list ``detections`` as a table, all of image ``index``; checked as
    ``read_jsonl_detections`` checks them (ValueError naming ``where`` and the detection)."""
    det_id, score, boxes = _record_rows(record, where)
    return DetectionTable(np.full(len(det_id), index, dtype=np.int64), np.array(det_id, dtype=np.int64),
                          np.array(score, dtype=np.float64), np.array(boxes, dtype=np.float64).reshape(-1, 4))


def read_jsonl_detections(path: str, lookup: ImageLookup) -> tuple[DetectionTable, list[str]]:
    """``ircnn detect --format jsonl`` output -> (``DetectionTable``, images of error lines).

    Each line is a record (module docstring; ``det_id`` or ``wnid`` is enough, both must agree); an error record
    is an image with no detections. Images are found with ``lookup`` (-1 if not in the imageset).
    """
    image, det_id, score, boxes = [], [], [], []
    failed = []
    for number, line in json_lines(path, "a detections JSON-lines file"):
        where = f"{path}:{number}"
        try:
            doc = parse_json(line, where)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("image"), str):
            raise ValueError(f"{where}: a detections line needs a string field 'image'")
        if "error" in doc:
            failed.append(doc["image"])
            continue
        if not isinstance(doc.get("detections"), list):
            raise ValueError(f"{where}: a detections line needs a list 'detections' (or an 'error')")
        with located(where):
            index = lookup(doc["image"])
        ids, scores, coords = _record_rows(doc, where)
        image += [index] * len(ids)
        det_id += ids
        score += scores
        boxes += coords
    return DetectionTable(np.array(image, dtype=np.int64), np.array(det_id, dtype=np.int64),
                          np.array(score, dtype=np.float64), np.array(boxes, dtype=np.float64).reshape(-1, 4)), failed


def _record_rows(record: dict, where: str) -> tuple[list[int], list[float], list[list]]:
    """(DET ids, scores, boxes) of a record's ``detections``, each checked."""
    vocab = det200()
    det_id, score, boxes = [], [], []
    for k, d in enumerate(record["detections"]):
        what = f"{where}: detection {k}"
        if not isinstance(d, dict):
            raise ValueError(f"{what}: expected an object, got {excerpt(d)}")
        box = d.get("box")
        if not (isinstance(box, list) and len(box) == 4
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)):
            raise ValueError(f"{what}: 'box' must be a list [x1, y1, x2, y2] of 4 numbers, got {excerpt(box)}")
        check_box(box, f"{what}: box")
        det_id.append(_record_class(d, vocab, what))
        score.append(json_score(d.get("score"), what))
        boxes.append(box)
    return det_id, score, boxes


def _record_class(d: dict, vocab, what: str) -> int:
    det_id, wnid = d.get("det_id"), d.get("wnid")
    if det_id is None and wnid is None:
        raise ValueError(f"{what}: needs a 'det_id' or a 'wnid'")
    if det_id is not None:
        det_id = json_det_id(det_id, what)
    if wnid is not None:
        if not isinstance(wnid, str) or wnid not in vocab.row_of_wnid:
            raise ValueError(f"{what}: 'wnid' {excerpt(wnid)} is not one of the 200 ILSVRC DET classes")
        by_wnid = vocab.ids[vocab.row_of_wnid[wnid]]
        if det_id is not None and det_id != by_wnid:
            raise ValueError(f"{what}: det_id {det_id} is {vocab.wnids[vocab.row_of_id[det_id]]}, not {wnid}")
        det_id = by_wnid
    return det_id
