"""MultiBox: K class-agnostic boxes, each with a confidence, from one pass of a network over the whole image.

Erhan et al., "Scalable object detection using deep neural networks" (CVPR 2014) and Szegedy et al., "Scalable,
high-quality object detection" (2014); "Going deeper with convolutions" section 8 adds its top 200 boxes to the
coarsened selective search proposals.

- **Network**: a trunk given as a module (the bundle code in ``detector/`` gives GoogLeNet's up to inception (5b),
  Erhan et al.'s and section 8's choice), its feature map average pooled to a ``grid x grid`` map (``grid=1`` is
  the classifier's global average pool), flattened, then two linear heads: ``K * 4`` box offsets and ``K``
  confidence logits.
- **Input**: the whole image resized to ``size x size`` (the aspect ratio is not kept: box coordinates are
  normalised by the image's own width and height, so a box's relative place is the same in both), batched,
  normalised by the ``transform`` module given with the trunk, channels-last.
- **Priors and parametrisation**: box ``k`` is ``prior_k + delta_k``, all four corners ``x1, y1, x2, y2``
  normalised to [0, 1] by the image width and height (Erhan et al. section 3.3: the network predicts residuals to
  the priors). Chosen over (cx, cy, log w, log h) because the loss is L2 on these very coordinates: an output of
  zero is the prior, the box head starts at zero so training starts from the priors, and the loss measures the
  output directly. The priors are k-means centres of the training ground-truth boxes in the same coordinates
  (``kmeans_priors``), kept as the ``priors`` buffer in the state dict.
- **Loss** (``multibox_loss``): Erhan et al.'s. Per image, predictions are matched one-to-one to the ground-truth
  boxes by the Hungarian algorithm on ``alpha / 2 * ||l_i - g_j||^2 - log c_i + log(1 - c_i)`` (location and
  confidence together; the confidence part is just ``-logit_i``), then
  ``alpha / 2 * sum ||l_i - g_j||^2`` over matched pairs plus the logistic loss of every confidence (target 1 for a
  matched prediction, 0 otherwise). With ``priors=`` the matching is by location to the priors instead ("training
  with priors"), which is what training uses by default (``detector/training/multibox.py`` says why).

Boxes leave ``MultiBox.propose`` in the project convention: ``float32 Tensor[K, 4]`` ``x1, y1, x2, y2`` in
original pixels, clipped to the image.

``detector/bundle/multibox.py`` builds the GoogLeNet trunk and keeps the weights in a model bundle
(``multibox.safetensors``); this module imports nothing else of the project.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

ALPHA = 0.3  # Erhan et al.: weight of the location term
KMEANS_MAX_POINTS = 100_000  # k-means runs on a seeded sample of at most this many boxes
PRIOR_JITTER = 0.02  # std of the noise on repeated priors when there are fewer distinct boxes than K


@dataclass(frozen=True)
class HeadConfig:
    k: int = 200  # boxes per image; section 8 adds "200 region proposals coming from multi-box"
    size: int = 224  # network input side; the whole image is resized to size x size
    grid: int = 1  # trunk features average pooled to grid x grid before the heads; 1 = global average pool

    def __post_init__(self) -> None:
        if not isinstance(self.k, int) or not 1 <= self.k <= 10_000:
            raise ValueError(f"k must be an int in 1..10000, got {self.k!r}")
        if not isinstance(self.size, int) or not 32 <= self.size <= 1024:
            raise ValueError(f"size must be an int in 32..1024, got {self.size!r}")
        if not isinstance(self.grid, int) or not 1 <= self.grid <= 7:
            raise ValueError(f"grid must be an int in 1..7, got {self.grid!r}")


# ---- priors ----------------------------------------------------------------------------------------------


def _check_normalised(boxes: np.ndarray, what: str) -> np.ndarray:
    boxes = np.asarray(boxes, dtype=np.float64)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{what} must have shape [N, 4], got {list(boxes.shape)}")
    if not np.isfinite(boxes).all():
        raise ValueError(f"{what} contain NaN or infinite coordinates")
    if len(boxes) and (boxes.min() < -1e-6 or boxes.max() > 1 + 1e-6):
        raise ValueError(f"{what} must be normalised to [0, 1], got values in [{boxes.min():.3g}, {boxes.max():.3g}]")
    if (boxes[:, 2:] < boxes[:, :2]).any():
        raise ValueError(f"{what} need x2 >= x1 and y2 >= y1")
    return boxes


def _tidy(boxes: np.ndarray) -> np.ndarray:
    """Clip to [0, 1] and order each box's corners, ``array[N, 4] -> array[N, 4]``."""
    boxes = np.clip(boxes, 0.0, 1.0)
    return np.concatenate([np.minimum(boxes[:, :2], boxes[:, 2:]), np.maximum(boxes[:, :2], boxes[:, 2:])], 1)


