"""ILSVRC DET ground truth on disk: annotation XML files, image sets, splits, the devkit blacklist, and matching
image names to imageset indices (``ImageLookup``).

Boxes are written and read with the devkit's ``+1`` rule (``eval.boxes``); readers raise ValueError naming the
file and the line or object (``eval.parsing``).
"""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

import numpy as np

from eval.boxes import MAX_COORD, check_box, from_devkit, to_devkit_ints
from eval.classes import det200
from eval.parsing import MAX_XML_BYTES, excerpt, fields, located, parse_index, read_bounded, whole_number

_WNID = re.compile(r"n\d{8}")


@dataclass
class ImageAnnotation:
    """Ground truth of one image: ``boxes (float64 array[N, 4])`` x1, y1, x2, y2 and ``det_ids (int64 array[N])``."""

    name: str
    width: int
    height: int
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))
    det_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


def _det_id_of(token: str) -> int:
    """A DET class given as WNID or DET id 1..200 -> DET id."""
    vocab = det200()
    if _WNID.fullmatch(token):
        if token not in vocab.row_of_wnid:
            raise ValueError(f"WNID {excerpt(token)} is not one of the 200 ILSVRC DET classes")
        return vocab.ids[vocab.row_of_wnid[token]]
    try:
        det_id = int(token)
    except ValueError:
        raise ValueError(f"{excerpt(token)} is neither a DET WNID nor a DET id 1..200") from None
    if det_id not in vocab.row_of_id:
        raise ValueError(f"DET id {det_id} out of range 1..200")
    return det_id


# ---- annotations and image sets ------------------------------------------------------------------------


def write_annotation(path: str, *, folder: str, filename: str, width: int, height: int,
                     objects: list[tuple[str, tuple[float, float, float, float]]]) -> None:
    """Write one PASCAL VOC-style ILSVRC DET annotation XML.

    Args:
        folder, filename: the ``<folder>`` and ``<filename>`` fields (ILSVRC puts the image name without extension).
        width, height: image size in pixels.
        objects: ``(wnid, (x1, y1, x2, y2))`` per object, boxes in the project convention; written as devkit
            inclusive integers ``xmin = round(x1), xmax = round(x2) - 1`` (``eval.boxes``).
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
        check_box([float(v) for v in box], f"{path}: object {number}")
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
    for where, (name, index_text) in fields(path, 2, "'<image name> <index>'", "an imageset"):
        with located(where):
            index = parse_index(index_text)
        if name in names:
            raise ValueError(f"{where}: image {excerpt(name)} listed twice")
        if index in where_of_index:
            raise ValueError(f"{where}: image index {index} already used at {where_of_index[index]}")
        names[name] = index
        where_of_index[index] = where
    if not names:
        raise ValueError(f"{path}: no images listed (expected '<image name> <index>' lines)")
    return names


def read_annotation(path: str) -> ImageAnnotation:
    """One ILSVRC DET XML file -> ``ImageAnnotation`` with boxes ``x1 = xmin, x2 = xmax + 1`` (``eval.boxes``).

    Raises ValueError naming the file (and the object number) for unparsable XML, a missing field, a WNID that is
    not a DET class, or a box with ``xmax < xmin``.
    """
    data = read_bounded(path, MAX_XML_BYTES, "an annotation", "an ILSVRC annotation is a few KB", text=False)
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
        tag = f"<{root.tag}>" if len(root.tag) <= 80 else excerpt(root.tag)
        raise ValueError(f"{path}: root element is {tag}, expected <annotation>")
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
        check_box(coords, f"{path}: {what}box")
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
            raise ValueError(f"{path}: missing annotation of image {excerpt(name)} (index {index}); --annotations "
                             "must be the folder the imageset's names are relative to (Annotations/DET/val for the "
                             "devkit's val.txt of bare names, Annotations/DET for names like 'val/...')")
        annotation = read_annotation(path)
        annotation.name = name
        annotations[index] = annotation
    return annotations


# ---- splits and the blacklist ---------------------------------------------------------------------------


def read_det_split(root: str | os.PathLike, imageset: str) -> list[tuple[str, ImageAnnotation]]:
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
    for where, (index, cls) in fields(path, 2, "'<image index> <wnid or DET id>'", "a blacklist"):
        with located(where):
            pairs.add((parse_index(index), _det_id_of(cls)))
    return pairs


def _text(element: ET.Element, tag: str, path: str, what: str) -> str:
    child = element.find(tag)
    if child is None or child.text is None or not child.text.strip():
        raise ValueError(f"{path}: {what}missing <{tag}>")
    return child.text.strip()


def _int_field(element: ET.Element, tag: str, path: str, what: str) -> int:
    text = _text(element, tag, path, what)
    with located(path):
        return whole_number(text, f"{what}<{tag}>")


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
            raise ValueError(f"image {excerpt(image)} matches several imageset entries by file name; use the exact "
                             "imageset name")
        return index


def image_key(image: str) -> str:
    """The matching key of an image path: its file name without directories and extension."""
    name = image.replace("\\", "/").rsplit("/", 1)[-1]
    return os.path.splitext(name)[0]
