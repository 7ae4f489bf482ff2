"""COCO files: ground-truth JSON (``images``, ``annotations``, ``categories``) and results lists
``{"image_id", "category_id", "bbox", "score"}``, with ``bbox`` ``[x, y, w, h]`` (``eval.boxes``), image ids the
imageset indices and category ids the DET ids 1..200."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import TextIO

import numpy as np

from eval.annotations import ImageAnnotation, ImageLookup
from eval.boxes import MAX_COORD, check_box, from_xywh, to_xywh
from eval.classes import det200
from eval.detections import DetectionTable, as_tables, text_output
from eval.parsing import excerpt, json_det_id, json_index, json_int, json_score, load_json, located


def coco_categories() -> list[dict]:
    """The 200 DET classes as COCO ``categories``: ``{"id": DET id, "name", "wnid"}``."""
    vocab = det200()
    return [{"id": i, "name": n, "wnid": w} for i, n, w in zip(vocab.ids, vocab.names, vocab.wnids)]


def write_coco_gt(path: str, annotations: dict[int, ImageAnnotation]) -> None:
    """COCO ground-truth JSON: image ``id`` = imageset index, ``file_name`` = imageset name, ``category_id`` = DET
    id (all 200 categories listed), ``bbox`` xywh, ``area`` = w * h, ``iscrowd`` 0."""
    images, anns = [], []
    for index, a in annotations.items():
        images.append({"id": index, "file_name": a.name, "width": a.width, "height": a.height})
        for box, det_id in zip(to_xywh(a.boxes).tolist(), a.det_ids.tolist()):
            anns.append({"id": len(anns) + 1, "image_id": index, "category_id": det_id, "bbox": box,
                         "area": box[2] * box[3], "iscrowd": 0})
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"images": images, "annotations": anns, "categories": coco_categories()}, f)


def read_coco_gt(path: str) -> tuple[dict[str, int], dict[int, ImageAnnotation]]:
    """COCO ground-truth JSON (as ``write_coco_gt`` writes it) -> (imageset {file_name: id}, {id: annotation}).

    Image ids are the imageset indices; category ids must be DET ids 1..200; crowd annotations are refused
    (ILSVRC has none).
    """
    doc = load_json(path, "a COCO ground-truth file")
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list) \
            or not isinstance(doc.get("annotations"), list):
        raise ValueError(f"{path}: a COCO ground-truth file is an object with lists 'images' and 'annotations'")
    imageset: dict[str, int] = {}
    sizes: dict[int, tuple[str, int, int]] = {}
    for k, image in enumerate(doc["images"]):
        where = f"{path}: images[{k}]"
        if not isinstance(image, dict):
            raise ValueError(f"{where}: expected an object, got {excerpt(image)}")
        index = json_index(image.get("id"), "id", where)
        if index in sizes:
            raise ValueError(f"{where}: id {index} is not a new positive integer")
        name = image.get("file_name", str(index))
        if not isinstance(name, str) or name in imageset:
            raise ValueError(f"{where}: file_name {excerpt(name)} is not a new string")
        imageset[name] = index
        width, height = (json_int(image.get(k, 0), k, where) for k in ("width", "height"))
        if not (0 <= width <= MAX_COORD and 0 <= height <= MAX_COORD):
            raise ValueError(f"{where}: width and height must be within 0..{MAX_COORD:g}, got {width} x {height}")
        sizes[index] = (name, width, height)
    boxes: dict[int, list] = {i: [] for i in sizes}
    det_ids: dict[int, list] = {i: [] for i in sizes}
    for k, ann in enumerate(doc["annotations"]):
        where = f"{path}: annotations[{k}]"
        if not isinstance(ann, dict):
            raise ValueError(f"{where}: expected an object, got {excerpt(ann)}")
        index = json_index(ann.get("image_id"), "image_id", where)
        if index not in sizes:
            raise ValueError(f"{where}: image_id {index} is not in 'images'")
        if ann.get("iscrowd", 0):
            raise ValueError(f"{where}: crowd annotations (iscrowd 1) are not supported")
        det_ids[index].append(json_det_id(ann.get("category_id"), where))
        boxes[index].append(_json_xywh(ann.get("bbox"), where))
    annotations = {}
    for index, (name, width, height) in sizes.items():
        xywh = np.array(boxes[index], dtype=np.float64).reshape(-1, 4)
        annotations[index] = ImageAnnotation(name, width, height, from_xywh(xywh),
                                             np.array(det_ids[index], dtype=np.int64))
    return imageset, annotations


def write_coco_results(out: str | os.PathLike | TextIO,
                       detections: DetectionTable | Iterable[DetectionTable]) -> int:
    """COCO results JSON list ``{"image_id": imageset index, "category_id": DET id, "bbox": xywh, "score"}``.

    ``out`` is a path or an open text file; ``detections`` one table or tables written one after another
    (``as_tables``). The list is written as ``[entry,entry,...]`` and a newline, one ``json.dumps`` per entry, so
    that it streams. Returns the number of entries written.
    """
    rows = 0
    with text_output(out) as f:
        f.write("[")
        for table in as_tables(detections):
            if not len(table):
                continue
            f.write(("," if rows else "") + ",".join(
                json.dumps({"image_id": i, "category_id": c, "bbox": b, "score": s}) for i, c, b, s in
                zip(table.image.tolist(), table.det_id.tolist(), to_xywh(table.boxes).tolist(),
                    table.score.tolist())))
            rows += len(table)
        f.write("]\n")
    return rows


def read_coco_results(path: str, lookup: ImageLookup) -> DetectionTable:
    """COCO results JSON list -> ``DetectionTable``.

    ``image_id`` is an imageset index when it is an integer (as ``write_coco_gt``/``write_coco_results`` number
    images), or an image name or path looked up by ``lookup`` when it is a string (-1 if not in the imageset).
    """
    doc = load_json(path, "a COCO results file", "write the detections as JSON lines (`ircnn detect --format "
                    "jsonl`) or devkit submission lines instead, which are read line by line")
    if not isinstance(doc, list):
        raise ValueError(f"{path}: a COCO results file is a JSON list of "
                         "{'image_id', 'category_id', 'bbox', 'score'} objects")
    image, det_id, score, xywh = [], [], [], []
    for k, r in enumerate(doc):
        where = f"{path}: entry {k}"
        if not isinstance(r, dict):
            raise ValueError(f"{where}: expected an object, got {excerpt(r)}")
        image_id = r.get("image_id")
        if isinstance(image_id, str):
            with located(where):
                image.append(lookup(image_id))
        else:
            image.append(json_index(image_id, "image_id", where))
        det_id.append(json_det_id(r.get("category_id"), where))
        xywh.append(_json_xywh(r.get("bbox"), where, allow_negative=True))
        score.append(json_score(r.get("score"), where))
    return DetectionTable(np.array(image, dtype=np.int64), np.array(det_id, dtype=np.int64),
                          np.array(score, dtype=np.float64), from_xywh(np.array(xywh, dtype=np.float64).reshape(-1, 4)))


def _json_xywh(value, where: str, allow_negative: bool = False) -> list[float]:
    if not (isinstance(value, list) and len(value) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
        raise ValueError(f"{where}: 'bbox' must be a list [x, y, w, h] of 4 numbers, got {excerpt(value)}")
    check_box(value, f"{where}: bbox box")
    if not allow_negative and (value[2] < 0 or value[3] < 0):
        raise ValueError(f"{where}: bbox {value} has a negative width or height")
    return [float(v) for v in value]
