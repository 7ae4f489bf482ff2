"""Readers and writers of the ILSVRC detection files (annotations, image sets, blacklists, submissions), COCO
ground truth / results JSON, and our own detection JSON lines.

Boxes inside the code follow the project convention: float ``x1, y1, x2, y2`` in absolute pixels, width
``x2 - x1``, no ``+1``. The devkit's files hold integer *inclusive* pixel indices ``xmin..xmax`` (a one-pixel-wide
box has ``xmin == xmax``, devkit width ``xmax - xmin + 1``). The two meet at pixel edges:

    reading   x1 = xmin        x2 = xmax + 1         (exact; floats in a submission are kept as they are)
    writing   xmin = round(x1) xmax = round(x2) - 1  (round half up, ``floor(v + 0.5)``)

so a pixel-aligned box survives a write/read round trip exactly, the devkit width ``xmax - xmin + 1`` equals our
width ``x2 - x1``, and the same boxes written with ``write_annotation`` and ``write_submission`` come back
identical. COCO ``bbox`` is ``[x, y, w, h]`` with ``x = x1, w = x2 - x1`` (no rounding, no ``+1``).

Every reader raises ValueError naming the file, the line (or the JSON entry) and what is wrong: numbers are
checked for range (image indices 1..``MAX_IMAGE_INDEX``, DET ids 1..200, coordinates finite within
``MAX_COORD``, scores finite), and JSON for its nesting depth before it is parsed (``parse_json``).
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from eval.classes import det200

# Coordinates beyond this many pixels are refused as corrupt input (the largest ILSVRC images are ~5000 px).
MAX_COORD = 1e6
# Image indices (imagesets, blacklists, submissions, COCO ids) above this are refused: ILSVRC's largest set has
# about 500,000 images, and the devkit reads them as MATLAB int32.
MAX_IMAGE_INDEX = 2**31 - 1
# Deepest nesting of JSON arrays and objects read from a file (ours need 4); Python's parser recurses once per
# level, and a few thousand levels end in RecursionError instead of a message.
MAX_JSON_DEPTH = 32
MAX_XML_BYTES = 10 << 20  # an annotation file larger than this is refused unread

_WNID = re.compile(r"n\d{8}")


# ---- records ---------------------------------------------------------------------------------------------


@dataclass
class ImageAnnotation:
    """Ground truth of one image: ``boxes (float64 array[N, 4])`` x1, y1, x2, y2 and ``det_ids (int64 array[N])``."""

    name: str
    width: int
    height: int
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))
    det_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


@dataclass
class Detections:
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
    def empty() -> Detections:
        return Detections(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0), np.zeros((0, 4)))

    @staticmethod
    def concat(parts: Iterable[Detections]) -> Detections:
        parts = list(parts)
        if not parts:
            return Detections.empty()
        return Detections(*(np.concatenate([getattr(p, f) for p in parts]) for f in
                            ("image", "det_id", "score", "boxes")))


# ---- box conversion --------------------------------------------------------------------------------------


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


def _check_box(values, what: str) -> None:
    """Refuse NaN, infinite and absurd coordinates (raises ValueError without a location; callers add it)."""
    for v in values:
        if not math.isfinite(v) or abs(v) > MAX_COORD:
            raise ValueError(f"{what} coordinate {v!r} is not a finite number within +-{MAX_COORD:g} pixels")


def _check_score(v: float) -> None:
    if not math.isfinite(v):
        raise ValueError(f"score {v!r} is not a finite number")


def _check_index(index: int, name: str = "image index") -> None:
    if index < 1:
        raise ValueError(f"{name} {index} must be >= 1")
    if index > MAX_IMAGE_INDEX:
        raise ValueError(f"{name} {index:.6g} is more than {MAX_IMAGE_INDEX} (2^31 - 1)")


def _det_id_of(token: str) -> int:
    """A DET class given as WNID or DET id 1..200 -> DET id."""
    vocab = det200()
    if _WNID.fullmatch(token):
        if token not in vocab.row_of_wnid:
            raise ValueError(f"WNID {token!r} is not one of the 200 ILSVRC DET classes")
        return vocab.ids[vocab.row_of_wnid[token]]
    try:
        det_id = int(token)
    except ValueError:
        raise ValueError(f"{token!r} is neither a DET WNID nor a DET id 1..200") from None
    if det_id not in vocab.row_of_id:
        raise ValueError(f"DET id {det_id} out of range 1..200")
    return det_id


# ---- ILSVRC annotations and image sets -------------------------------------------------------------------


def write_annotation(path: str, *, folder: str, filename: str, width: int, height: int,
                     objects: list[tuple[str, tuple[float, float, float, float]]]) -> None:
    """Write one PASCAL VOC-style ILSVRC DET annotation XML.

    Args:
        folder, filename: the ``<folder>`` and ``<filename>`` fields (ILSVRC puts the image name without extension).
        width, height: image size in pixels.
        objects: ``(wnid, (x1, y1, x2, y2))`` per object, boxes in the project convention; written as devkit
            inclusive integers ``xmin = round(x1), xmax = round(x2) - 1`` (module docstring).
    Raises ValueError for an unknown WNID, a bad size, or a box that is empty after rounding.
    """
    if not (isinstance(width, (int, np.integer)) and isinstance(height, (int, np.integer)) and width > 0
            and height > 0):
        raise ValueError(f"{path}: image size must be positive integers, got {width!r} x {height!r}")
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = folder
    ET.SubElement(root, "filename").text = filename
    size = ET.SubElement(root, "size")
    ET.SubElement(size, "width").text = str(int(width))
    ET.SubElement(size, "height").text = str(int(height))
    for number, (wnid, box) in enumerate(objects, 1):
        if len(box) != 4:
            raise ValueError(f"{path}: object {number}: box must be (x1, y1, x2, y2), got {box!r}")
        if not (isinstance(wnid, str) and _WNID.fullmatch(wnid)):
            raise ValueError(f"{path}: object {number}: name {wnid!r} is not a WNID like 'n02672831'")
        try:
            _det_id_of(wnid)
        except ValueError as e:
            raise ValueError(f"{path}: object {number}: {e}") from None
        _check_box([float(v) for v in box], f"{path}: object {number}")
        xmin, ymin, xmax, ymax = (int(v) for v in to_devkit_ints(np.array(box, dtype=np.float64))[0])
        if xmax < xmin or ymax < ymin:
            raise ValueError(f"{path}: object {number} box {tuple(box)} is empty after rounding to whole pixels")
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = wnid
        bnd = ET.SubElement(obj, "bndbox")
        for tag, v in zip(("xmin", "ymin", "xmax", "ymax"), (xmin, ymin, xmax, ymax)):
            ET.SubElement(bnd, tag).text = str(v)
    tree = ET.ElementTree(root)
    ET.indent(tree, space="\t")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tree.write(path, encoding="utf-8", xml_declaration=False)


def write_imageset(path: str, names: list[str]) -> None:
    """Write ``ImageSets/DET/val.txt``-style lines ``<image name> <index>``, index 1-based in list order."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for index, name in enumerate(names, 1):
            if not name or any(c.isspace() for c in name):
                raise ValueError(f"{path}: image name {name!r} is empty or contains whitespace")
            f.write(f"{name} {index}\n")


