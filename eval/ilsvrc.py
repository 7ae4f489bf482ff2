"""ILSVRC detection mAP exactly as the 2013/2014 devkit's ``eval_detection.m`` computes it, and three cross-checks.

Modes (``MODES``):

- ``ilsvrc`` (default): the devkit. Per-object IoU threshold ``min(0.5, wh / ((w + 10)(h + 10)))``, ``+1`` pixel
  widths, each detection takes the best-IoU *not yet detected* object of its class that clears that object's
  threshold, all-point interpolated AP (``VOCap``), blacklisted (image, class) pairs removed.
- ``iou50``: the devkit with every threshold fixed at 0.5, so it differs from ``ilsvrc`` only through the
  small-object rule (objects under about 90 x 90 pixels).
- ``voc07``: the PASCAL VOC 2007 ``VOCevaldet`` rules on the same data: threshold 0.5 with ``+1`` widths, each
  detection compared with the best-IoU object of its class *whether or not already detected* (a second hit on a
  detected object is a false positive, where the devkit would try the next object), 11-point interpolated AP.
  Ties in score, the blacklist and the mean over classes follow the devkit rules below.
- ``coco50``: AP at IoU 0.5 as pycocotools' ``COCOeval`` computes it (area ``all``, ``maxDets`` 100, no crowd
  annotations): boxes without ``+1``, the top 100 detections per image and class, COCO's matching, 101-point
  interpolated precision. Written here in numpy; ``tests/eval/test_coco50.py`` checks it against pycocotools.

Boxes arrive in the project convention (x1, y1, x2, y2, width ``x2 - x1``, see ``eval/boxes.py``). The devkit
works on inclusive integer pixels ``xmin..xmax`` with width ``xmax - xmin + 1``; ``devkit_boxes`` converts
(``xmax = x2 - 1``) so that the devkit's formulas are reproduced literally on the devkit's own numbers.

Conventions this module fixes (each is documented again next to its code):

- Ties in confidence are ordered as the devkit's stable MATLAB sorts leave them: by image index, then by order of
  appearance in the predictions. COCOeval's stable sorts give the same order.
- A class with no positives (after the blacklist) has no AP (``None``) and is left out of the mAP. The devkit
  returns NaN for such a class when it has detections (recall ``0/0``) and 0 when it has none, and
  ``demo_eval_det.m`` takes the plain ``mean(ap)``, so a subset missing a class gets a NaN or deflated mAP; on the
  real validation set every one of the 200 classes has positives and the two agree. COCOeval also skips classes
  without ground truth (its precision stays -1).
- The mAP is the plain mean of the per-class APs of the classes with at least one positive.
- Every mode applies the blacklist as the devkit does, and ignores (and counts) detections on images outside the
  evaluated imageset, which the devkit cannot handle (its per-image arrays would no longer line up).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from eval.annotations import ImageAnnotation, read_annotations, read_blacklist, read_imageset
from eval.classes import det200
from eval.detections import DetectionTable
from eval.predictions import Predictions, read_predictions

MODES = ("ilsvrc", "iou50", "voc07", "coco50")

DEFAULT_IOU_THR = 0.5  # the devkit's defaultIOUthr
PIXEL_TOLERANCE = 10  # the devkit's pixelTolerance
COCO_MAX_DETS = 100  # COCOeval maxDets[-1]
COCO_AREA_RANGE = (0.0, 1e10)  # COCOeval areaRng 'all'
COCO_REC_THRS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)  # as COCOeval


# ---- boxes, thresholds, IoU ------------------------------------------------------------------------------


def devkit_boxes(boxes: np.ndarray) -> np.ndarray:
    """Project boxes x1, y1, x2, y2 (float array[N, 4]) -> devkit inclusive xmin, ymin, xmax, ymax (float [N, 4])."""
    dev = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).copy()
    dev[:, 2:] -= 1
    return dev


def devkit_thresholds(gt: np.ndarray) -> np.ndarray:
    """The devkit's per-object IoU threshold ``min(0.5, (w*h) / ((w+10)*(h+10)))``, widths with ``+1``.

    ``eval_detection.m``: ``gt_w = xmax - xmin + 1`` (its names swap w and h; the formula is symmetric),
    ``thr = (gt_w.*gt_h)./((gt_w+pixelTolerance).*(gt_h+pixelTolerance))``, ``min(defaultIOUthr, thr)``.
    A 10 x 10 object gets 100 / 400 = 0.25; objects of about 90 x 90 and larger get 0.5.

    Args:
        gt (float array[G, 4]): devkit inclusive boxes xmin, ymin, xmax, ymax.
    Returns:
        float array[G].
    """
    w = gt[:, 2] - gt[:, 0] + 1
    h = gt[:, 3] - gt[:, 1] + 1
    return np.minimum(DEFAULT_IOU_THR, (w * h) / ((w + PIXEL_TOLERANCE) * (h + PIXEL_TOLERANCE)))


def devkit_iou(det: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """IoU of row-aligned pairs as the devkit computes it, on inclusive boxes with ``+1`` widths.

    ``iw = min(xmax) - max(xmin) + 1`` (``ih`` alike); pairs with ``iw <= 0`` or ``ih <= 0`` do not overlap (0);
    otherwise ``iw*ih / (det area + gt area - iw*ih)`` with areas ``(xmax - xmin + 1) * (ymax - ymin + 1)``.

    Args:
        det, gt (float array[P, 4]): devkit inclusive boxes, pair ``p`` is ``det[p]`` with ``gt[p]``.
    Returns:
        float array[P].
    """
    iw = np.minimum(det[:, 2], gt[:, 2]) - np.maximum(det[:, 0], gt[:, 0]) + 1
    ih = np.minimum(det[:, 3], gt[:, 3]) - np.maximum(det[:, 1], gt[:, 1]) + 1
    overlap = (iw > 0) & (ih > 0)
    inter = iw * ih
    ua = ((det[:, 2] - det[:, 0] + 1) * (det[:, 3] - det[:, 1] + 1)
          + (gt[:, 2] - gt[:, 0] + 1) * (gt[:, 3] - gt[:, 1] + 1) - inter)
    return np.where(overlap, inter / np.where(overlap, ua, 1.0), 0.0)


def coco_iou(det: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """IoU of row-aligned pairs as pycocotools' ``bbIou`` computes it (no ``+1``, from ``x, y, w, h``).

    Args:
        det, gt (float array[P, 4]): COCO ``x, y, w, h`` boxes.
    Returns:
        float array[P].
    """
    w = np.minimum(det[:, 0] + det[:, 2], gt[:, 0] + gt[:, 2]) - np.maximum(det[:, 0], gt[:, 0])
    h = np.minimum(det[:, 1] + det[:, 3], gt[:, 1] + gt[:, 3]) - np.maximum(det[:, 1], gt[:, 1])
    overlap = (w > 0) & (h > 0)
    inter = w * h
    union = det[:, 2] * det[:, 3] + gt[:, 2] * gt[:, 3] - inter
    return np.where(overlap, inter / np.where(overlap, union, 1.0), 0.0)


# ---- average precision -----------------------------------------------------------------------------------


def voc_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """All-point interpolated AP, the devkit's ``VOCap``.

    ``mrec = [0; rec; 1]``, ``mpre = [0; prec; 0]``; make ``mpre`` non-increasing from the right
    (``mpre(i) = max(mpre(i), mpre(i+1))``); sum ``(mrec(i) - mrec(i-1)) * mpre(i)`` over the ``i`` where recall
    changes. No detections gives 0.

    Args:
        recall, precision (float array[D]): the PR points in score order.
    """
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    i = np.flatnonzero(mrec[1:] != mrec[:-1]) + 1
    return float(np.sum((mrec[i] - mrec[i - 1]) * mpre[i]))


def voc07_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """11-point interpolated AP (PASCAL VOC 2007): mean over ``t = 0, 0.1, .., 1`` of ``max(prec[rec >= t])``
    (0 where no point reaches ``t``).

    The thresholds are ``k / 10`` correctly rounded, so a recall of exactly 3/10 counts at ``t = 0.3``
    (``np.arange(0, 1.1, 0.1)`` would give 0.30000000000000004 and miss it).
    """
    points = [precision[recall >= t].max() if (recall >= t).any() else 0.0 for t in np.arange(11) / 10]
    return float(np.mean(points))


def coco_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """101-point interpolated AP as ``COCOeval.accumulate``: precision made non-increasing from the right, read at
    the first PR point whose recall reaches each of ``COCO_REC_THRS`` (``searchsorted(rc, recThrs, 'left')``), 0
    beyond the last point; the AP is the mean of the 101 values.

    Args:
        recall, precision (float array[D]): ``tp / npig`` and ``tp / (tp + fp + eps)`` in score order.
    """
    pr = np.maximum.accumulate(precision[::-1])[::-1] if len(precision) else precision
    inds = np.searchsorted(recall, COCO_REC_THRS, side="left")
    q = np.zeros(len(COCO_REC_THRS))
    reached = inds < len(pr)
    q[reached] = pr[inds[reached]]
    return float(q.mean())


# ---- matching --------------------------------------------------------------------------------------------


def _group_pairs(det_key: np.ndarray, gt_key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every (detection, ground truth) pair with the same (image, class) key.

    Returns (det index int64[P], gt index int64[P]), pairs of one detection in ascending gt index order.
    """
    gt_order = np.argsort(gt_key, kind="stable")
    sorted_keys = gt_key[gt_order]
    start = np.searchsorted(sorted_keys, det_key, side="left")
    counts = np.searchsorted(sorted_keys, det_key, side="right") - start  # [D]
    det_idx = np.repeat(np.arange(len(det_key)), counts)  # [P]
    first = np.repeat(np.cumsum(counts) - counts, counts)  # [P] where each detection's pairs start
    gt_idx = gt_order[np.repeat(start, counts) + np.arange(len(det_idx)) - first]  # [P]
    return det_idx, gt_idx


