"""Drawing one image of the synthetic detection set (``eval.synth``) and its ground-truth boxes.

How an image is made (``render``), every random draw from ``numpy.random.default_rng([seed, index])`` so that an
image depends only on the seed and its own number (same seed -> byte-identical files, whatever the worker count):

- Background: a random crop of a real texture or photo (brick, grass, gravel, moon, text, page, Hubble deep field,
  immunohistochemistry, the wooden table of ``coffee``, the lawn of ``camera``), resized to the image, grey ones
  tinted. The longer image side is ``size`` px, the shorter 0.6..1.0 of it (landscape 3 times in 4).
- 0..6 objects and 0..3 distractors, pasted in random order (so either may cover the other). A class object is
  a photo cut out by a hand-drawn polygon (``eval.synth_photos.CLASSES``), scaled to a longer side log-uniform in
  ``[min_object, 0.95 * size]`` (16 px to most of the image), stretched by up to +-25% in aspect, flipped half the
  time, photometrically changed (brightness, contrast, saturation) and placed anywhere up to half outside the
  image. Distractors are not any DET class: the rocket, the space-shuttle model behind the astronaut, single coins,
  the blurred clock, the retina disc, the colour wheel, the scikit-image logo, and random polygons cut from
  textures.
- Ground truth: a pixel belongs to the last paste whose alpha there is >= 0.5. An object's box is the bounding box
  of its pixels that are still its own at the end (inside the image, not covered): truncated boxes are clipped to
  the image and occluded boxes shrink to the visible part. **Occlusion and truncation rule**: every annotated
  object keeps at least ``min_visible`` (30%) of its pasted pixels visible. A placement that would leave the new
  object, or any earlier object, below that is redrawn (up to 8 tries, then the item is left out), so no image
  shows an unannotated class object and no object is annotated from less than 30% of it. Small, truncated and
  occluded objects still give small boxes, but no annotated box is under ``min_box`` (16 px) on its shorter
  side: a placement that would make one so is redrawn too. Below about 14 px the devkit's small-object rule
  accepts IoU under 1/3, so a box moved by half its width would still count as found; the devkit's own tests
  of that rule use hand-made boxes (tests/eval/test_ilsvrc.py).
- Whole image: blur (3 in 10), brightness and contrast, Gaussian noise (1 in 2), JPEG quality 55..95.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from eval.synth_config import SynthConfig
from eval.synth_photos import CLASSES, Cutout, Sources, load_sources

# Chance of 0, 1, ..., 6 objects and of 0..3 distractors in an image.
_OBJECTS_P = (0.10, 0.28, 0.22, 0.15, 0.11, 0.08, 0.06)
_DISTRACTORS_P = (0.35, 0.30, 0.20, 0.15)
_TRIES = 8  # placements tried per item before it is left out
_BACKGROUND, _DISTRACTOR = -1, -2  # owner map values besides object numbers k >= 0


def _resize(img: np.ndarray, w: int, h: int) -> np.ndarray:
    shrink = w * h < img.shape[0] * img.shape[1]
    return cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def _background(rng: np.random.Generator, src: Sources, w: int, h: int) -> np.ndarray:
    img = src.backgrounds[rng.integers(len(src.backgrounds))]
    sh, sw = img.shape[:2]
    ch = int(sh * rng.uniform(0.35, 1.0))
    cw = int(min(sw, ch * w / h * math.exp(rng.uniform(-0.2, 0.2))))
    y0, x0 = rng.integers(sh - ch + 1), rng.integers(sw - cw + 1)
    out = _resize(img[y0:y0 + ch, x0:x0 + cw], w, h).astype(np.float32)
    if out.ndim == 2:
        tint = rng.uniform(0.7, 1.1) * rng.uniform(0.85, 1.15, size=3)  # grey sources get a mild colour
        out = out[:, :, None] * tint.astype(np.float32)
    if rng.random() < 0.5:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def _random_polygon(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """A star-shaped polygon filling most of a w x h box, as a uint8 alpha mask [h, w]."""
    k = rng.integers(3, 10)
    angles = np.sort(rng.uniform(0, 2 * np.pi, k))
    radii = rng.uniform(0.45, 1.0, k)
    pts = np.stack([(0.5 + 0.5 * radii * np.cos(angles)) * (w - 1), (0.5 + 0.5 * radii * np.sin(angles)) * (h - 1)], 1)
    mask = np.zeros((h, w), np.uint8)
    cv2.fillPoly(mask, [np.rint(pts).astype(np.int32)], 255)
    return mask


def _jitter(rgb: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Saturation, contrast and brightness change of float32 RGB [h, w, 3]; ``strength`` 1 = object level."""
    s = 1 + strength * rng.uniform(-0.4, 0.4)
    c = 1 + strength * rng.uniform(-0.3, 0.3)
    b = strength * rng.uniform(-25, 25)
    grey = rgb @ np.array([0.299, 0.587, 0.114], np.float32)  # [h, w]
    rgb = grey[:, :, None] + (rgb - grey[:, :, None]) * s
    mean = float(grey.mean())
    return (rgb - mean) * c + (mean + b)