def read_imageset(path: str) -> dict[str, int]:
    """``ImageSets/DET/*.txt`` lines ``<image name> <index>`` -> {name: index}, in file order.

    Raises ValueError naming the file and line for a malformed line, a repeated name or index, or an empty file.
    """
    names: dict[str, int] = {}
    where_of_index: dict[int, str] = {}
    for number, line in numbered_lines(path):
        where = f"{path}:{number}"
        tokens = line.split()
        if len(tokens) != 2:
            raise ValueError(f"{where}: expected '<image name> <index>', got {line!r}")
        try:
            index = int(tokens[1])
        except ValueError:
            raise ValueError(f"{where}: image index {tokens[1]!r} is not an integer") from None
        try:
            _check_index(index)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        if tokens[0] in names:
            raise ValueError(f"{where}: image {tokens[0]!r} listed twice")
        if index in where_of_index:
            raise ValueError(f"{where}: image index {index} already used at {where_of_index[index]}")
        names[tokens[0]] = index
        where_of_index[index] = where
    if not names:
        raise ValueError(f"{path}: no images listed (expected '<image name> <index>' lines)")
    return names


def read_annotation(path: str) -> ImageAnnotation:
    """One ILSVRC DET XML file -> ``ImageAnnotation`` with boxes ``x1 = xmin, x2 = xmax + 1`` (module docstring).

    Raises ValueError naming the file (and the object number) for unparsable XML, a missing field, a WNID that is
    not a DET class, or a box with ``xmax < xmin``.
    """
    with open(path, "rb") as f:
        data = f.read(MAX_XML_BYTES + 1)
    if len(data) > MAX_XML_BYTES:
        raise ValueError(f"{path}: over {MAX_XML_BYTES >> 20} MB; an ILSVRC annotation is a few KB")
    # ILSVRC annotations are plain ASCII XML without a DTD. Refusing DTDs outright (rather than relying on the
    # system expat's entity-amplification limit) closes entity bombs and external entities whatever expat is
    # installed; refusing NUL bytes closes the same declarations spelt in UTF-16.
    if b"<!DOCTYPE" in data or b"<!ENTITY" in data or b"\x00" in data:
        raise ValueError(f"{path}: has a DOCTYPE or ENTITY declaration (or is not UTF-8); ILSVRC annotations have "
                         "none, and entity expansion is refused")
    try:
        root = ET.fromstring(data)
    except ET.ParseError as e:
        raise ValueError(f"{path}: not well-formed XML ({e})") from None
    if root.tag != "annotation":
        raise ValueError(f"{path}: root element is <{root.tag}>, expected <annotation>")
    name = os.path.splitext((root.findtext("filename") or "").strip() or os.path.basename(path))[0]
    width = _int_field(root, "size/width", path, "")
    height = _int_field(root, "size/height", path, "")
    if not (0 <= width <= MAX_COORD and 0 <= height <= MAX_COORD):
        raise ValueError(f"{path}: image size {width} x {height} is not within 0..{MAX_COORD:g} pixels")
    boxes, det_ids = [], []
    for number, obj in enumerate(root.iter("object"), 1):
        what = f"object {number}: "
        try:
            det_ids.append(_det_id_of(_text(obj, "name", path, what)))
        except ValueError as e:
            raise ValueError(f"{path}: {what}{e}") from None
        coords = [_int_field(obj, f"bndbox/{tag}", path, what) for tag in ("xmin", "ymin", "xmax", "ymax")]
        _check_box_at(coords, f"{path}: {what}")
        if coords[2] < coords[0] or coords[3] < coords[1]:
            raise ValueError(f"{path}: {what}box xmin, ymin, xmax, ymax = {coords} has xmax < xmin or ymax < ymin")
        boxes.append(coords)
    return ImageAnnotation(name, width, height, from_devkit(np.array(boxes, dtype=np.float64).reshape(-1, 4)),
                           np.array(det_ids, dtype=np.int64))