def _run_starts(a: np.ndarray) -> np.ndarray:
    """bool[N]: True where a run of equal values starts in ``a`` (int array[N])."""
    starts = np.ones(len(a), dtype=bool)
    starts[1:] = a[1:] != a[:-1]
    return starts


def _rank_in_group(key: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """0-based rank of each element among the elements with the same key, ordered by ``pos`` (int array[N])."""
    order = np.lexsort((pos, key))
    sorted_key = key[order]
    starts = np.flatnonzero(_run_starts(sorted_key))
    group_start = np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    rank = np.empty(len(key), dtype=np.int64)
    rank[order] = np.arange(len(order)) - group_start
    return rank


def greedy_match(det_idx: np.ndarray, gt_idx: np.ndarray, preference: tuple[np.ndarray, ...],
                 det_key: np.ndarray, pos: np.ndarray, num_dets: int, num_gts: int) -> np.ndarray:
    """Greedy one-to-one matching within each (image, class) group, detections in score order.

    Each detection, in the order ``pos``, takes its most preferred candidate ground truth that no earlier
    detection of its group took; a detection left without one is unmatched. This is the devkit's loop (and
    COCOeval's) run for all groups at once: round ``r`` handles the ``r``-th candidate-holding detection of every
    group together, which is safe because groups share no ground truth.

    Args:
        det_idx, gt_idx (int array[P]): candidate pairs (already restricted to IoU >= the threshold).
        preference: lexsort keys over the pairs, least significant first; a detection prefers the pair that
            sorts first (e.g. ``(gt_idx, -iou)``: highest IoU, ties to the lower gt index).
        det_key (int array[D]): (image, class) group of each detection; ``pos`` (int array[D]) its processing order.
    Returns:
        int64 array[D]: matched gt index, or -1.
    """
    matched = np.full(num_dets, -1, dtype=np.int64)
    if len(det_idx) == 0:
        return matched
    holders = np.unique(det_idx)
    rank = np.zeros(num_dets, dtype=np.int64)
    rank[holders] = _rank_in_group(det_key[holders], pos[holders])
    pair_round = rank[det_idx]
    order = np.lexsort((*preference, pos[det_idx], pair_round))  # by round, then detection, then preference
    det_idx, gt_idx, pair_round = det_idx[order], gt_idx[order], pair_round[order]
    bounds = np.searchsorted(pair_round, np.arange(pair_round[-1] + 2))
    taken = np.zeros(num_gts, dtype=bool)
    for r in range(len(bounds) - 1):
        d, g = det_idx[bounds[r]:bounds[r + 1]], gt_idx[bounds[r]:bounds[r + 1]]
        free = ~taken[g]
        d, g = d[free], g[free]
        best = _run_starts(d)  # the first free pair of each detection is its preferred one
        taken[g[best]] = True
        matched[d[best]] = g[best]
    return matched


def first_choice_match(det_idx: np.ndarray, gt_idx: np.ndarray, preference: tuple[np.ndarray, ...],
                       pos: np.ndarray, num_dets: int) -> np.ndarray:
    """PASCAL VOC's matching: each detection looks only at its most preferred candidate, taken or not; the first
    detection (in ``pos`` order) to pick an object matches it, later ones are false positives.

    Arguments as ``greedy_match``. Returns int64 array[D]: matched gt index, or -1.
    """
    matched = np.full(num_dets, -1, dtype=np.int64)
    if len(det_idx) == 0:
        return matched
    order = np.lexsort((*preference, det_idx))
    d, g = det_idx[order], gt_idx[order]
    best = _run_starts(d)
    d, g = d[best], g[best]  # each detection's choice
    d_first = np.lexsort((pos[d], g))  # by object, then processing order
    g_sorted = g[d_first]
    winner = d_first[_run_starts(g_sorted)]
    matched[d[winner]] = g[winner]
    return matched


# ---- scoring ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GroundTruth:
    """All ground-truth objects of an evaluated set, flat: ``image``, ``det_id`` (int64 array[G]) and ``boxes``
    (float64 array[G, 4], project convention), in image-index order and, within an image, annotation order."""

    image: np.ndarray
    det_id: np.ndarray
    boxes: np.ndarray
    images: np.ndarray  # int64 array[I]: every evaluated image index, sorted, objects or not

    @staticmethod
    def from_annotations(annotations: dict[int, ImageAnnotation]) -> GroundTruth:
        indices = sorted(annotations)
        parts = [annotations[i] for i in indices]
        counts = [len(a.det_ids) for a in parts]
        return GroundTruth(
            image=np.repeat(np.array(indices, dtype=np.int64), counts),
            det_id=np.concatenate([a.det_ids for a in parts] + [np.zeros(0, np.int64)]).astype(np.int64),
            boxes=np.concatenate([a.boxes.reshape(-1, 4) for a in parts] + [np.zeros((0, 4))]).astype(np.float64),
            images=np.array(indices, dtype=np.int64),
        )


@dataclass(frozen=True)
class ClassAP:
    det_id: int
    wnid: str
    name: str
    ap: float | None  # None for a class without positives (left out of the mAP)
    positives: int  # ground-truth objects after the blacklist (COCO: not ignored)
    detections: int  # detections scored (after the blacklist; coco50: after the top-100 cut)
    recall: np.ndarray = field(repr=False, compare=False)  # PR curve in score order, for plots
    precision: np.ndarray = field(repr=False, compare=False)

    def to_json(self) -> dict:
        return {"det_id": self.det_id, "wnid": self.wnid, "name": self.name, "ap": self.ap,
                "positives": self.positives, "detections": self.detections}


@dataclass(frozen=True)
class DetectionResult:
    mode: str
    map: float  # mean AP over the classes with positives
    classes: list[ClassAP]  # every class with positives or detections, in DET id order
    images: int  # images evaluated
    unscored: int  # detections on images outside the evaluated set, ignored
    blacklisted: int  # detections removed by the blacklist

    def to_json(self) -> dict:
        return {"mode": self.mode, "map": self.map, "classes": [c.to_json() for c in self.classes],
                "images": self.images, "classes_in_map": sum(c.ap is not None for c in self.classes),
                "unscored_detections": self.unscored, "blacklisted_detections": self.blacklisted}


def _pair_key(image: np.ndarray, det_id: np.ndarray) -> np.ndarray:
    return image * 256 + det_id  # DET ids are 1..200 < 256


def score(gt: GroundTruth, dets: DetectionTable, mode: str = "ilsvrc",
          blacklist: Iterable[tuple[int, int]] = ()) -> DetectionResult:
    """Per-class AP and mAP of ``dets`` against ``gt`` under ``mode`` (see the module docstring).

    ``dets`` rows are in the order they were read (that order breaks ties in score); detections on images not in
    ``gt.images`` are not scored and counted in ``unscored`` (the devkit would fail on them).
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    inside = np.isin(dets.image, gt.images)
    unscored = int((~inside).sum())
    image, det_id, conf, boxes = (a[inside] for a in (dets.image, dets.det_id, dets.score, dets.boxes))
    gt_image, gt_det_id, gt_boxes = gt.image, gt.det_id, gt.boxes

    # The blacklist: the devkit skips a detection whose (image, class) pair is listed (neither TP nor FP, which
    # leaves the PR curve as if it were absent) and subtracts the pair's objects from the class's positives.
    blacklisted = 0
    black = np.array(sorted(set(blacklist)), dtype=np.int64).reshape(-1, 2)
    if len(black):
        black_keys = _pair_key(black[:, 0], black[:, 1])
        keep = ~np.isin(_pair_key(image, det_id), black_keys)
        blacklisted = int((~keep).sum())
        image, det_id, conf, boxes = image[keep], det_id[keep], conf[keep], boxes[keep]
        gt_keep = ~np.isin(_pair_key(gt_image, gt_det_id), black_keys)
        gt_image, gt_det_id, gt_boxes = gt_image[gt_keep], gt_det_id[gt_keep], gt_boxes[gt_keep]

    # Score order. The devkit stable-sorts by image id, then within each image by confidence ('descend', stable),
    # concatenates the images in id order and stable-sorts that by confidence: ties end up by image index, then
    # by order in the file. COCOeval's mergesorts give the same order.
    pos = np.empty(len(conf), dtype=np.int64)
    pos[np.lexsort((np.arange(len(conf)), image, -conf))] = np.arange(len(conf))

    det_key = _pair_key(image, det_id)
    gt_key = _pair_key(gt_image, gt_det_id)
    gt_ignore = np.zeros(len(gt_key), dtype=bool)
    det_ignore = np.zeros(len(conf), dtype=bool)
    if mode == "coco50":
        # COCOeval keeps the top maxDets detections of each image and class (score order, stable).
        top = _rank_in_group(det_key, pos) < COCO_MAX_DETS
        image, det_id, conf, boxes, det_key = image[top], det_id[top], conf[top], boxes[top], det_key[top]
        pos = np.argsort(np.argsort(pos[top], kind="stable"), kind="stable")
        matched, gt_ignore, det_ignore = _coco_match(boxes, det_key, pos, gt_boxes, gt_key)
    else:
        matched = _devkit_match(boxes, det_key, pos, gt_boxes, gt_key, mode)

    return _per_class_ap(mode, pos, det_id, matched >= 0, det_ignore, gt_det_id, gt_ignore,
                         images=len(gt.images), unscored=unscored, blacklisted=blacklisted)


def _devkit_match(boxes, det_key, pos, gt_boxes, gt_key, mode: str) -> np.ndarray:
    """Match detections to objects by the devkit's rules (``ilsvrc``, ``iou50``) or VOC 2007's (``voc07``).

    Devkit (``eval_detection.m``): within an image, detections go in descending confidence; each looks at the
    objects of its class that are not yet detected, keeps those with ``ov >= gt_thr(k)``, and takes the one with
    the highest IoU (``ov > ovmax``: on equal IoU the earlier object in the annotation wins); none -> false
    positive. VOC 2007: the highest-IoU object of the class (earlier wins ties) among all of them; a hit if its
    IoU >= 0.5 and no earlier detection took it, else a false positive.
    """
    det_idx, gt_idx = _group_pairs(det_key, gt_key)
    gt_dev = devkit_boxes(gt_boxes)
    iou = devkit_iou(devkit_boxes(boxes)[det_idx], gt_dev[gt_idx])  # [P]
    thr = devkit_thresholds(gt_dev) if mode == "ilsvrc" else np.full(len(gt_key), DEFAULT_IOU_THR)
    ok = iou >= thr[gt_idx]
    det_idx, gt_idx, iou = det_idx[ok], gt_idx[ok], iou[ok]
    preference = (gt_idx, -iou)  # highest IoU, ties to the earlier object
    if mode == "voc07":
        return first_choice_match(det_idx, gt_idx, preference, pos, len(det_key))
    return greedy_match(det_idx, gt_idx, preference, det_key, pos, len(det_key), len(gt_key))


def _coco_match(boxes, det_key, pos, gt_boxes, gt_key):
    """Match as ``COCOeval.evaluateImg`` at IoU 0.5 (no crowd objects).

    Objects whose area is outside areaRng 'all' are ignored and sorted last; each detection (score order) skips
    objects already matched, needs ``iou >= 0.5`` and replaces its current choice with any later object of IoU
    ``>=`` the best so far (so ties go to the *later* object); once it holds a regular object it never moves to an
    ignored one. A detection matched to an ignored object, or unmatched with an area outside the range, is
    ignored (neither TP nor FP).

    Returns (matched gt index int64[D] or -1, gt ignored bool[G], detection ignored bool[D]).
    """
    det_xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
    gt_xywh = np.concatenate([gt_boxes[:, :2], gt_boxes[:, 2:] - gt_boxes[:, :2]], axis=1)
    lo, hi = COCO_AREA_RANGE
    gt_area = gt_xywh[:, 2] * gt_xywh[:, 3]
    gt_ignore = (gt_area < lo) | (gt_area > hi)
    det_idx, gt_idx = _group_pairs(det_key, gt_key)
    iou = coco_iou(det_xywh[det_idx], gt_xywh[gt_idx])
    ok = iou >= min(DEFAULT_IOU_THR, 1 - 1e-10)
    det_idx, gt_idx, iou = det_idx[ok], gt_idx[ok], iou[ok]
    preference = (-gt_idx, -iou, gt_ignore[gt_idx])  # regular first, then highest IoU, then the later object
    matched = greedy_match(det_idx, gt_idx, preference, det_key, pos, len(det_key), len(gt_key))
    det_area = det_xywh[:, 2] * det_xywh[:, 3]
    det_ignore = (det_area < lo) | (det_area > hi)
    hit = matched >= 0
    det_ignore[hit] = gt_ignore[matched[hit]]
    return matched, gt_ignore, det_ignore


def _per_class_ap(mode, pos, det_id, tp, det_ignore, gt_det_id, gt_ignore, **counts) -> DetectionResult:
    """PR curves and AP per class from matched detections (``tp`` bool[D]) in score order ``pos``.

    Devkit: ``tp = cumsum(tp)``, ``fp = cumsum(fp)``, ``recall = tp / num_pos``, ``precision = tp ./ (fp + tp)``,
    ``VOCap``. coco50: ignored detections count as neither, ``precision = tp / (tp + fp + eps)``, 101 points.
    """
    vocab = det200()
    order = np.lexsort((pos, det_id))  # by class, then score order
    det_id, tp, det_ignore = det_id[order], tp[order], det_ignore[order]
    fp = ~tp & ~det_ignore
    tp = tp & ~det_ignore
    starts = np.searchsorted(det_id, np.arange(1, 202))  # class c's detections: starts[c-1]:starts[c]
    positives = np.bincount(gt_det_id[~gt_ignore], minlength=201)
    ap_of = {"ilsvrc": voc_ap, "iou50": voc_ap, "voc07": voc07_ap, "coco50": coco_ap}[mode]
    eps = np.spacing(1) if mode == "coco50" else 0.0
    classes = []
    for row, c in enumerate(vocab.ids):
        n_pos, lo, hi = int(positives[c]), starts[c - 1], starts[c]
        if n_pos == 0 and hi == lo:
            continue
        tp_sum = np.cumsum(tp[lo:hi], dtype=np.float64)
        fp_sum = np.cumsum(fp[lo:hi], dtype=np.float64)
        recall = tp_sum / n_pos if n_pos else np.full(hi - lo, np.nan)
        precision = tp_sum / (tp_sum + fp_sum + eps) if hi > lo else tp_sum
        ap = ap_of(recall, precision) if n_pos else None
        classes.append(ClassAP(c, vocab.wnids[row], vocab.names[row], ap, n_pos, int(hi - lo), recall, precision))
    scored = [c.ap for c in classes if c.ap is not None]
    if not scored:
        raise ValueError("no ground-truth objects to score against (after the blacklist): the mAP is undefined")
    return DetectionResult(mode, float(np.mean(scored)), classes, **counts)


# ---- accumulator -----------------------------------------------------------------------------------------


class DetectionEvaluator:
    """ILSVRC detection mAP over a fixed set of annotated images, fed detections in any number of calls.

    Detections are scored in the order they were fed (ties in score fall back on it, as in the devkit's file).
    """

    def __init__(self, annotations: dict[int, ImageAnnotation], *, mode: str = "ilsvrc",
                 blacklist: Iterable[tuple[int, int]] = ()):
        """``annotations``: {imageset index: annotation}, as ``read_annotations`` returns; ``blacklist``:
        (image index, DET id) pairs, as ``read_blacklist`` returns."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
        if not annotations:
            raise ValueError("no annotated images to score against")
        self.gt = GroundTruth.from_annotations(annotations)
        self.mode = mode
        self.blacklist = frozenset(blacklist)
        self.reset()

    def reset(self) -> None:
        self._parts: list[DetectionTable] = []

    def process(self, detections: DetectionTable) -> None:
        self._parts.append(detections)

    def evaluate(self) -> DetectionResult:
        return score(self.gt, DetectionTable.concat(self._parts), self.mode, self.blacklist)


def evaluate_files(annotations_dir: str, imageset_path: str, predictions_path: str, *, mode: str = "ilsvrc",
                   blacklist_path: str | None = None, predictions_format: str | None = None
                   ) -> tuple[DetectionResult, Predictions]:
    """Score a predictions file against ILSVRC annotations (what ``ircnn eval det`` runs).

    Returns the result and the predictions as read (format, images of JSONL error lines).
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    imageset = read_imageset(imageset_path)
    evaluator = DetectionEvaluator(read_annotations(annotations_dir, imageset), mode=mode,
                                   blacklist=read_blacklist(blacklist_path) if blacklist_path else ())
    predictions = read_predictions(predictions_path, imageset, predictions_format)
    evaluator.process(predictions.detections)
    return evaluator.evaluate(), predictions