def _item(rng: np.random.Generator, src: Sources, cut: Cutout | None, w_img: int, h_img: int,
          min_side: float, max_side: float):
    """Draw one paste: float32 RGB [h, w, 3], float32 alpha [h, w] in 0..1, and its top-left (x0, y0)."""
    side = math.exp(rng.uniform(math.log(min_side), math.log(max_side)))
    if cut is None:  # a random polygon cut from a texture
        aspect = math.exp(rng.uniform(-0.7, 0.7))
    else:
        aspect = cut.alpha.shape[1] / cut.alpha.shape[0] * math.exp(rng.uniform(-0.25, 0.25))
    w, h = (side, side / aspect) if aspect >= 1 else (side * aspect, side)
    w, h = max(2, round(w)), max(2, round(h))
    if cut is None:
        tex = src.textures[rng.integers(len(src.textures))]
        th, tw = tex.shape[:2]
        ch, cw = rng.integers(min(th, 24), th + 1), rng.integers(min(tw, 24), tw + 1)
        y, x = rng.integers(th - ch + 1), rng.integers(tw - cw + 1)
        rgb, alpha = _resize(tex[y:y + ch, x:x + cw], w, h), _random_polygon(rng, w, h)
    else:
        rgb, alpha = _resize(cut.rgb, w, h), _resize(cut.alpha, w, h)
    if rng.random() < 0.5:
        rgb, alpha = rgb[:, ::-1], alpha[:, ::-1]
    x0 = int(rng.integers(-w // 2, w_img - w // 2 + 1))
    y0 = int(rng.integers(-h // 2, h_img - h // 2 + 1))
    return rgb, alpha.astype(np.float32) * (1 / 255), x0, y0  # rgb still uint8: jittered once accepted


def render(config: SynthConfig, index: int) -> tuple[np.ndarray, list[tuple[str, tuple[float, float, float, float]]]]:
    """Make image ``index`` (1-based) of the set ``config`` describes.

    Returns:
        image (uint8 array[H, W, 3]): RGB, before JPEG encoding.
        objects: ``(wnid, (x1, y1, x2, y2))`` per annotated object in paste order, boxes in absolute pixels
            (pixel edges: a box covering pixel columns 3..5 is x1 = 3, x2 = 6).
    """
    image, objects, _ = _render(config, index)
    return image, objects


def _render(config: SynthConfig, index: int):
    """``render`` plus the owner map (int16 array[H, W]): object k >= 0, -1 background, -2 distractor."""
    rng = np.random.default_rng([config.seed, index])
    src = load_sources()
    long_side, short_side = config.size, round(config.size * rng.uniform(0.6, 1.0))
    w_img, h_img = (long_side, short_side) if rng.random() < 0.75 else (short_side, long_side)
    canvas = _background(rng, src, w_img, h_img)  # float32 [H, W, 3]
    owner = np.full((h_img, w_img), _BACKGROUND, np.int16)  # [H, W] who owns each pixel

    wnids = [c.wnid for c in CLASSES[:config.classes]]
    is_object = [True] * rng.choice(len(_OBJECTS_P), p=_OBJECTS_P) + \
        [False] * rng.choice(len(_DISTRACTORS_P), p=_DISTRACTORS_P)
    rng.shuffle(is_object)  # paste order: either kind may cover the other
    labels: list[str] = []      # wnid of object k
    full: list[int] = []        # pasted pixels of object k, inside the image or not
    visible: list[int] = []     # pixels object k still owns
    spans: list[tuple[int, int, int, int]] = []  # where object k was pasted, clipped to the image
    max_side = 0.95 * long_side
    for obj in is_object:
        if obj:
            wnid = wnids[rng.integers(len(wnids))]
            cuts = src.classes[wnid]
            cut, min_side = cuts[rng.integers(len(cuts))], config.min_object
        else:
            wnid = None
            use_polygon = rng.random() < 0.4
            group = src.distractors[rng.integers(len(src.distractors))]
            cut = None if use_polygon else group[rng.integers(len(group))]
            min_side = 12
        for _ in range(_TRIES):
            rgb, alpha, x0, y0 = _item(rng, src, cut, w_img, h_img, min_side, max_side)
            h, w = alpha.shape
            ix0, iy0, ix1, iy1 = max(x0, 0), max(y0, 0), min(x0 + w, w_img), min(y0 + h, h_img)
            if ix1 <= ix0 or iy1 <= iy0:
                continue
            a = alpha[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0]  # [h', w'] the part inside the image
            solid = a >= 0.5
            region = owner[iy0:iy1, ix0:ix1]
            covered = np.bincount(region[solid].astype(np.int64) + 2, minlength=len(labels) + 2)[2:]
            if any(v - c < config.min_visible * f for v, c, f in zip(visible, covered, full)):
                continue  # would hide too much of an earlier object
            if any(c and _short_side_left(owner, spans[k], k, solid, (ix0, iy0)) < config.min_box
                   for k, c in enumerate(covered)):
                continue  # would cut an earlier object's visible box below min_box
            if obj:
                own_full, own_visible = int(np.count_nonzero(alpha >= 0.5)), int(np.count_nonzero(solid))
                if own_visible == 0 or own_visible < config.min_visible * own_full:
                    continue  # too much of it outside the image
                if _box_short_side(solid) < config.min_box:
                    continue  # its visible box would be too small
            for k, c in enumerate(covered):
                visible[k] -= int(c)
            rgb = _jitter(rgb[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0].astype(np.float32), rng, 1.0)
            part = canvas[iy0:iy1, ix0:ix1]
            part += a[:, :, None] * (rgb - part)
            if obj:
                region[solid] = len(labels)
                labels.append(wnid)
                spans.append((ix0, iy0, ix1, iy1))
                full.append(own_full)
                visible.append(own_visible)
            else:
                region[solid] = _DISTRACTOR
            break

    if rng.random() < 0.3:
        canvas = cv2.GaussianBlur(canvas, (0, 0), rng.uniform(0.4, 1.5))
    canvas = _jitter(canvas, rng, 0.5)
    if rng.random() < 0.5:
        canvas += rng.standard_normal(canvas.shape, dtype=np.float32) * np.float32(rng.uniform(1, 8))
    image = np.clip(canvas + 0.5, 0, 255).astype(np.uint8)

    objects = []
    for k, (wnid, (ix0, iy0, ix1, iy1)) in enumerate(zip(labels, spans)):
        ys, xs = np.nonzero(owner[iy0:iy1, ix0:ix1] == k)
        objects.append((wnid, (float(ix0 + xs.min()), float(iy0 + ys.min()),
                               float(ix0 + xs.max() + 1), float(iy0 + ys.max() + 1))))
    return image, objects, owner


def _box_short_side(mask: np.ndarray) -> int:
    """Shorter side of the bounding box of a boolean mask ``[h, w]``; 0 when it is empty."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size == 0:
        return 0
    return int(min(rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1))


def _short_side_left(owner: np.ndarray, span: tuple[int, int, int, int], k: int, cover: np.ndarray,
                     cover_at: tuple[int, int]) -> int:
    """Shorter side of object ``k``'s visible box (its ``owner`` pixels inside ``span`` = x0, y0, x1, y1) once
    the boolean mask ``cover`` is pasted with its top-left corner at ``cover_at`` = (x, y)."""
    x0, y0, x1, y1 = span
    mine = owner[y0:y1, x0:x1] == k  # [h, w], a new array
    cx, cy = cover_at
    ox0, oy0 = max(x0, cx), max(y0, cy)
    ox1, oy1 = min(x1, cx + cover.shape[1]), min(y1, cy + cover.shape[0])
    if ox1 > ox0 and oy1 > oy0:
        mine[oy0 - y0:oy1 - y0, ox0 - x0:ox1 - x0] &= ~cover[oy0 - cy:oy1 - cy, ox0 - cx:ox1 - cx]
    return _box_short_side(mine)


def jpeg_quality(config: SynthConfig, index: int) -> int:
    """The JPEG quality of image ``index``: 55..95, drawn from its own stream so ``render`` stays pure."""
    return int(np.random.default_rng([config.seed, index, 1]).integers(55, 96))
