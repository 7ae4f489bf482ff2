"""Region scorers: one image's regions -> ``Tensor[R, K + 1]`` DET probabilities, column 0 background.

``RegionScorer`` is the paper's: every region warped to the network input (R-CNN's warp with 16 px of context;
each member's own input size where they differ) and scored by the ensemble;
``detector.pipeline.shared_trunk.SharedTrunkScorer`` is the opt-in fast one. Both give ``det_ids``,
``cls_to_det``, ``ensemble``, ``score_regions(image, boxes)`` and ``score_frames(image, boxes, seconds)``, which
is what ``Detector`` asks of a scorer. ``contrast_frames`` combines a box's scores with its
context frame's (whole objects)."""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import Tensor

from detector.bundle.format import Bundle, Preprocess
from detector.config import DetectConfig
from detector.pipeline.classify import crop_views
from detector.pipeline.det_head import det_head
from detector.pipeline.ensemble import Ensemble
from detector.pipeline.warp import check_boxes, check_image, warp_frames, warp_regions


def fill_colour(preprocess: Preprocess) -> tuple[int, int, int]:
    """The uint8 RGB colour that normalises to (almost exactly) zero: ``round(255 * mean)``."""
    return tuple(int(np.floor(255.0 * m + 0.5)) for m in preprocess.mean)