def read_annotations(ann_dir: str, imageset: dict[str, int]) -> dict[int, ImageAnnotation]:
    """The annotation ``<ann_dir>/<name>.xml`` of every image in an imageset -> {image index: annotation}.

    ``ann_dir`` is the folder the imageset's names are relative to (``Annotations/DET/val`` for ``val.txt``).
    """
    if not os.path.isdir(ann_dir):
        raise ValueError(f"annotations folder {ann_dir!r} does not exist")
    annotations = {}
    for name, index in imageset.items():
        path = os.path.join(ann_dir, name + ".xml")
        if not os.path.isfile(path):
            raise ValueError(f"{path}: missing annotation of image {name!r} (index {index}); --annotations must be "
                             "the folder the imageset's names are relative to (Annotations/DET/val for the devkit's "
                             "val.txt of bare names, Annotations/DET for names like 'val/...')")
        annotation = read_annotation(path)
        annotation.name = name
        annotations[index] = annotation
    return annotations


# ---- blacklist -------------------------------------------------------------------------------------------


def read_split(root: str | os.PathLike, imageset: str) -> list[tuple[str, ImageAnnotation]]:
    """``(image name, annotation)`` of every image of an ILSVRC-format root's imageset, in imageset order.

    ``imageset`` is relative to ``root`` (``ImageSets/DET/train.txt``) or absolute; names are relative to
    ``root/Annotations/DET`` and ``root/Data/DET``.
    """
    path = imageset if os.path.isabs(imageset) else os.path.join(root, imageset)
    if not os.path.isfile(path):
        raise ValueError(f"imageset {path} does not exist; --data must be an ILSVRC-format root with "
                         "ImageSets/DET/<split>.txt (e.g. made by `ircnn data synth`)")
    names = read_imageset(str(path))
    annotations = read_annotations(os.path.join(root, "Annotations", "DET"), names)
    return [(name, annotations[index]) for name, index in names.items()]


