"""ILSVRC classification scoring: top-1 and top-5 error of ranked class predictions against ground truth.

Ground truth (``read_labels``) comes in three forms, all mapped to ``cls1000`` indices (0..999, torchvision order):

- ``imagefolder``: a directory of ``<wnid>/<image files>``; the label is the folder's WNID.
- ``pairs``: a text file of ``<image> <wnid>`` or ``<image> <cls index 0..999>`` lines.
- ``ilsvrc2012``: the devkit's ``ILSVRC2012_validation_ground_truth.txt``, one devkit id (1..1000) per line, line
  ``i`` being image ``ILSVRC2012_val_%08d.JPEG % i``. Devkit ids are a different numbering from cls1000 indices
  (devkit 1 = kit fox = index 278) and are mapped through WNIDs.

Predictions (``read_predictions``) are ``<image> <label1> .. <label5>`` text lines (labels as WNID or cls1000
index, best first, fewer than five allowed) or the JSON lines of ``ircnn classify --json``; a JSON error line
(``{"image": p, "error": "..."}``) is a prediction that misses both top-1 and top-5.

Images are matched by file name without directories and extension (``image_key``): ILSVRC file names are unique,
and this lets a labels file of bare names score predictions made on full paths.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass

import numpy as np

from eval.annotations import image_key
from eval.classes import cls1000, cls1000_devkit_ids
from eval.parsing import excerpt, json_lines, located, numbered_lines, parse_json, text_lines

LABEL_FORMATS = ("imagefolder", "pairs", "ilsvrc2012")

# The extensions torchvision's ImageFolder accepts; other files in a class folder (READMEs, .DS_Store) are skipped.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

_WNID = re.compile(r"n\d{8}")
_LABELS = "a labels file"


@dataclass(frozen=True)
class Prediction:
    """Ranked cls1000 indices for one image, best first; ``error`` set (and ``ranked`` empty) if it failed."""

    image: str
    ranked: tuple[int, ...] = ()
    error: str | None = None
    where: str = ""  # "file:line", for messages


@dataclass(frozen=True)
class ClassificationResult:
    images: int  # labelled images, all of them count (a missing or failed prediction is a miss)
    top1_error: float  # fraction in [0, 1]
    top5_error: float
    missing: int  # labelled images without a prediction
    unmatched: int  # predictions for images without a label (not scored)
    errors: int  # labelled images whose prediction is an error line

    def to_json(self) -> dict:
        return asdict(self)


# ---- pure functions --------------------------------------------------------------------------------------


def top_k_error(labels: np.ndarray, ranked: np.ndarray, k: int) -> float:
    """Fraction of images whose true label is not among their first ``k`` ranked predictions.

    Args:
        labels (int array[N]): true cls1000 index per image.
        ranked (int array[N, K]): predicted indices, best first; rows shorter than K are padded with -1.
        k: how many leading predictions count (1 for top-1, 5 for top-5).
    """
    if len(labels) == 0:
        raise ValueError("no images to score")
    hit = (ranked[:, :k] == labels[:, None]).any(axis=1)  # [N]
    return float(1.0 - hit.mean())


def parse_class(token: str) -> int:
    """A cls1000 class given as WNID (``n01440764``) or index (``0``..``999``) -> its index."""
    vocab = cls1000()
    if _WNID.fullmatch(token):
        if token not in vocab.row_of_wnid:
            raise ValueError(f"unknown WNID {excerpt(token)} (not one of the 1000 ILSVRC classes)")
        return vocab.row_of_wnid[token]
    try:
        index = int(token)
    except ValueError:
        raise ValueError(f"{excerpt(token)} is neither a WNID nor a class index 0..999") from None
    if not 0 <= index < len(vocab):
        raise ValueError(f"class index {index} out of range 0..{len(vocab) - 1}")
    return index


# ---- readers ---------------------------------------------------------------------------------------------


def detect_labels_format(path: str) -> str:
    """``imagefolder`` for a directory, ``ilsvrc2012`` if every non-empty line is one integer, else ``pairs``
    (decided at the first line that is not an integer; lines of at most ``MAX_TEXT_LINE_CHARS``)."""
    if os.path.isdir(path):
        return "imagefolder"
    any_line = False
    for _, line in numbered_lines(path, _LABELS):
        if not re.fullmatch(r"[+-]?\d+", line):
            return "pairs"
        any_line = True
    return "ilsvrc2012" if any_line else "pairs"


def read_labels(path: str, labels_format: str | None = None) -> dict[str, int]:
    """Ground truth as {image key: cls1000 index}; ``labels_format`` one of ``LABEL_FORMATS`` or None to detect.

    Raises ValueError naming the file and line for a malformed line, two images with the same key, or no labels.
    """
    labels_format = labels_format or detect_labels_format(path)
    if labels_format not in LABEL_FORMATS:
        raise ValueError(f"unknown labels format {labels_format!r}; use one of {', '.join(LABEL_FORMATS)}")
    if (labels_format == "imagefolder") != os.path.isdir(path):
        need = "a directory" if labels_format == "imagefolder" else "a file"
        raise ValueError(f"labels format {labels_format!r} needs {need}, got {path!r}")

    entries = {"imagefolder": _imagefolder_entries, "pairs": _pairs_entries,
               "ilsvrc2012": _ilsvrc2012_entries}[labels_format](path)
    labels: dict[str, int] = {}
    seen: dict[str, str] = {}  # key -> where its label came from, to name both sides of a clash
    for image, index, where in entries:
        key = image_key(image)
        source = excerpt(image) if where == image else f"{excerpt(image)} at {where}"
        if key in labels:
            raise ValueError(f"two labelled images have the same name {excerpt(key)}: {seen[key]} and {source}; "
                             "images are matched by file name without directories and extension")
        labels[key] = index
        seen[key] = source
    if not labels:
        what = "no images in class folders under" if labels_format == "imagefolder" else "no labels in"
        raise ValueError(f"{what} {path!r}")
    return labels


def _imagefolder_entries(root: str) -> Iterator[tuple[str, int, str]]:
    vocab = cls1000()
    for wnid in sorted(os.listdir(root)):
        folder = os.path.join(root, wnid)
        if wnid.startswith(".") or not os.path.isdir(folder):
            continue
        if wnid not in vocab.row_of_wnid:
            raise ValueError(f"{folder}: folder name {wnid!r} is not a WNID of the 1000 ILSVRC classes "
                             "(an ImageFolder tree is <root>/<wnid>/<images>)")
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames.sort()
            for name in sorted(filenames):
                if name.lower().endswith(IMAGE_EXTENSIONS):
                    image = os.path.join(dirpath, name)
                    yield image, vocab.row_of_wnid[wnid], image


def _pairs_entries(path: str) -> Iterator[tuple[str, int, str]]:
    for number, line in numbered_lines(path, _LABELS):
        where = f"{path}:{number}"
        tokens = line.rsplit(None, 1)  # the image name may contain spaces; the label is the last word
        if len(tokens) != 2:
            raise ValueError(f"{where}: expected '<image> <wnid or class index>', got {excerpt(line)}")
        with located(where):
            yield tokens[0], parse_class(tokens[1]), where


def _ilsvrc2012_entries(path: str) -> Iterator[tuple[str, int, str]]:
    row_of_wnid = cls1000().row_of_wnid
    wnid_of_devkit_id = cls1000_devkit_ids()
    first_empty = None  # the first of the empty lines since the last label; fine if only empty lines follow
    for number, line in text_lines(path, _LABELS):
        line = line.strip()
        if not line:
            first_empty = first_empty or number
            continue
        if first_empty:
            # Line i is image i, so a gap would silently shift every label after it.
            raise ValueError(f"{path}:{first_empty}: empty line in an ILSVRC2012 ground-truth file (line i labels "
                             "image i)")
        where = f"{path}:{number}"
        try:
            devkit_id = int(line)
        except ValueError:
            raise ValueError(f"{where}: expected one devkit class id 1..1000, got {excerpt(line)}") from None
        if devkit_id not in wnid_of_devkit_id:
            raise ValueError(f"{where}: devkit class id {devkit_id} out of range 1..1000")
        yield f"ILSVRC2012_val_{number:08d}.JPEG", row_of_wnid[wnid_of_devkit_id[devkit_id]], where


def read_predictions(path: str) -> Iterator[Prediction]:
    """Predictions from a text or JSON-lines file (the form is decided per line: JSON lines start with ``{``).

    Raises ValueError naming the file and line for a malformed line.
    """
    for number, line in json_lines(path, "a predictions file"):
        where = f"{path}:{number}"
        with located(where):
            yield _parse_json_prediction(line, where) if line.startswith("{") else _parse_text_prediction(line, where)


def _parse_text_prediction(line: str, where: str) -> Prediction:
    image, *tokens = line.split()
    if not tokens:
        raise ValueError(f"expected '<image> <label1> .. <label5>', got {excerpt(line)}")
    return Prediction(image, tuple(parse_class(t) for t in tokens), where=where)


def _parse_json_prediction(line: str, where: str) -> Prediction:
    try:
        doc = parse_json(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("image"), str):
        raise ValueError("a JSON prediction needs a string field 'image'")
    if "error" in doc:
        return Prediction(doc["image"], error=str(doc["error"]), where=where)
    top_k = doc.get("top_k")
    if not isinstance(top_k, list):
        raise ValueError("a JSON prediction needs a list 'top_k' (or an 'error')")
    return Prediction(doc["image"], tuple(_json_class(entry, rank) for rank, entry in enumerate(top_k, 1)),
                      where=where)


def _json_class(entry, rank: int) -> int:
    if not isinstance(entry, dict) or not ("index" in entry or "wnid" in entry):
        raise ValueError(f"top_k entry {rank} needs an 'index' or a 'wnid', got {excerpt(entry)}")
    index = entry.get("index")
    if index is not None:
        if isinstance(index, bool) or not isinstance(index, int):
            raise ValueError(f"top_k entry {rank}: 'index' must be an integer, got {excerpt(index)}")
        index = parse_class(str(index))
    wnid = entry.get("wnid")
    if wnid is not None:
        if not (isinstance(wnid, str) and _WNID.fullmatch(wnid)):
            raise ValueError(f"top_k entry {rank}: 'wnid' must be a WNID like 'n02123045', got {excerpt(wnid)}")
        by_wnid = parse_class(wnid)
        if index is not None and by_wnid != index:
            raise ValueError(f"top_k entry {rank}: index {index} is {cls1000().wnids[index]}, not {wnid}")
        index = by_wnid
    return index


# ---- accumulator -----------------------------------------------------------------------------------------


class ClassificationEvaluator:
    """Top-1/top-5 error over a fixed set of labelled images, fed predictions in any order and any number of calls.

    Every labelled image counts: a missing prediction or an error line is a miss at top-1 and top-5.
    """

    def __init__(self, labels: dict[str, int]):
        """``labels``: {image key (see ``image_key``): cls1000 index}, as ``read_labels`` returns."""
        if not labels:
            raise ValueError("no labelled images to score")
        self.labels = labels
        self.reset()

    def reset(self) -> None:
        self._ranked: dict[str, tuple[int, ...]] = {}  # key -> ranked indices (empty for an error line)
        self._where: dict[str, str] = {}
        self._errors = 0
        self._unmatched = 0

    def process(self, predictions: Iterable[Prediction]) -> None:
        for p in predictions:
            key = image_key(p.image)
            if key not in self.labels:
                self._unmatched += 1
                continue
            if key in self._ranked:
                raise ValueError(f"{p.where}: second prediction for image {excerpt(key)} (first at "
                                 f"{self._where[key]})")
            self._ranked[key] = p.ranked
            self._where[key] = p.where
            self._errors += p.error is not None

    def evaluate(self) -> ClassificationResult:
        keys = sorted(self.labels)
        labels = np.array([self.labels[k] for k in keys], dtype=np.int64)  # [N]
        ranked = np.full((len(keys), 5), -1, dtype=np.int64)  # [N, 5]; -1 never equals a label
        for row, key in enumerate(keys):
            top5 = self._ranked.get(key, ())[:5]
            ranked[row, : len(top5)] = top5
        return ClassificationResult(
            images=len(keys),
            top1_error=top_k_error(labels, ranked, 1),
            top5_error=top_k_error(labels, ranked, 5),
            missing=len(keys) - len(self._ranked),
            unmatched=self._unmatched,
            errors=self._errors,
        )


def evaluate_files(labels_path: str, predictions_path: str, labels_format: str | None = None) -> ClassificationResult:
    """Score a predictions file against a labels file or ImageFolder tree (what ``ircnn eval cls`` runs)."""
    evaluator = ClassificationEvaluator(read_labels(labels_path, labels_format))
    evaluator.process(read_predictions(predictions_path))
    return evaluator.evaluate()