class RegionScorer:
    """Warped regions of one image -> ``Tensor[R, K + 1]`` DET probabilities, column 0 background, column ``j``
    the DET id ``det_ids[j - 1]`` (module docstring for the two kinds of bundle).

    Members of different input sizes (``Bundle.member_size``) each see the regions warped at their own size, with
    the context scaled to it (``contexts``); the probabilities are averaged over all members. ``size`` and
    ``context`` are the first member's."""

    def __init__(self, bundle: Bundle, config: DetectConfig = DetectConfig()) -> None:
        self.det_ids, cls_to_det = det_head(bundle, config.person_evidence)  # det_ids: Tensor[K]
        self.size = bundle.member_size(0)
        # R-CNN's 16 px at 224, or config.context at the first member's size, scaled to each member input size
        self.contexts = {size: round(16 * size / 224) if config.context is None else
                         round(config.context * size / self.size) for size in bundle.input_sizes}
        self.context = self.contexts[self.size]
        for size, context in self.contexts.items():
            if not 2 * context < size:
                raise ValueError(f"context {context} leaves nothing of a {size} px input")
        self.config = config
        self.fill = fill_colour(bundle.preprocess)
        device = next(bundle.members[0].parameters()).device  # where load_bundle(..., device) put the members
        self.ensemble = Ensemble.from_bundle(bundle, config.ensemble).to(device)
        self.cls_to_det = None if cls_to_det is None else cls_to_det.to(device)  # [1000, K]
        self.cls_mapped = None if cls_to_det is None else (cls_to_det.sum(1) > 0).to(device)  # [1000]

    def runtimes(self) -> list[str]:
        """What each member runs on, as it runs: ``"onnxruntime fp32"``, ``"torch bf16 channels_last"``."""
        return [c.name for c in self.ensemble.choices]

    def to_det(self, probs: Tensor) -> Tensor:
        """Head probabilities ``Tensor[N, C]`` -> DET probabilities ``Tensor[N, K + 1]``, column 0 background."""
        if self.cls_to_det is None:
            return probs  # a det200 head already is background + K
        det = probs @ self.cls_to_det  # [N, K]: each DET class sums its CLS classes
        background = (1.0 - probs[:, self.cls_mapped].sum(dim=1, keepdim=True)).clamp_(min=0.0)  # [N, 1]
        return torch.cat([background, det], dim=1)

    def __call__(self, image: np.ndarray, boxes: Tensor) -> Tensor:
        """``image`` uint8 RGB ``[H, W, 3]``, ``boxes (Tensor[R, 4])`` -> ``Tensor[R, K + 1]`` on the CPU."""
        return self.score_regions(image, boxes)[0]

    @torch.inference_mode()
    def score_regions(self, image: np.ndarray, boxes: Tensor) -> tuple[Tensor, dict[str, float]]:
        """As ``__call__``, plus the seconds spent warping and in the networks."""
        check_image(image)
        boxes = check_boxes(boxes)
        if len(boxes) > self.config.max_regions:
            raise ValueError(f"{len(boxes)} regions; at most max_regions = {self.config.max_regions} per image")
        seconds = {"warp": 0.0, "networks": 0.0}
        source = self._source(image)
        n = len(self.ensemble.members)
        if self.config.cascade_top_k is None or n == 1:
            return self._run(source, boxes, seconds), seconds
        probs = self._run(source, boxes, seconds, members=[0])  # [R, K + 1] of member 0
        top = probs[:, 0].argsort()[: self.config.cascade_top_k]  # least background first
        if len(top):
            rest = self._run(source, boxes[top], seconds, members=list(range(1, n)))
            probs[top] = (probs[top] + (n - 1) * rest) / n  # the average over all n members
        return probs, seconds

    @torch.inference_mode()
    def score_image(self, image: np.ndarray, crops: int = 10) -> Tensor:
        """The whole image's DET probabilities ``Tensor[K + 1]`` (column 0 background), averaged over the paper's
        test-time ``crops`` (1 or 10: ``detector.pipeline.classify.crop_views``) and the members."""
        check_image(image)
        views = {size: crop_views(image, crops, size).to(self.ensemble.device)
                 for size, _ in self.ensemble.size_groups()}  # [crops, 3, size, size] at each member input size
        return self.to_det(self.ensemble.by_size(views).mean(0, keepdim=True)).float().cpu()[0]

    @torch.inference_mode()
    def score_frames(self, image: np.ndarray, boxes: Tensor, seconds: dict[str, float] | None = None) -> Tensor:
        """``boxes (Tensor[R, 4])`` -> ``Tensor[R, K + 1]``, the DET probabilities of each box's context frame
        (``detector.pipeline.warp.warp_frames``, ``config.frame_scale``), averaged over all members."""
        seconds = {"warp": 0.0, "networks": 0.0} if seconds is None else seconds
        check_image(image)
        return self._run(self._source(image), check_boxes(boxes), seconds, frames=True)

    def _source(self, image: np.ndarray):
        """What the warp reads: the image itself on the CPU, else uploaded once to the networks' device (the
        warp runs where the networks do)."""
        if self.ensemble.device.type == "cpu":
            return image
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).to(self.ensemble.device)

    def _run(self, source, boxes: Tensor, seconds: dict[str, float], members: list[int] | None = None,
             frames: bool = False) -> Tensor:
        sizes = [size for size, _ in self.ensemble.size_groups(members)]  # the input sizes of these members
        out = []
        for start in range(0, len(boxes), self.config.warp_chunk):
            t0 = time.perf_counter()
            chunk = boxes[start:start + self.config.warp_chunk]
            regions = {size: self._warp(source, chunk, size, frames) for size in sizes}
            if self.ensemble.device.type == "cuda":  # the warp is asynchronous: wait, or the networks get its time
                torch.cuda.synchronize(self.ensemble.device)
            t1 = time.perf_counter()
            out.append(self.to_det(self.ensemble.by_size(regions, members)).float().cpu())  # .cpu() waits for the GPU
            seconds["warp"] += t1 - t0
            seconds["networks"] += time.perf_counter() - t1
        if not out:
            return torch.zeros(0, len(self.det_ids) + 1)
        return torch.cat(out)

    def _warp(self, source, boxes: Tensor, size: int, frames: bool) -> Tensor:
        """The boxes' regions, or their context frames, at input side ``size``: ``Tensor[n, 3, size, size]`` uint8."""
        if frames:
            return warp_frames(source, boxes, size, self.config.frame_scale, self.fill)
        return warp_regions(source, boxes, size, self.contexts[size], self.fill)


def contrast_frames(probs: Tensor, frame_probs: Tensor) -> Tensor:
    """``probs``, ``frame_probs``: ``Tensor[R, K + 1]`` of the boxes and of their context frames -> the boxes'
    class scores ``p(box) * (1 - p(frame))`` (column 0, background, is kept as it was)."""
    out = probs.clone()
    out[:, 1:] = probs[:, 1:] * (1.0 - frame_probs[:, 1:]).clamp(min=0.0)
    return out