def read_blacklist(path: str) -> set[tuple[int, int]]:
    """The devkit blacklist, lines ``<image index> <wnid or DET id>`` -> {(image index, DET id)}.

    The 2014 devkit's ``ILSVRC2014_det_validation_blacklist.txt`` names classes by WNID; DET ids are accepted too.
    """
    pairs = set()
    for number, line in numbered_lines(path):
        where = f"{path}:{number}"
        tokens = line.split()
        if len(tokens) != 2:
            raise ValueError(f"{where}: expected '<image index> <wnid or DET id>', got {line!r}")
        try:
            index = int(tokens[0])
        except ValueError:
            raise ValueError(f"{where}: image index {tokens[0]!r} is not an integer") from None
        try:
            _check_index(index)
            pairs.add((index, _det_id_of(tokens[1])))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    return pairs


# ---- devkit submission -----------------------------------------------------------------------------------

_SUBMISSION_LINE = "'<image_index> <det_id> <confidence> <xmin> <ymin> <xmax> <ymax>'"


def write_submission(path: str, detections: Detections) -> None:
    """Write devkit submission lines ``<image_index> <det_id> <confidence> <xmin> <ymin> <xmax> <ymax>``.

    Boxes become devkit inclusive integers exactly as ``write_annotation`` writes ground truth; confidences are
    written in full (shortest round-trip repr) so that ties and order survive reading back.
    """
    ints = to_devkit_ints(detections.boxes).tolist()
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(f"{i} {c} {s!r} {b[0]} {b[1]} {b[2]} {b[3]}\n" for i, c, s, b in
                     zip(detections.image.tolist(), detections.det_id.tolist(), detections.score.tolist(), ints))


