"""R-CNN's training windows: every proposal of every training image labelled by its overlap with the ground
truth, and the mini-batches drawn from them (Girshick et al. 2014, section 2.3, and its Caffe window data layer).

- **Labels**: a proposal whose IoU with a ground-truth box is >= ``fg_iou`` (0.5) takes that box's class (the box
  with the highest IoU); every other proposal is background. Ground-truth boxes are added as positives.
- **Mini-batches**: ``fg_per_batch`` foreground windows in a per-epoch random order (one pass over them per
  epoch) and the rest background windows drawn uniformly with replacement from an IoU range, each batch drawn
  over all training images, not a fixed number of images per batch; which windows batch ``b`` of epoch ``e``
  takes on rank ``r``, and its flips, are a function of (seed, e, b, r).
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.ops import box_iou

from detector.image import read_image
from detector.pipeline.warp import warp_regions
from detector.training.proposal_cache import CachedProposals
from eval.annotations import read_det_split

IMAGE_SUFFIX = ".JPEG"  # ILSVRC DET images: Data/DET/<name>.JPEG


@dataclass(frozen=True)
class DetImage:
    path: Path  # Data/DET/<name>.JPEG
    width: int  # as annotated
    height: int
    boxes: np.ndarray  # float32 [M, 4] x1, y1, x2, y2 in annotated pixels
    det_ids: np.ndarray  # int64 [M]


def read_detection_split(root: str | os.PathLike, imageset: str) -> list[DetImage]:
    """The images of an ILSVRC-format imageset with their ground truth, in imageset order."""
    root = Path(root)
    return [DetImage(root / "Data" / "DET" / (name + IMAGE_SUFFIX), a.width, a.height,
                     a.boxes.astype(np.float32).reshape(-1, 4), a.det_ids.astype(np.int64))
            for name, a in read_det_split(str(root), imageset)]


@dataclass
class Windows:
    """Every candidate window of the training set, flat (one row each)."""

    image: np.ndarray  # int32 [W]: index into the image list
    boxes: np.ndarray  # float32 [W, 4] in decoded-image pixels
    label: np.ndarray  # int64 [W]: 0 background, j = column of the class (1..K)
    iou: np.ndarray  # float32 [W]: highest IoU with a ground-truth box (1 for the ground truth itself)
    gt: np.ndarray  # bool [W]: a ground-truth box added as a positive


def label_windows(proposals: np.ndarray, gt_boxes: np.ndarray, gt_columns: np.ndarray,
                  fg_iou: float = 0.5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """R-CNN's labels for one image. ``proposals (float32 [N, 4])``, ``gt_boxes (float32 [M, 4])``,
    ``gt_columns (int64 [M])`` the head column of each object (1..K).

    Returns ``(boxes [N + M, 4], label int64 [N + M], iou float32 [N + M])`` with the ground truth appended:
    a window takes the column of the object it overlaps most when that IoU is >= ``fg_iou``, else 0.
    """
    proposals = np.asarray(proposals, np.float32).reshape(-1, 4)
    gt_boxes = np.asarray(gt_boxes, np.float32).reshape(-1, 4)
    boxes = np.concatenate([proposals, gt_boxes])
    if len(gt_boxes) == 0:
        return boxes, np.zeros(len(boxes), np.int64), np.zeros(len(boxes), np.float32)
    iou = box_iou(torch.from_numpy(boxes), torch.from_numpy(gt_boxes)).numpy()  # [N + M, M]
    best, which = iou.max(1), iou.argmax(1)
    best[len(proposals):] = 1.0  # a ground-truth box is its own object (even where two objects coincide)
    which[len(proposals):] = np.arange(len(gt_boxes))
    label = np.where(best >= fg_iou, np.asarray(gt_columns, np.int64)[which], 0)
    return boxes, label, best.astype(np.float32)


def build_windows(images: list[DetImage], proposals: list[CachedProposals], column_of: dict[int, int],
                  fg_iou: float) -> Windows:
    """All windows of all images; ground truth scaled to the decoded size where the annotation's differs."""
    parts = []
    for i, (im, props) in enumerate(zip(images, proposals)):
        h, w = props.size
        scale = np.array([w / im.width, h / im.height] * 2, np.float32)
        gt = im.boxes * scale
        boxes, label, iou = label_windows(props.boxes, gt, np.array([column_of[int(c)] for c in im.det_ids],
                                                                    np.int64), fg_iou)
        is_gt = np.zeros(len(boxes), bool)
        is_gt[len(props.boxes):] = True
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        parts.append((np.full(int(keep.sum()), i, np.int32), boxes[keep], label[keep], iou[keep], is_gt[keep]))
    cat = [np.concatenate([p[k] for p in parts]) for k in range(5)]
    return Windows(cat[0], cat[1].reshape(-1, 4), cat[2], cat[3], cat[4])


