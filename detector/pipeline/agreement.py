"""Whole objects from the agreement of overlapping regions (``DetectConfig.agreement``), for classifiers that never
learnt a background class (``det200-from-cls1000`` bundles).

Such a classifier scores an object's most telling part (a cat's face, an orange's peel, a man's suit) as high as the
whole, so the best-scoring box of a class is often a part. But every region that shows some of the object scores
the class: averaged over all the regions that cover a pixel, the class's scores make a map of where the object is
(``vote_maps``: at each pixel, the mean score of the regions covering it). A box is then scored by how well it holds
that map (``box_agreement``): the share of the map's mass inside the box (low for a part) times the map's mean
inside the box relative to its peak (low for a box much larger than the object). The detector multiplies each
region's class score by this factor (to the power ``DetectConfig.agreement``) before NMS.

It needs no network run beyond the regions' own scores (a few milliseconds per image), and replaced the context
frames (``DetectConfig.context_frames``), which cost 300 extra regions per image: on the dev split of the
package photos it raised devkit mAP from 0.335 to 0.429 and cut the best score on photos without DET objects from
0.88 to 0.17 (docs/detection.md, "Whole objects").
"""

from __future__ import annotations

import torch
from torch import Tensor

STRIDE = 8  # the maps' cell, in image pixels
MIN_SCORE = 0.01  # classes whose best region scores below this get no map (their factor is 0)


def vote_maps(boxes: Tensor, scores: Tensor, height: int, width: int, stride: int = STRIDE) -> Tensor:
    """``boxes (Tensor[R, 4])`` x1, y1, x2, y2 in pixels, ``scores (Tensor[R, C])`` -> ``Tensor[C, h, w]`` with
    ``h = max(1, height // stride)`` (``w`` alike): at each cell, the mean score of the regions that cover it (0
    where none does). Summed-area tables: O(R * C + h * w * C)."""
    h, w = max(1, height // stride), max(1, width // stride)
    c = scores.shape[1]
    b = (boxes.float() / stride).round().long()
    x1, y1 = b[:, 0].clamp(0, w - 1), b[:, 1].clamp(0, h - 1)
    x2, y2 = b[:, 2].clamp(max=w).maximum(x1 + 1), b[:, 3].clamp(max=h).maximum(y1 + 1)
    values = torch.cat([scores.float(), torch.ones(len(boxes), 1)], 1).T.contiguous()  # [C + 1, R]: the count last
    acc = torch.zeros(c + 1, (h + 1) * (w + 1))
    for ys, xs, sign in ((y1, x1, 1.0), (y1, x2, -1.0), (y2, x1, -1.0), (y2, x2, 1.0)):
        acc.index_add_(1, ys * (w + 1) + xs, sign * values)
    acc = acc.view(c + 1, h + 1, w + 1).cumsum(1).cumsum(2)[:, :h, :w]
    return acc[:c] / acc[c:].clamp(min=1.0)


def box_agreement(boxes: Tensor, maps: Tensor, stride: int = STRIDE) -> Tensor:
    """``boxes (Tensor[R, 4])``, ``maps (Tensor[C, h, w])`` -> ``Tensor[R, C]`` in 0..1: (the map's mass inside
    the box / its total mass) * (its mean inside the box / its peak)."""
    c, h, w = maps.shape
    integral = torch.zeros(c, h + 1, w + 1)
    integral[:, 1:, 1:] = maps.cumsum(1).cumsum(2)
    b = boxes.float() / stride
    x1, x2 = b[:, 0].clamp(0, w).floor().long(), b[:, 2].clamp(0, w).ceil().long()
    y1, y2 = b[:, 1].clamp(0, h).floor().long(), b[:, 3].clamp(0, h).ceil().long()
    inside = (integral[:, y2, x2] - integral[:, y1, x2] - integral[:, y2, x1] + integral[:, y1, x1]).T  # [R, C]
    total = integral[:, -1, -1].clamp(min=1e-9)
    area = ((x2 - x1) * (y2 - y1)).clamp(min=1).float()[:, None]
    peak = maps.flatten(1).max(1).values.clamp(min=1e-9)
    return ((inside / total) * (inside / area / peak)).clamp(0.0, 1.0)


def agreement_scores(boxes: Tensor, probs: Tensor, height: int, width: int, power: float = 1.0) -> Tensor:
    """``probs (Tensor[R, K + 1])`` of one image's regions (column 0 background) -> the same with each class column
    multiplied by ``box_agreement ** power``; classes that no region scores at least ``MIN_SCORE`` get 0."""
    out = probs.clone()
    if not len(boxes):
        return out
    scores = probs[:, 1:].float()
    cols = (scores.max(0).values >= MIN_SCORE).nonzero(as_tuple=True)[0]
    factor = torch.zeros_like(scores)
    if len(cols):
        factor[:, cols] = box_agreement(boxes, vote_maps(boxes, scores[:, cols], height, width))
    out[:, 1:] = scores * factor ** power
    return out