def read_submission(path: str) -> Detections:
    """Devkit submission lines -> ``Detections`` (boxes ``x1 = xmin, x2 = xmax + 1``; float coordinates allowed,
    as the devkit reads them with ``%f``). Raises ValueError naming the file and line of a malformed line.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "input contained no data": an empty file is fine
            table = np.loadtxt(path, dtype=np.float64, ndmin=2, comments=None)  # fast path, C parser
    except ValueError:
        table = None
    if table is not None and table.size == 0:
        return Detections.empty()
    if table is None or table.shape[1] != 7 or not _submission_ok(table):
        return _read_submission_slowly(path)  # finds the bad line and raises, naming it
    return Detections(table[:, 0].astype(np.int64), table[:, 1].astype(np.int64), table[:, 2].copy(),
                      from_devkit(table[:, 3:]))


def _submission_ok(table: np.ndarray) -> bool:
    ids = table[:, :2]
    coords = table[:, 3:]
    return bool((ids == np.floor(ids)).all() and ((table[:, 0] >= 1) & (table[:, 0] <= MAX_IMAGE_INDEX)).all()
                and ((table[:, 1] >= 1) & (table[:, 1] <= 200)).all() and np.isfinite(table[:, 2]).all()
                and (np.abs(coords) <= MAX_COORD).all())  # NaN fails every comparison


def _read_submission_slowly(path: str) -> Detections:
    rows = []
    for number, line in numbered_lines(path):
        where = f"{path}:{number}"
        tokens = line.split()
        if len(tokens) != 7:
            raise ValueError(f"{where}: expected 7 fields {_SUBMISSION_LINE}, got {len(tokens)}: {line!r}")
        try:
            index, det_id = (_integral(t, name) for t, name in zip(tokens[:2], ("image index", "DET id")))
            _check_index(index)
            if not 1 <= det_id <= 200:
                raise ValueError(f"DET id {det_id} out of range 1..200")
            values = [_float(t) for t in tokens[2:]]
            _check_score(values[0])
            _check_box(values[1:], "box")
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        rows.append([index, det_id, *values])
    table = np.array(rows, dtype=np.float64).reshape(-1, 7)
    return Detections(table[:, 0].astype(np.int64), table[:, 1].astype(np.int64), table[:, 2].copy(),
                      from_devkit(table[:, 3:]))


def _integral(token: str, name: str) -> int:
    try:
        value = float(token)
    except ValueError:
        raise ValueError(f"{name} {token!r} is not an integer") from None
    if not value.is_integer():
        raise ValueError(f"{name} {token!r} is not an integer")
    return int(value)


def _float(token: str) -> float:
    try:
        return float(token)
    except ValueError:
        raise ValueError(f"{token!r} is not a number") from None


# ---- image names -> imageset indices ---------------------------------------------------------------------


class ImageLookup:
    """Finds the imageset index of an image named in a predictions file.

    A name matches an imageset entry exactly or by its key, the file name without directories and extension
    (``image_key``: ``/data/val/ILSVRC2012_val_00000001.JPEG`` -> ``ILSVRC2012_val_00000001``), so detections made
    on full paths score against ``val.txt``'s bare names. Unknown images give -1; a key shared by two imageset
    entries (possible in a train list) is refused when used.
    """

    def __init__(self, imageset: dict[str, int]):
        self._index: dict[str, int] = dict(imageset)
        self._by_key: dict[str, int] = {}
        for name, index in imageset.items():
            key = image_key(name)
            self._by_key[key] = 0 if key in self._by_key else index  # 0 marks an ambiguous key

    def __call__(self, image: str) -> int:
        if image in self._index:
            return self._index[image]
        index = self._by_key.get(image_key(image), -1)
        if index == 0:
            raise ValueError(f"image {image!r} matches several imageset entries by file name; use the exact "
                             "imageset name")
        return index


# ---- COCO ground truth and results -----------------------------------------------------------------------


def to_xywh(boxes: np.ndarray) -> np.ndarray:
    """x1, y1, x2, y2 (float array[N, 4]) -> COCO x, y, w, h (float array[N, 4])."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)


def write_coco_gt(path: str, annotations: dict[int, ImageAnnotation]) -> None:
    """COCO ground-truth JSON: image ``id`` = imageset index, ``file_name`` = imageset name, ``category_id`` = DET
    id (all 200 categories listed), ``bbox`` xywh, ``area`` = w * h, ``iscrowd`` 0."""
    vocab = det200()
    images, anns = [], []
    for index, a in annotations.items():
        images.append({"id": index, "file_name": a.name, "width": a.width, "height": a.height})
        for box, det_id in zip(to_xywh(a.boxes).tolist(), a.det_ids.tolist()):
            anns.append({"id": len(anns) + 1, "image_id": index, "category_id": det_id, "bbox": box,
                         "area": box[2] * box[3], "iscrowd": 0})
    categories = [{"id": i, "name": n, "wnid": w} for i, n, w in zip(vocab.ids, vocab.names, vocab.wnids)]
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"images": images, "annotations": anns, "categories": categories}, f)