class WindowSampler:
    """R-CNN's mini-batches: ``fg`` foreground windows in a per-epoch random order (one pass over them per epoch)
    and ``batch - fg`` background windows drawn uniformly with replacement from those with IoU in
    ``[bg_low, bg_high)``; batch ``b`` of epoch ``e`` on rank ``r`` depends only on (seed, e, b, r)."""

    def __init__(self, windows: Windows, batch_size: int, fg_per_batch: int, bg_iou: tuple[float, float],
                 seed: int, world: int = 1) -> None:
        self.fg = np.flatnonzero(windows.label > 0)
        bg = windows.label == 0
        self.bg = np.flatnonzero(bg & (windows.iou >= bg_iou[0]) & (windows.iou < bg_iou[1]))
        if len(self.fg) == 0:
            raise ValueError("no foreground windows: the training images have no ground-truth objects")
        if len(self.bg) == 0:
            raise ValueError(f"no background windows with IoU in [{bg_iou[0]}, {bg_iou[1]}): the proposals all "
                             "overlap objects; check the proposal settings")
        self.batch_size, self.fg_per_batch, self.seed, self.world = batch_size, fg_per_batch, seed, world
        self.steps_per_epoch = max(1, math.ceil(len(self.fg) / (fg_per_batch * world)))

    def batch(self, epoch: int, step: int, rank: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Window indices ``int64 [batch]`` (foreground first) and horizontal-flip draws ``float64 [batch]``."""
        order = np.random.default_rng([self.seed, epoch, 0]).permutation(len(self.fg))
        g = step * self.world + rank  # the global batch number
        take = np.arange(g * self.fg_per_batch, (g + 1) * self.fg_per_batch) % len(order)
        rng = np.random.default_rng([self.seed, epoch, g + 1])
        bg = self.bg[rng.integers(0, len(self.bg), self.batch_size - self.fg_per_batch)]
        return np.concatenate([self.fg[order[take]], bg]), rng.random(self.batch_size)


class WindowBatches(Dataset):
    """Item ``b``: batch ``b`` of the current epoch as ``(uint8 Tensor[B, 3, S, S], labels int64 Tensor[B])``:
    windows warped by ``detector.pipeline.warp.warp_regions`` with ``context`` and flipped where the draw is < ``flip``."""

    def __init__(self, images: list[DetImage], windows: Windows, sampler: WindowSampler, size: int, context: int,
                 flip: float, fill: tuple[int, int, int], rank: int = 0, image_cache_mb: int = 512) -> None:
        self.images, self.windows, self.sampler = images, windows, sampler
        self.size, self.context, self.flip, self.fill, self.rank = size, context, flip, fill, rank
        self.epoch = 0
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cache_bytes, self._cache_limit = 0, image_cache_mb << 20

    def __len__(self) -> int:
        return self.sampler.steps_per_epoch

    def _image(self, i: int) -> np.ndarray:
        pixels = self._cache.pop(i, None)
        if pixels is None:
            pixels = read_image(self.images[i].path)
            self._cache_bytes += pixels.nbytes
        self._cache[i] = pixels
        while self._cache_bytes > self._cache_limit and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cache_bytes -= old.nbytes
        return pixels

    def __getitem__(self, step: int) -> tuple[Tensor, Tensor]:
        index, draws = self.sampler.batch(self.epoch, step, self.rank)
        out = torch.empty(len(index), 3, self.size, self.size, dtype=torch.uint8)
        img_of = self.windows.image[index]
        for i in np.unique(img_of):
            rows = np.flatnonzero(img_of == i)
            boxes = torch.from_numpy(self.windows.boxes[index[rows]])
            out[torch.from_numpy(rows)] = warp_regions(self._image(int(i)), boxes, self.size, self.context,
                                                       self.fill)
        flip = torch.from_numpy(draws < self.flip)
        out[flip] = out[flip].flip(-1)
        return out, torch.from_numpy(self.windows.label[index])


def object_recall(windows: Windows, iou: float) -> float:
    """Share of ground-truth objects that some proposal (not the ground truth itself) covers at ``iou``."""
    found = total = 0
    for i in np.unique(windows.image[windows.gt]):
        rows = windows.image == i
        gt = torch.from_numpy(windows.boxes[rows & windows.gt])
        props = torch.from_numpy(windows.boxes[rows & ~windows.gt])
        total += len(gt)
        if len(props):
            found += int((box_iou(gt, props).max(1).values >= iou).sum())
    return found / max(total, 1)
