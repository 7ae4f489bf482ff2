"""Any predictions file ``ircnn eval det`` scores: a devkit submission (``eval.submission``), our JSON lines
(``eval.records``) or a COCO results list (``eval.coco``), told apart by their first character."""

from __future__ import annotations

from dataclasses import dataclass

from eval.annotations import ImageLookup
from eval.coco import read_coco_results
from eval.detections import DetectionTable
from eval.parsing import MAX_TEXT_LINE_CHARS
from eval.records import read_jsonl_detections
from eval.submission import read_submission

PREDICTION_FORMATS = ("ilsvrc", "jsonl", "coco")

_SNIFF_BYTES = 4096


@dataclass
class Predictions:
    detections: DetectionTable
    format: str  # one of PREDICTION_FORMATS
    failed: list[str]  # images of JSONL error lines (scored as images without detections)


def detect_predictions_format(path: str) -> str:
    """``coco`` if the file starts with ``[``, ``jsonl`` if with ``{``, else ``ilsvrc`` (devkit submission lines).

    Whitespace before the first character is skipped for at most ``MAX_TEXT_LINE_CHARS`` bytes; a file blank that
    far is taken for a submission (whose reader bounds the rest).
    """
    with open(path, "rb") as f:
        for _ in range(MAX_TEXT_LINE_CHARS // _SNIFF_BYTES + 1):
            chunk = f.read(_SNIFF_BYTES)
            stripped = chunk.lstrip()
            if stripped:
                return {b"[": "coco", b"{": "jsonl"}.get(stripped[:1], "ilsvrc")
            if not chunk:
                break
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