def read_coco_gt(path: str) -> tuple[dict[str, int], dict[int, ImageAnnotation]]:
    """COCO ground-truth JSON (as ``write_coco_gt`` writes it) -> (imageset {file_name: id}, {id: annotation}).

    Image ids are the imageset indices; category ids must be DET ids 1..200; crowd annotations are refused
    (ILSVRC has none).
    """
    doc = _load_json(path)
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list) \
            or not isinstance(doc.get("annotations"), list):
        raise ValueError(f"{path}: a COCO ground-truth file is an object with lists 'images' and 'annotations'")
    imageset: dict[str, int] = {}
    sizes: dict[int, tuple[str, int, int]] = {}
    for k, image in enumerate(doc["images"]):
        where = f"{path}: images[{k}]"
        if not isinstance(image, dict):
            raise ValueError(f"{where}: expected an object, got {image!r}")
        index = _json_index(image.get("id"), "id", where)
        if index in sizes:
            raise ValueError(f"{where}: id {index} is not a new positive integer")
        name = image.get("file_name", str(index))
        if not isinstance(name, str) or name in imageset:
            raise ValueError(f"{where}: file_name {name!r} is not a new string")
        imageset[name] = index
        width, height = (_json_int(image.get(k, 0), k, where) for k in ("width", "height"))
        if not (0 <= width <= MAX_COORD and 0 <= height <= MAX_COORD):
            raise ValueError(f"{where}: width and height must be within 0..{MAX_COORD:g}, got {width} x {height}")
        sizes[index] = (name, width, height)
    boxes: dict[int, list] = {i: [] for i in sizes}
    det_ids: dict[int, list] = {i: [] for i in sizes}
    for k, ann in enumerate(doc["annotations"]):
        where = f"{path}: annotations[{k}]"
        if not isinstance(ann, dict):
            raise ValueError(f"{where}: expected an object, got {ann!r}")
        index = _json_index(ann.get("image_id"), "image_id", where)
        if index not in sizes:
            raise ValueError(f"{where}: image_id {index} is not in 'images'")
        if ann.get("iscrowd", 0):
            raise ValueError(f"{where}: crowd annotations (iscrowd 1) are not supported")
        det_ids[index].append(_json_det_id(ann.get("category_id"), where))
        boxes[index].append(_json_xywh(ann.get("bbox"), where))
    annotations = {}
    for index, (name, width, height) in sizes.items():
        xywh = np.array(boxes[index], dtype=np.float64).reshape(-1, 4)
        annotations[index] = ImageAnnotation(name, width, height, _from_xywh(xywh),
                                             np.array(det_ids[index], dtype=np.int64))
    return imageset, annotations


def write_coco_results(path: str, detections: Detections) -> None:
    """COCO results JSON list ``{"image_id": imageset index, "category_id": DET id, "bbox": xywh, "score"}``."""
    doc = [{"image_id": i, "category_id": c, "bbox": b, "score": s} for i, c, b, s in
           zip(detections.image.tolist(), detections.det_id.tolist(), to_xywh(detections.boxes).tolist(),
               detections.score.tolist())]
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f)


def read_coco_results(path: str, lookup: ImageLookup) -> Detections:
    """COCO results JSON list -> ``Detections``.

    ``image_id`` is an imageset index when it is an integer (as ``write_coco_gt``/``write_coco_results`` number
    images), or an image name or path looked up by ``lookup`` when it is a string (-1 if not in the imageset).
    """
    doc = _load_json(path)
    if not isinstance(doc, list):
        raise ValueError(f"{path}: a COCO results file is a JSON list of "
                         "{'image_id', 'category_id', 'bbox', 'score'} objects")
    image, det_id, score, xywh = [], [], [], []
    for k, r in enumerate(doc):
        where = f"{path}: entry {k}"
        if not isinstance(r, dict):
            raise ValueError(f"{where}: expected an object, got {r!r}")
        image_id = r.get("image_id")
        if isinstance(image_id, str):
            try:
                image.append(lookup(image_id))
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
        else:
            image.append(_json_index(image_id, "image_id", where))
        det_id.append(_json_det_id(r.get("category_id"), where))
        xywh.append(_json_xywh(r.get("bbox"), where, allow_negative=True))
        score.append(_json_score(r.get("score"), where))
    return Detections(np.array(image, dtype=np.int64), np.array(det_id, dtype=np.int64),
                      np.array(score, dtype=np.float64), _from_xywh(np.array(xywh, dtype=np.float64).reshape(-1, 4)))


def _from_xywh(xywh: np.ndarray) -> np.ndarray:
    return np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)


