"""R-CNN detection as in the paper's section 8: proposals, warped regions classified by an ensemble, per-class NMS.

"The approach is similar to R-CNN, augmented with the Inception model as the region classifier" ... "we did not
employ bounding box regression". One image goes through

    proposals (selective search 2x + MultiBox, ``proposals.combine``)  ->  warp (``detector.pipeline.warp``)
    ->  ensemble softmax averaged over members (``detector.pipeline.ensemble``)  ->  DET scores  ->  per-class NMS

Two kinds of bundle give DET scores (``RegionScorer``):

- ``det200``: members with a ``K + 1``-way head, column 0 background, column ``j`` the DET id
  ``provenance["det_ids"][j - 1]`` (default ``1..200`` when ``K = 200``), e.g. fine-tuned by ``ircnn train
  detector``.
- ``det200-from-cls1000`` (and plain ``cls1000``, which maps the same way): ImageNet 1000-way classifiers. DET
  class ``d``'s score is the sum of the ensemble-averaged probabilities of its CLS classes
  (``eval/data/det200_from_cls1000.tsv``: the CLS synsets that are ``d`` or its WordNet hyponyms; no CLS class
  belongs to two DET classes), background is ``1 -`` the sum over every mapped CLS class. So torchvision's
  ImageNet weights detect the 200 classes without training; the 517 CLS classes that no DET class covers count
  as background.

NMS follows R-CNN: each class on its own, greedy, a box dropped when its IoU with a better one of the same class
is above ``nms_iou`` (0.3). Then the ``score_threshold`` and the ``max_detections`` best of the image are kept.

Whole objects (``DetectConfig.whole_objects``, not in the paper): an ImageNet classifier used without detection
training scores an object's most telling part (a cat's face) above the whole object, and NMS keeps both because
their IoU is small. For such bundles the detector, by default, (1) multiplies each region's class scores by how
well its box holds the map of where the image's regions agree on the class (``detector.pipeline.agreement``), and
(2) after NMS drops a detection lying mostly inside a larger, nearly as confident one of its class. Context frames
(ContextLocNet's contrast, the default before agreement) remain an option (``context_frames``), and so does
image-level context (``image_context``). ``bench/trust.py`` measures each on the package photos' dev split.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import batched_nms

from detector.bundle.format import Bundle
from detector.bundle.multibox import load_multibox
from detector.config import IMAGE_GATE, IMAGE_POWER, DetectConfig
from detector.image import read_image
from detector.pipeline.agreement import agreement_scores
from detector.pipeline.scoring import RegionScorer, contrast_frames
from detector.pipeline.shared_trunk import SharedTrunkScorer
from detector.pipeline.warp import check_boxes, check_image
from eval.records import detections_json
from proposals.combine import ProposalGenerator, Proposals

MIN_SIDE = 1.0  # proposals narrower or lower than this (after clipping to the image) are not scored


@dataclass
class Detections:
    """One image's detections, best first: ``boxes (Tensor[D, 4])`` float32 x1, y1, x2, y2 in the image's
    pixels, ``scores (Tensor[D])``, ``det_ids (Tensor[D])`` int64 ILSVRC DET ids 1..200; ``seconds`` per stage
    (``selective_search``, ``multibox``, ``warp``, ``networks``, ``nms``); ``regions``: proposals scored."""

    boxes: Tensor
    scores: Tensor
    det_ids: Tensor
    seconds: dict[str, float] = field(default_factory=dict)
    regions: int = 0

    def __len__(self) -> int:
        return len(self.boxes)

    def to_json(self) -> list[dict]:
        """``[{"box": [x1, y1, x2, y2], "det_id", "wnid", "name", "score"}, ...]`` (the `ircnn detect --json` shape)."""
        return detections_json(self.boxes, self.scores, self.det_ids)


def suppress_parts(dets: Detections, overlap: float, ratio: float) -> Detections:
    """Drop each detection that is a part of a same-class detection: at least ``overlap`` of its box's area lies
    inside a larger box of its class that scores at least ``ratio`` times as high. Weakly supervised localisation
    sees this failure throughout (a classifier's most confident window is the most discriminative part: a cat's
    face, a mug's handle); per-class NMS keeps such parts because their IoU with the whole is small. ``dets`` sorted
    by score stays sorted."""
    if len(dets) < 2:
        return dets
    keep = torch.ones(len(dets), dtype=torch.bool)
    for det_id in dets.det_ids.unique():  # class by class: [D_c, D_c] pairs, never [D, D]
        rows = (dets.det_ids == det_id).nonzero(as_tuple=True)[0]
        if len(rows) < 2:
            continue
        boxes, scores = dets.boxes[rows], dets.scores[rows]
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])  # [n]
        lt = torch.maximum(boxes[:, None, :2], boxes[None, :, :2])  # [n, n, 2]
        rb = torch.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
        inter = (rb - lt).clamp(min=0).prod(dim=2)  # [n, n]: part i, whole j
        inside = inter / area.clamp(min=1e-6)[:, None] >= overlap
        larger = area[None, :] > area[:, None]
        strong = scores[None, :] >= ratio * scores[:, None]
        keep[rows[(inside & larger & strong).any(dim=1)]] = False
    return Detections(boxes=dets.boxes[keep], scores=dets.scores[keep], det_ids=dets.det_ids[keep],
                      seconds=dets.seconds, regions=dets.regions)


def postprocess(boxes: Tensor, probs: Tensor, det_ids: Tensor, config: DetectConfig = DetectConfig(),
                whole_objects: bool = False) -> Detections:
    """Per-class NMS, then (``whole_objects``) part suppression, then the per-image cap: what ``Detector.score``
    does with one image's scored regions (``boxes (Tensor[R, 4])``, ``probs (Tensor[R, K + 1])``)."""
    if not whole_objects:
        return nms_per_class(boxes, probs, det_ids, config)
    # parts go first, then the cap; parts are looked for among the 10 x max_detections best (at least 1000)
    wide = dataclasses.replace(config, max_detections=min(10_000, max(1000, 10 * config.max_detections)))
    dets = suppress_parts(nms_per_class(boxes, probs, det_ids, wide), config.part_overlap, config.part_ratio)
    n = config.max_detections
    return Detections(boxes=dets.boxes[:n], scores=dets.scores[:n], det_ids=dets.det_ids[:n])


def nms_per_class(boxes: Tensor, probs: Tensor, det_ids: Tensor, config: DetectConfig = DetectConfig()) -> Detections:
    """Per-class greedy NMS at ``config.nms_iou``, then the score threshold and the per-image cap.

    Args:
        boxes: ``Tensor[R, 4]`` x1, y1, x2, y2; probs: ``Tensor[R, K + 1]``, column 0 background;
        det_ids: ``Tensor[K]`` int64, the DET id of columns ``1..K``.
    Returns:
        ``Detections`` sorted by score, at most ``config.max_detections``.
    """
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    probs, det_ids = torch.as_tensor(probs), torch.as_tensor(det_ids)
    if probs.dim() != 2 or probs.shape[0] != len(boxes) or probs.shape[1] != len(det_ids) + 1:
        raise ValueError(f"probs must be [R, K + 1] = [{len(boxes)}, {len(det_ids) + 1}] for {len(boxes)} boxes "
                         f"and {len(det_ids)} det_ids, got {list(probs.shape)}")
    scores = probs[:, 1:].float()  # [R, K]
    region, column = (scores >= config.score_threshold).nonzero(as_tuple=True)  # candidate (region, class) pairs
    candidate_scores = scores[region, column]
    keep = batched_nms(boxes[region], candidate_scores, column, config.nms_iou)  # sorted by score, descending
    keep = keep[: config.max_detections]
    return Detections(boxes=boxes[region[keep]], scores=candidate_scores[keep],
                      det_ids=det_ids.to(torch.int64)[column[keep]])


@dataclass
class ImageResult:
    """One image through ``Detector.detect_many``: its ``source`` (the path, None for pixels), its pixels
    (``image``, None when it could not be read), its ``detections`` or the ``error`` that stopped it, and the
    seconds of each stage it went through (``decode``, ``selective_search``, ``multibox``, ``warp``, ``networks``,
    ``nms``)."""

    source: str | None
    image: np.ndarray | None
    detections: Detections | None = None
    error: Exception | None = None
    seconds: dict[str, float] = field(default_factory=dict)


class Detector:
    """The whole detector for one image at a time: the function the CLI, the batch runner and the service call.

    ``scorer`` scores warped regions, ``proposals`` makes them; ``config``'s NMS, threshold, cap and
    ``max_regions`` apply here (the scorer's own config covers warping and the networks). ``close()`` (or
    ``with``) stops the selective search worker process.
    """

    def __init__(self, scorer: RegionScorer | SharedTrunkScorer, proposals: ProposalGenerator,
                 config: DetectConfig = DetectConfig()) -> None:
        self.scorer = scorer
        self.proposals = proposals
        self.config = config
        # whole objects over parts for classifiers mapped to DET classes (no background class of their own)
        self.whole_objects = config.whole_objects == "on" or (config.whole_objects == "auto"
                                                              and scorer.cls_to_det is not None)

    @classmethod
    def from_bundle(cls, bundle: Bundle, config: DetectConfig = DetectConfig()) -> Detector:
        """The detector ``config`` describes over ``bundle``: the scorer from its members, proposals as
        ``config.proposals`` says (the bundle's MultiBox network, when it has one and MultiBox is on). The one
        place a ``Detector`` is assembled: the CLI, the batch runner, Ray workers and the service call it."""
        if config.scoring == "shared-trunk":
            scorer = SharedTrunkScorer(bundle, config, config.shared_trunk)
        else:
            scorer = RegionScorer(bundle, config)
        net = None
        if config.proposals.multibox and bundle.multibox is not None and bundle.path is not None:
            net = load_multibox(bundle.path, device=scorer.ensemble.device)
        if not config.proposals.selective_search and net is None:
            raise ValueError("no proposal source: selective search is off and the bundle has no MultiBox network "
                             "(train one with `ircnn train multibox`)")
        return cls(scorer, ProposalGenerator.from_config(config.proposals, net), config)

    def _propose(self, image: np.ndarray) -> tuple[Proposals, dict[str, float]]:
        check_image(image)
        return self.proposals(image)

    def propose(self, image: np.ndarray) -> Proposals:
        """``image`` uint8 RGB ``[H, W, 3]`` -> merged proposals (at most ``config.proposals.merge.max_proposals``;
        ``score`` takes the first ``config.max_regions``)."""
        return self._propose(image)[0]

    def regions(self, image: np.ndarray, proposals: Proposals | Tensor) -> Tensor:
        """The boxes ``score`` scores: the first ``config.max_regions`` proposals, clipped to the image, without
        those under ``MIN_SIDE`` px on a side. ``Tensor[R, 4]``."""
        h, w = check_image(image)
        boxes = proposals.boxes if isinstance(proposals, Proposals) else proposals
        boxes = check_boxes(boxes[: self.config.max_regions])
        boxes = torch.stack([boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h),
                             boxes[:, 2].clamp(0, w), boxes[:, 3].clamp(0, h)], dim=1)
        return boxes[((boxes[:, 2] - boxes[:, 0]) >= MIN_SIDE) & ((boxes[:, 3] - boxes[:, 1]) >= MIN_SIDE)]

    def score(self, image: np.ndarray, proposals: Proposals | Tensor) -> Detections:
        """Score the first ``config.max_regions`` proposals, clipped to the image, and keep the detections."""
        config = self.config
        boxes = self.regions(image, proposals)
        probs, seconds = self.scorer.score_regions(image, boxes)
        regions = len(boxes)
        if self.whole_objects and len(boxes) and config.context_frames:
            top = probs[:, 0].argsort()[: config.context_frames]  # least background first
            boxes, probs = boxes[top], contrast_frames(probs[top], self.scorer.score_frames(image, boxes[top], seconds))
        if self.whole_objects and len(boxes) and config.agreement:
            start = time.perf_counter()
            probs = agreement_scores(boxes, probs, image.shape[0], image.shape[1], config.agreement)
            seconds["agreement"] = time.perf_counter() - start
        if config.image_context and len(boxes):
            start = time.perf_counter()
            whole = self.scorer.score_image(image, config.image_crops)[1:]  # [K]
            probs = probs.clone()
            probs[:, 1:] *= (whole / IMAGE_GATE).clamp(max=1.0) ** IMAGE_POWER
            seconds["image"] = time.perf_counter() - start
        start = time.perf_counter()
        dets = postprocess(boxes, probs, self.scorer.det_ids, config, self.whole_objects)
        seconds["nms"] = time.perf_counter() - start
        dets.seconds, dets.regions = seconds, regions
        return dets

    def detect(self, image: np.ndarray) -> Detections:
        """Propose, then score: ``Detections`` with ``seconds`` for every stage."""
        proposals, seconds = self._propose(image)
        dets = self.score(image, proposals)
        dets.seconds = {**seconds, **dets.seconds}
        return dets

    def detect_many(self, images: Iterable[str | os.PathLike | np.ndarray]) -> Iterator[ImageResult]:
        """One ``ImageResult`` per image (a file path, or uint8 RGB pixels ``[H, W, 3]``), in order: the path
        every caller takes (``ircnn detect``, the HTTP service, Ray workers). The next image is decoded and
        proposed in a background thread while the networks score the current one. An image that cannot be used
        (unreadable, no proposals: ``ValueError`` or ``OSError``; too large for the GPU's memory) gets its error in
        its result, and the rest go on.
        """
        images = list(images)
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ircnn-prepare")
        try:
            pending = pool.submit(self._prepare, images[0]) if images else None
            for i in range(len(images)):
                result, proposals = pending.result()
                pending = pool.submit(self._prepare, images[i + 1]) if i + 1 < len(images) else None
                yield self._finish(result, proposals)
        finally:
            # An interrupted run must not wait for the next image's proposals; close() stops the search.
            pool.shutdown(wait=False, cancel_futures=True)

    def _prepare(self, item: str | os.PathLike | np.ndarray) -> tuple[ImageResult, Proposals | None]:
        source = None if isinstance(item, np.ndarray) else str(item)
        result = ImageResult(source, None)
        try:
            start = time.perf_counter()
            result.image = item if source is None else read_image(item)
            result.seconds["decode"] = time.perf_counter() - start
            proposals, seconds = self._propose(result.image)
            result.seconds.update(seconds)
            return result, proposals
        except (ValueError, OSError) as e:
            result.error = e
            return result, None

    def _finish(self, result: ImageResult, proposals: Proposals | None) -> ImageResult:
        if result.error is not None:
            return result
        try:
            dets = self.score(result.image, proposals)
        except (ValueError, torch.cuda.OutOfMemoryError) as e:  # this image's problem: the next may fit
            result.error = e
            return result
        dets.seconds = {**result.seconds, **dets.seconds}
        result.detections, result.seconds = dets, dets.seconds
        return result

    def runtimes(self) -> list[str]:
        """What each member's network runs on, as it runs (the runtime, precision and layout auto or the
        configuration chose), one string per member."""
        return self.scorer.runtimes()

    def close(self) -> None:
        self.proposals.close()

    def __enter__(self) -> Detector:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