def _sq_dist(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances ``[N, 4] x [k, 4] -> [N, k]`` without an ``[N, k, 4]`` intermediate."""
    return np.maximum((x * x).sum(1)[:, None] - 2.0 * x @ c.T + (c * c).sum(1)[None, :], 0.0)


def kmeans_priors(boxes_normalised: np.ndarray, k: int, seed: int = 0, iterations: int = 100) -> np.ndarray:
    """K prior boxes: k-means centres of ground-truth boxes, ``x1, y1, x2, y2`` normalised to [0, 1].

    Clustering is on the four corners, the coordinates the loss measures. k-means++ seeding, then Lloyd iterations
    until no box changes cluster (at most ``iterations``); an emptied cluster restarts at the box farthest from its
    centre. More than ``KMEANS_MAX_POINTS`` boxes: a seeded sample of that many is clustered.
    With fewer distinct boxes than ``k``, every distinct box is a prior and the others are copies of them (drawn
    with the seed) moved by Gaussian noise of std ``PRIOR_JITTER``, clipped to [0, 1]: still K boxes, near the
    data, and not identical (identical priors would give identical predictions).

    Args:
        boxes_normalised (array[N, 4]): ground truth, N >= 1.
    Returns:
        float32 array[k, 4], sorted by area, largest first. The same inputs and seed give the same priors.
    """
    boxes = _check_normalised(boxes_normalised, "boxes_normalised")
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if len(boxes) == 0:
        raise ValueError("k-means priors need at least one ground-truth box; the training set has none")
    rng = np.random.default_rng(seed)
    distinct = np.unique(boxes, axis=0)  # sorted: the result does not depend on the input order
    if len(distinct) <= k:
        extra = distinct[rng.integers(len(distinct), size=k - len(distinct))]
        centres = np.concatenate([distinct, _tidy(extra + rng.normal(0.0, PRIOR_JITTER, extra.shape))])
    else:
        x = boxes[np.lexsort(boxes.T[::-1])]  # sorted, so the sample and the seeding do not depend on input order
        if len(x) > KMEANS_MAX_POINTS:
            x = x[np.sort(rng.choice(len(x), KMEANS_MAX_POINTS, replace=False))]
        centres = _kmeans(x, k, rng, iterations)
    area = (centres[:, 2] - centres[:, 0]) * (centres[:, 3] - centres[:, 1])
    return centres[np.argsort(-area, kind="stable")].astype(np.float32)


def _kmeans(x: np.ndarray, k: int, rng: np.random.Generator, iterations: int) -> np.ndarray:
    """Lloyd's k-means with k-means++ seeding on ``x (array[N, 4])`` having at least ``k`` distinct rows."""
    centres = np.empty((k, 4))
    centres[0] = x[rng.integers(len(x))]
    d2 = _sq_dist(x, centres[:1])[:, 0]  # [N] squared distance to the nearest centre so far
    for i in range(1, k):
        centres[i] = x[rng.choice(len(x), p=d2 / d2.sum())]
        d2 = np.minimum(d2, _sq_dist(x, centres[i:i + 1])[:, 0])
    assign = None
    for _ in range(iterations):
        dist = _sq_dist(x, centres)  # [N, k]
        new = dist.argmin(1)
        if assign is not None and np.array_equal(new, assign):
            break
        assign = new
        counts = np.bincount(assign, minlength=k)
        sums = np.zeros((k, 4))
        np.add.at(sums, assign, x)
        for empty in np.flatnonzero(counts == 0):
            far = int(dist[np.arange(len(x)), assign].argmax())
            sums[empty], counts[empty] = x[far], 1
            dist[far, assign[far]] = 0.0
        centres = sums / counts[:, None]
    return _tidy(centres)


# ---- network ---------------------------------------------------------------------------------------------


def resize_image(image: np.ndarray, size: int) -> Tensor:
    """``uint8 [H, W, 3]`` -> ``uint8 Tensor[3, size, size]``, anisotropic antialiased bilinear resize."""
    img = torch.from_numpy(np.array(image, copy=True, order="C")).permute(2, 0, 1)  # [3, H, W]; a copy: callers
    return TF.resize(img, [size, size], antialias=True)  # may pass read-only or flipped (negative-stride) views


def _check_images(images: list[np.ndarray]) -> None:
    if not isinstance(images, (list, tuple)):
        raise TypeError(f"images must be a list of uint8 [H, W, 3] arrays, got {type(images).__name__}")
    for i, image in enumerate(images):
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            what = f"{image.dtype} {list(image.shape)}" if isinstance(image, np.ndarray) else type(image).__name__
            raise ValueError(f"images[{i}] must be a uint8 RGB array [H, W, 3], got {what}")
        if min(image.shape[:2]) < 1:
            raise ValueError(f"images[{i}] has no pixels ({image.shape[1]}x{image.shape[0]})")


class MultiBox(nn.Module):
    """A trunk plus box and confidence heads (module docstring).

    Args:
        trunk: ``Tensor[B, 3, S, S]`` network input -> feature map ``Tensor[B, channels, h, w]``; a module, so its
            weights are the state dict's ``trunk.*``.
        channels: the trunk's output channels.
        transform: ``uint8 Tensor[B, 3, S, S]`` -> float32 network input, on the model's device (the
            normalisation the trunk was trained with); its constants, if any, are not part of the state dict.
        head: K, the input side and the pooling grid.
        priors (array or Tensor[K, 4]): normalised prior boxes; ``None`` gives K whole-image boxes, a placeholder
            until ``kmeans_priors`` or a loaded state dict sets them.

    ``forward(Tensor[B, 3, S, S] normalised)`` returns ``(boxes Tensor[B, K, 4], logits Tensor[B, K])``, boxes as
    normalised corners ``prior + delta``, logits before the sigmoid. ``propose`` takes images and returns boxes in
    pixels.
    """

    def __init__(self, trunk: nn.Module, channels: int, transform: nn.Module, head: HeadConfig = HeadConfig(),
                 priors: np.ndarray | Tensor | None = None) -> None:
        super().__init__()
        self.head_config = head
        k = head.k
        if priors is None:
            priors = np.tile([0.0, 0.0, 1.0, 1.0], (k, 1))
        priors = _check_normalised(torch.as_tensor(priors).detach().cpu().numpy(), "priors")
        if len(priors) != k:
            raise ValueError(f"priors must have shape [{k}, 4] for k = {k}, got {list(priors.shape)}")
        self.register_buffer("priors", torch.tensor(priors, dtype=torch.float32))  # [K, 4]

        self.trunk = trunk
        features = channels * head.grid ** 2
        self.box_head = nn.Linear(features, 4 * k)
        self.conf_head = nn.Linear(features, k)
        # Start at the priors (zero offsets) with every confidence at 1 / (1 + K), about the share of predictions
        # that a few objects per image can match, so the first steps are not spent unlearning a 0.5 confidence.
        nn.init.zeros_(self.box_head.weight)
        nn.init.zeros_(self.box_head.bias)
        nn.init.normal_(self.conf_head.weight, std=0.01)
        nn.init.constant_(self.conf_head.bias, -math.log(k) if k > 1 else 0.0)
        self.transform = transform
        self.to(memory_format=torch.channels_last)

    @property
    def device(self) -> torch.device:
        return self.priors.device

    def normalize(self, images: Tensor) -> Tensor:
        """``uint8 Tensor[B, 3, S, S]`` -> float32 channels-last network input on the model's device."""
        x = self.transform(images.to(self.device, non_blocking=True))
        return x.contiguous(memory_format=torch.channels_last)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        f = torch.flatten(F.adaptive_avg_pool2d(self.trunk(x), self.head_config.grid), 1)  # [B, C * grid^2]
        delta = self.box_head(f).view(-1, self.head_config.k, 4)  # [B, K, 4]
        return self.priors + delta, self.conf_head(f)

    def propose(self, images: list[np.ndarray], batch_size: int = 32) -> list[tuple[Tensor, Tensor]]:
        """K boxes with confidences per image, in eval mode and under ``torch.inference_mode()``.

        Args:
            images: uint8 RGB arrays ``[H, W, 3]`` of any sizes.
        Returns:
            per image ``(boxes Tensor[K, 4], scores Tensor[K])``: float32 ``x1, y1, x2, y2`` in the image's pixels,
            clipped to it, and sigmoid confidences in [0, 1], sorted by confidence (highest first). Exactly K.
        """
        _check_images(images)
        if not 1 <= batch_size <= 1024:
            raise ValueError(f"batch_size must be in 1..1024, got {batch_size}")
        was_training = self.training
        self.eval()
        out = []
        try:
            with torch.inference_mode():
                for start in range(0, len(images), batch_size):
                    chunk = images[start:start + batch_size]
                    x = self.normalize(torch.stack([resize_image(im, self.head_config.size) for im in chunk]))
                    boxes, logits = self(x)
                    for image, b, c in zip(chunk, boxes.float().cpu(), logits.float().cpu()):
                        out.append(_to_pixels(b, c, image.shape[1], image.shape[0]))
        finally:
            self.train(was_training)
        return out


def _to_pixels(boxes: Tensor, logits: Tensor, width: int, height: int) -> tuple[Tensor, Tensor]:
    """Normalised ``Tensor[K, 4]`` and logits ``Tensor[K]`` -> pixel boxes and confidences, best first."""
    boxes = torch.cat([torch.minimum(boxes[:, :2], boxes[:, 2:]), torch.maximum(boxes[:, :2], boxes[:, 2:])], 1)
    boxes = boxes.clamp(0.0, 1.0) * torch.tensor([width, height, width, height], dtype=torch.float32)
    scores, order = torch.sigmoid(logits).sort(descending=True, stable=True)
    return boxes[order].contiguous(), scores


# ---- loss ------------------------------------------------------------------------------------------------


def match(boxes: Tensor, logits: Tensor | None, gt: Tensor, alpha: float = ALPHA) -> tuple[np.ndarray, np.ndarray]:
    """Erhan et al.'s bipartite matching of one image, by the Hungarian algorithm.

    Cost of prediction i for ground truth j: ``alpha / 2 * ||l_i - g_j||^2 - log c_i + log(1 - c_i)``, where the
    confidence part is ``-logit_i``; with ``logits=None`` the location part alone (matching to the priors).
    Args: ``boxes (Tensor[K, 4])`` the locations ``l``, ``logits (Tensor[K])``, ``gt (Tensor[M, 4])``, all
    normalised. Returns the matched prediction indices and their ground-truth indices, ``min(K, M)`` each, rows
    ascending.
    """
    cost = 0.5 * alpha * torch.cdist(boxes.detach().double(), gt.detach().double()).square()  # [K, M]
    if logits is not None:
        cost = cost - logits.detach().double()[:, None]
    rows, cols = linear_sum_assignment(cost.cpu().numpy())
    return rows, cols


def multibox_loss(pred_boxes: Tensor, pred_logits: Tensor, gt: list[Tensor], alpha: float = ALPHA,
                  priors: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
    """Erhan et al.'s loss, summed over each image's predictions and averaged over the images.

    ``alpha / 2 * sum ||l_i - g_j||^2`` over the matched pairs (``match``) plus the logistic loss of every
    confidence, target 1 for matched predictions and 0 for the others (an image without ground truth pushes all
    its confidences to 0).

    Args:
        pred_boxes (Tensor[B, K, 4]): normalised corners. pred_logits (Tensor[B, K]): confidences before the sigmoid.
        gt: per image ``Tensor[M_b, 4]`` normalised ground truth, ``M_b`` may be 0.
        priors (Tensor[K, 4]): if given, each image's ground truth is matched to the priors by location alone
            (Erhan et al.'s "training with priors", ``x* = argmin F_match(x, priors)``) instead of to the
            predictions by location and confidence; the loss of the matched pairs is the same.
    Returns:
        the loss (a scalar tensor) and floats ``loss``, ``location``, ``confidence`` (their batch means) and
        ``matched`` (matched pairs per image).
    """
    if pred_boxes.dim() != 3 or pred_boxes.shape[2] != 4 or pred_logits.shape != pred_boxes.shape[:2]:
        raise ValueError(f"expected boxes [B, K, 4] and logits [B, K], got {list(pred_boxes.shape)} and "
                         f"{list(pred_logits.shape)}")
    if len(gt) != len(pred_boxes):
        raise ValueError(f"{len(gt)} ground-truth tensors for a batch of {len(pred_boxes)}")
    targets = torch.zeros_like(pred_logits)
    location = pred_boxes.new_zeros(())
    matched = 0
    for b, g in enumerate(gt):
        if len(g) == 0:
            continue
        g = g.to(pred_boxes)
        if priors is None:
            rows, cols = match(pred_boxes[b], pred_logits[b], g, alpha)
        else:
            rows, cols = match(priors, None, g, alpha)
        rows_t = torch.as_tensor(rows, device=pred_boxes.device)
        cols_t = torch.as_tensor(cols, device=pred_boxes.device)
        location = location + 0.5 * alpha * (pred_boxes[b, rows_t] - g[cols_t]).square().sum()
        targets[b, rows_t] = 1.0
        matched += len(rows)
    batch = len(pred_boxes)
    location = location / batch
    confidence = F.binary_cross_entropy_with_logits(pred_logits, targets, reduction="sum") / batch
    loss = location + confidence
    stats = {"loss": float(loss.detach()), "location": float(location.detach()),
             "confidence": float(confidence.detach()), "matched": matched / batch}
    return loss, stats