def _load_json(path: str):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        return parse_json(text, path)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None


_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')


def parse_json(text: str, where: str = "", max_depth: int = MAX_JSON_DEPTH):
    """``json.loads(text)`` once its arrays and objects are known to nest at most ``max_depth`` deep.

    Deeper input raises ValueError starting with ``where`` (a file, or ``file:line`` for one line of a JSON-lines
    file; nothing when empty) and, in a text of several lines, the line where the limit is passed; invalid JSON
    raises ``json.JSONDecodeError`` as ``json.loads`` does. Brackets inside strings do not count.
    """
    if text.count("[") + text.count("{") > max_depth:  # else it cannot nest that deep
        stripped = _JSON_STRING.sub("", text)  # JSON strings hold no raw newlines: line numbers survive
        data = np.frombuffer(stripped.encode("utf-8", "replace"), np.uint8)
        opens = (data == ord("[")) | (data == ord("{"))
        at = np.flatnonzero(opens | (data == ord("]")) | (data == ord("}")))  # [B] every bracket
        over = np.flatnonzero(np.cumsum(np.where(opens[at], 1, -1)) > max_depth)
        if over.size:
            line = 1 + int(np.count_nonzero(data[: at[over[0]]] == ord("\n")))
            if "\n" in text.strip():
                where = f"{where}:{line}" if where else f"line {line}"
            raise ValueError(f"{where}{': ' if where else ''}JSON nested more than {max_depth} levels deep "
                             "(arrays and objects); not a file this program writes")
    return json.loads(text)


def _json_int(value, name: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where}: {name!r} must be an integer, got {value!r}")
    return value


def _json_index(value, name: str, where: str) -> int:
    index = _json_int(value, name, where)
    try:
        _check_index(index, repr(name))
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return index


def _json_det_id(value, where: str) -> int:
    det_id = _json_int(value, "category_id", where)
    if det_id not in det200().row_of_id:
        raise ValueError(f"{where}: category_id {det_id} is not a DET id 1..200")
    return det_id


def _json_score(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where}: 'score' must be a finite number, got {value!r}")
    return float(value)


def _json_xywh(value, where: str, allow_negative: bool = False) -> list[float]:
    if not (isinstance(value, list) and len(value) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
        raise ValueError(f"{where}: 'bbox' must be a list [x, y, w, h] of 4 numbers, got {value!r}")
    _check_box_at(value, f"{where}: bbox ")
    if not allow_negative and (value[2] < 0 or value[3] < 0):
        raise ValueError(f"{where}: bbox {value} has a negative width or height")
    return [float(v) for v in value]


# ---- our JSON lines --------------------------------------------------------------------------------------


def read_jsonl_detections(path: str, lookup: ImageLookup) -> tuple[Detections, list[str]]:
    """``ircnn detect --format jsonl`` output -> (``Detections``, images of error lines).

    Each line is ``{"image": path, "width", "height", "detections": [{"box": [x1, y1, x2, y2], "det_id", "wnid",
    "name", "score"}]}`` (``det_id`` or ``wnid`` is enough; both must agree) or ``{"image": path, "error": ...}``,
    an image with no detections. Images are found with ``lookup`` (-1 if not in the imageset).
    """
    vocab = det200()
    image, det_id, score, boxes = [], [], [], []
    failed = []
    for number, line in numbered_lines(path):
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
        dets = doc.get("detections")
        if not isinstance(dets, list):
            raise ValueError(f"{where}: a detections line needs a list 'detections' (or an 'error')")
        try:
            index = lookup(doc["image"])
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        for k, d in enumerate(dets):
            what = f"{where}: detection {k}"
            if not isinstance(d, dict):
                raise ValueError(f"{what}: expected an object, got {d!r}")
            box = d.get("box")
            if not (isinstance(box, list) and len(box) == 4
                    and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)):
                raise ValueError(f"{what}: 'box' must be a list [x1, y1, x2, y2] of 4 numbers, got {box!r}")
            _check_box_at(box, f"{what}: ")
            c = _jsonl_class(d, vocab, what)
            image.append(index)
            det_id.append(c)
            score.append(_json_score(d.get("score"), what))
            boxes.append(box)
    return Detections(np.array(image, dtype=np.int64), np.array(det_id, dtype=np.int64),
                      np.array(score, dtype=np.float64), np.array(boxes, dtype=np.float64).reshape(-1, 4)), failed


def _jsonl_class(d: dict, vocab, what: str) -> int:
    det_id, wnid = d.get("det_id"), d.get("wnid")
    if det_id is None and wnid is None:
        raise ValueError(f"{what}: needs a 'det_id' or a 'wnid'")
    if det_id is not None:
        det_id = _json_det_id(det_id, what)
    if wnid is not None:
        if not isinstance(wnid, str) or wnid not in vocab.row_of_wnid:
            raise ValueError(f"{what}: 'wnid' {wnid!r} is not one of the 200 ILSVRC DET classes")
        by_wnid = vocab.ids[vocab.row_of_wnid[wnid]]
        if det_id is not None and det_id != by_wnid:
            raise ValueError(f"{what}: det_id {det_id} is {vocab.wnids[vocab.row_of_id[det_id]]}, not {wnid}")
        det_id = by_wnid
    return det_id


# ---- any predictions file --------------------------------------------------------------------------------

PREDICTION_FORMATS = ("ilsvrc", "jsonl", "coco")


@dataclass
class Predictions:
    detections: Detections
    format: str  # one of PREDICTION_FORMATS
    failed: list[str]  # images of JSONL error lines (scored as images without detections)


def detect_predictions_format(path: str) -> str:
    """``coco`` if the file starts with ``[``, ``jsonl`` if with ``{``, else ``ilsvrc`` (devkit submission lines)."""
    with open(path, encoding="utf-8") as f:
        for chunk in iter(lambda: f.read(4096), ""):
            stripped = chunk.lstrip()
            if stripped:
                return {"[": "coco", "{": "jsonl"}.get(stripped[0], "ilsvrc")
    return "ilsvrc"


def read_predictions(path: str, imageset: dict[str, int], predictions_format: str | None = None) -> Predictions:
    """Detections from a devkit submission, our JSON lines or a COCO results file (``None``: detect the format).

    Submission lines carry imageset indices; JSONL images and COCO string ``image_id`` are looked up by name
    (``ImageLookup``); COCO integer ``image_id`` is the imageset index. Images not in the imageset get index -1.
    """
    predictions_format = predictions_format or detect_predictions_format(path)
    if predictions_format == "ilsvrc":
        return Predictions(read_submission(path), "ilsvrc", [])
    lookup = ImageLookup(imageset)
    if predictions_format == "jsonl":
        detections, failed = read_jsonl_detections(path, lookup)
        return Predictions(detections, "jsonl", failed)
    if predictions_format == "coco":
        return Predictions(read_coco_results(path, lookup), "coco", [])
    raise ValueError(f"unknown predictions format {predictions_format!r}; use one of {', '.join(PREDICTION_FORMATS)}")


def _text(element: ET.Element, tag: str, path: str, what: str) -> str:
    child = element.find(tag)
    if child is None or child.text is None or not child.text.strip():
        raise ValueError(f"{path}: {what}missing <{tag}>")
    return child.text.strip()


def _int_field(element: ET.Element, tag: str, path: str, what: str) -> int:
    text = _text(element, tag, path, what)
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{path}: {what}<{tag}> is {text!r}, not a number") from None
    if not value.is_integer():
        raise ValueError(f"{path}: {what}<{tag}> is {text!r}, not a whole number of pixels")
    return int(value)


def _check_box_at(values, where: str) -> None:
    try:
        _check_box(values, "box")
    except ValueError as e:
        raise ValueError(f"{where}{e}") from None


def image_key(image: str) -> str:
    """The matching key of an image path: its file name without directories and extension."""
    name = image.replace("\\", "/").rsplit("/", 1)[-1]
    return os.path.splitext(name)[0]


def numbered_lines(path: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, stripped line) for each non-empty line of a text file."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if line:
                yield number, line
