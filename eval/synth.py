"""A synthetic detection set in the real ILSVRC DET layout, made offline from photographs scikit-image ships.

What it is for: offline tests, training smoke runs, coverage figures and end-to-end learning checks (a detector
trained on it should score it well; ``ircnn eval det`` with its own ground truth as predictions gives mAP 1.0).
What it is not: a stand-in for ILSVRC. It has at most five classes, pasted objects and no real context.

Layout written under ``out`` (the real ILSVRC 2014 DET layout, flat per split)::

    Data/DET/{train,val}/ILSVRC2014_synth_00000001.JPEG
    Annotations/DET/{train,val}/ILSVRC2014_synth_00000001.xml   PASCAL VOC-style, object name = DET WNID
    ImageSets/DET/{train,val}.txt                               "<split>/<stem> <index>", index 1-based per file
    synth.json                                                  seed, classes and their photos, counts

Images are numbered 1..N across both splits; the last ``round(N * val_fraction)`` (at least one when the fraction is
positive) form ``val``.

How an image is made (``render``), every random draw from ``numpy.random.default_rng([seed, index])`` so that an
image depends only on the seed and its own number (same seed -> byte-identical files, whatever the worker count):

- Background: a random crop of a real texture or photo (brick, grass, gravel, moon, text, page, Hubble deep field,
  immunohistochemistry, the wooden table of ``coffee``, the lawn of ``camera``), resized to the image, grey ones
  tinted. The longer image side is ``size`` px, the shorter 0.6..1.0 of it (landscape 3 times in 4).
- 0..6 objects and 0..3 distractors, pasted in random order (so either may cover the other). A class object is
  a photo cut out by a hand-drawn polygon (``CLASSES``), scaled to a longer side log-uniform in
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

import functools
import json
import math
import os
import shutil
from dataclasses import dataclass

import cv2
import numpy as np

from eval.classes import det200
from eval.formats import parse_json, write_annotation, write_imageset

FORMAT = "ircnn-synth-det"  # synth.json "format": marks a directory this module may replace
MAX_IMAGES = 1_000_000

# ---- sources ---------------------------------------------------------------------------------------------

# Hand-drawn outlines, (x, y) in pixels of the scikit-image photo. Regions a polygon cannot follow (the gap under
# the motorcycle's engine, the lawn between the cameraman's arm and coat) come along as part of the object.
_CAT = [(40, 0), (395, 0), (390, 40), (375, 90), (370, 150), (368, 200), (360, 250), (345, 299), (0, 299),
        (0, 150), (15, 100), (30, 50)]
_ASTRONAUT = [(225, 12), (275, 22), (298, 55), (300, 105), (285, 140), (300, 175), (305, 230), (345, 268),
              (358, 320), (345, 352), (310, 370), (290, 400), (281, 450), (278, 511), (20, 511), (22, 420),
              (30, 330), (50, 290), (85, 262), (112, 235), (113, 185), (140, 160), (158, 140), (152, 100),
              (155, 55), (180, 25)]
_CAMERAMAN = [(200, 63), (240, 68), (265, 90), (262, 125), (258, 140), (262, 165), (250, 185), (265, 180),
              (300, 178), (325, 168), (332, 190), (330, 215), (303, 230), (300, 267), (280, 293), (200, 313),
              (150, 330), (143, 380), (140, 420), (150, 511), (0, 511), (0, 245), (30, 210), (60, 175),
              (100, 140), (130, 115), (155, 100), (170, 75)]
_CUP_BODY = [(178, 120), (185, 200), (200, 228), (195, 260), (198, 295), (215, 305), (245, 290), (260, 270),
             (300, 278), (345, 268), (375, 240), (395, 200), (406, 120)]
_CUP_RIM = ((290, 112), (118, 95))  # ellipse centre, semi-axes
_MOTORCYCLE = [(90, 198), (100, 180), (140, 158), (245, 165), (330, 180), (355, 165), (335, 140), (330, 115),
               (350, 110), (380, 140), (420, 148), (470, 135), (490, 95), (495, 78), (520, 80), (525, 100),
               (515, 125), (540, 120), (565, 125), (585, 120), (590, 140), (570, 160), (560, 185), (545, 200),
               (560, 255), (600, 270), (640, 290), (665, 320), (685, 370), (680, 420), (655, 448), (600, 455),
               (560, 440), (535, 410), (515, 370), (470, 365), (420, 375), (345, 380), (340, 435), (320, 435),
               (315, 390), (280, 380), (245, 395), (200, 403), (155, 390), (130, 360), (122, 320), (130, 280),
               (110, 245), (95, 230)]
_ROCKET = [(322, 127), (330, 135), (334, 150), (335, 170), (336, 400), (308, 400), (309, 170), (310, 150),
           (314, 135)]
_SHUTTLE = [(382, 45), (390, 38), (398, 50), (405, 10), (420, 0), (435, 5), (438, 40), (445, 38), (453, 50),
            (455, 200), (460, 225), (440, 232), (425, 238), (420, 270), (398, 270), (395, 238), (358, 228),
            (360, 215), (382, 195)]
_CLOCK = ((210, 140), (72, 60))


@dataclass(frozen=True)
class SynthClass:
    """One DET class of the set and the scikit-image photos its objects are cut from."""

    wnid: str
    photos: tuple[str, ...]  # skimage.data functions
    note: str                # how the object is cut out


# The order is the order --classes K takes the first K from. Each class is a DET class the photo really shows;
# scikit-image's rocket, coins and clock have no DET class (DET has only "digital clock") and serve as distractors.
CLASSES: tuple[SynthClass, ...] = (
    SynthClass("n02121808", ("chelsea",), "the cat's head and shoulders, hand-drawn polygon"),
    SynthClass("n00007846", ("astronaut", "camera"),
               "Eileen Collins without the helmet in front of her; the cameraman without his tripod; polygons"),
    SynthClass("n03797390", ("coffee",), "the espresso cup with its handle (rim ellipse + body polygon), no saucer"),
    SynthClass("n03790512", ("stereo_motorcycle",),
               "both views of the stereo pair: a polygon on the left view, carried to the right view by the pair's "
               "disparity map"),
    SynthClass("n02374451", ("horse",),
               "scikit-image's horse is a binary silhouette: filled with the wooden table of 'coffee' (the weakest "
               "source: shape, not appearance)"),
)

BACKGROUNDS = ("brick", "grass", "gravel", "moon", "text", "page", "hubble_deep_field", "immunohistochemistry",
               "coffee table", "camera lawn")
DISTRACTORS = ("rocket", "astronaut shuttle model", "coins", "clock", "retina", "colorwheel", "logo",
               "texture polygons")


@dataclass(frozen=True)
class _Cutout:
    rgb: np.ndarray    # uint8 [h, w, 3]
    alpha: np.ndarray  # uint8 [h, w], 255 inside, soft at the edge


@dataclass(frozen=True)
class _Sources:
    classes: dict[str, tuple[_Cutout, ...]]  # wnid -> cut-outs
    distractors: tuple[tuple[_Cutout, ...], ...]  # groups: the cut-outs of one photo
    backgrounds: tuple[np.ndarray, ...]      # uint8 [h, w] grey or [h, w, 3]
    textures: tuple[np.ndarray, ...]         # uint8 [h, w, 3], for distractor polygons


def _rgb(img: np.ndarray) -> np.ndarray:
    if img.ndim == 2:
        return np.repeat(img[:, :, None], 3, axis=2)
    return np.ascontiguousarray(img[:, :, :3])


def _cutout(img: np.ndarray, mask: np.ndarray) -> _Cutout:
    """Crop ``img`` to the bounding box of ``mask`` (bool [H, W]) with a soft one-pixel edge."""
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    alpha = cv2.GaussianBlur(mask[y0:y1, x0:x1].astype(np.uint8) * 255, (0, 0), 0.8)
    return _Cutout(np.ascontiguousarray(_rgb(img)[y0:y1, x0:x1]), alpha)


def _polygon_mask(shape: tuple[int, int], points) -> np.ndarray:
    mask = np.zeros(shape[:2], np.uint8)
    cv2.fillPoly(mask, [np.array(points, np.int32)], 1)
    return mask.astype(bool)


def _ellipse_mask(shape: tuple[int, int], ellipse) -> np.ndarray:
    mask = np.zeros(shape[:2], np.uint8)
    cv2.ellipse(mask, ellipse[0], ellipse[1], 0, 0, 360, 1, -1)
    return mask.astype(bool)


def _motorcycle_right(left_mask: np.ndarray, disparity: np.ndarray) -> np.ndarray:
    """Carry the left-view mask to the right view: left pixel (x, y) is right pixel (x - d, y).

    Only pixels at the motorcycle's depth move (disparity >= 35 px; the bike spans 40..58, the wall behind
    it 8..25), so background caught inside the polygon does not scatter; the gaps left by pixels the right
    view does not see are closed and the largest piece kept.
    """
    ys, xs = np.nonzero(left_mask)
    d = disparity[ys, xs]
    ok = np.isfinite(d) & (d >= 35)
    xr = np.rint(xs[ok] - d[ok]).astype(np.int64)
    inside = (xr >= 0) & (xr < left_mask.shape[1])
    mask = np.zeros(left_mask.shape, np.uint8)
    mask[ys[ok][inside], xr[inside]] = 1
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (15, 15)))
    return _fill_holes(max(_components(mask, 1), key=np.count_nonzero))


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """bool [H, W]: ``mask`` plus every background pixel not connected to the border."""
    padded = np.pad(mask.astype(np.uint8), 1)
    flood = padded.copy()
    cv2.floodFill(flood, None, (0, 0), 1)
    return (padded | (1 - flood)).astype(bool)[1:-1, 1:-1]


def _round(mask: np.ndarray) -> bool:
    """Whether a component looks like one coin (not two touching ones, not the bright strip at the top)."""
    ys, xs = np.nonzero(mask)
    h, w = np.ptp(ys) + 1, np.ptp(xs) + 1
    return 0.75 < w / h < 1.33 and len(ys) > 0.65 * w * h


def _convex(mask: np.ndarray) -> np.ndarray:
    hull = cv2.convexHull(np.argwhere(mask)[:, ::-1].astype(np.int32))
    return _polygon_mask(mask.shape, hull[:, 0])


def _components(mask: np.ndarray, min_area: int) -> list[np.ndarray]:
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    return [labels == i for i in range(1, count) if stats[i, cv2.CC_STAT_AREA] >= min_area]


@functools.cache
def _sources() -> _Sources:
    """Load the photos (all bundled with scikit-image; none needs a download) and cut them out, once per process."""
    from skimage import data, filters

    chelsea, astronaut, camera, coffee = data.chelsea(), data.astronaut(), data.camera(), data.coffee()
    left, right, disparity = data.stereo_motorcycle()
    moto_left = _polygon_mask(left.shape, _MOTORCYCLE)
    cup = _polygon_mask(coffee.shape, _CUP_BODY) | _ellipse_mask(coffee.shape, _CUP_RIM)
    table = np.ascontiguousarray(coffee[:, 485:])  # right of the saucer: wood only
    horse = ~data.horse()
    wood = cv2.resize(np.ascontiguousarray(np.rot90(table)), (horse.shape[1], horse.shape[0]),
                      interpolation=cv2.INTER_LINEAR)
    classes = {
        "n02121808": (_cutout(chelsea, _polygon_mask(chelsea.shape, _CAT)),),
        "n00007846": (_cutout(astronaut, _polygon_mask(astronaut.shape, _ASTRONAUT)),
                      _cutout(camera, _polygon_mask(camera.shape, _CAMERAMAN))),
        "n03797390": (_cutout(coffee, cup),),
        "n03790512": (_cutout(left, moto_left), _cutout(right, _motorcycle_right(moto_left, disparity))),
        "n02374451": (_cutout(wood, horse),),
    }

    coins = data.coins()
    coin_masks = [m for m in _components(_fill_holes(coins > filters.threshold_otsu(coins)), 400) if _round(m)]
    rocket, clock, logo = data.rocket(), data.clock(), data.logo()
    retina = cv2.resize(data.retina(), (480, 480), interpolation=cv2.INTER_AREA)
    wheel = data.colorwheel()
    distractors = (  # one group per photo, drawn alike
        (_cutout(rocket, _polygon_mask(rocket.shape, _ROCKET)),),
        (_cutout(astronaut, _polygon_mask(astronaut.shape, _SHUTTLE)),),
        tuple(_cutout(coins, m) for m in coin_masks),
        (_cutout(clock, _ellipse_mask(clock.shape, _CLOCK)),),
        (_cutout(retina, _fill_holes(retina[:, :, 0] > 40)),),
        (_cutout(wheel, wheel.astype(np.int32).sum(axis=2) > 40),),
        (_cutout(logo, _convex(logo[:, :, :3].min(axis=2) < 235)),),  # the logo sits on opaque white
    )

    lawn = camera[250:, 410:]  # right of the tripod, below the skyline
    backgrounds = (data.brick(), data.grass(), data.gravel(), data.moon(), data.text(), data.page(),
                   data.hubble_deep_field(), data.immunohistochemistry(), table, lawn)
    textures = tuple(_rgb(b) for b in backgrounds) + (
        np.ascontiguousarray(astronaut[:260, :70]),  # the flag
        np.ascontiguousarray(left[:110, 590:]),      # garage shelves, right of the handlebar
    )
    return _Sources(classes, distractors, backgrounds, textures)


# ---- rendering -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SynthConfig:
    images: int = 100           # images in train + val together, 1..1,000,000
    seed: int = 0               # same seed -> byte-identical files
    classes: int = len(CLASSES)  # use the first K entries of CLASSES
    val_fraction: float = 0.2   # the last round(images * val_fraction) images (at least one if > 0) form val
    size: int = 500             # longer image side in px (ILSVRC DET images are mostly 500 x 333..500)
    min_object: int = 16        # smallest object, longer side of its whole pasted box in px
    min_visible: float = 0.3    # every annotated object keeps this share of its pasted pixels visible
    min_box: int = 16           # every annotated box (visible part) is at least this many px on its shorter side

    def __post_init__(self):
        for name in ("images", "seed", "classes", "size", "min_object"):
            if not isinstance(getattr(self, name), int) or isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be an int, got {getattr(self, name)!r}")
        if not 1 <= self.images <= MAX_IMAGES:
            raise ValueError(f"images (--images) must be in 1..{MAX_IMAGES:,}, got {self.images}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed (--seed) must be in 0..2**63-1, got {self.seed}")
        if not 1 <= self.classes <= len(CLASSES):
            raise ValueError(f"classes (--classes) must be in 1..{len(CLASSES)} (the synthetic set has photos for "
                             f"{len(CLASSES)} DET classes), got {self.classes}")
        if not 0.0 <= self.val_fraction <= 1.0:
            raise ValueError(f"val_fraction (--val-fraction) must be in 0..1, got {self.val_fraction}")
        if not 128 <= self.size <= 4096:
            raise ValueError(f"size (--size) must be in 128..4096 px, got {self.size}")
        if not 4 <= self.min_object <= self.size // 2:
            raise ValueError(f"min_object must be in 4..size/2 = {self.size // 2} px, got {self.min_object}")
        if not 0.0 < self.min_visible <= 1.0:
            raise ValueError(f"min_visible must be in (0, 1], got {self.min_visible}")
        if not 1 <= self.min_box <= self.min_object * 2:
            raise ValueError(f"min_box must be in 1..2 * min_object, got {self.min_box}")

    @property
    def val_images(self) -> int:
        if self.val_fraction == 0:
            return 0
        return min(self.images, max(1, round(self.images * self.val_fraction)))


# Chance of 0, 1, ..., 6 objects and of 0..3 distractors in an image.
_OBJECTS_P = (0.10, 0.28, 0.22, 0.15, 0.11, 0.08, 0.06)
_DISTRACTORS_P = (0.35, 0.30, 0.20, 0.15)
_TRIES = 8  # placements tried per item before it is left out
_BACKGROUND, _DISTRACTOR = -1, -2  # owner map values besides object numbers k >= 0


def _resize(img: np.ndarray, w: int, h: int) -> np.ndarray:
    shrink = w * h < img.shape[0] * img.shape[1]
    return cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def _background(rng: np.random.Generator, src: _Sources, w: int, h: int) -> np.ndarray:
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


def _item(rng: np.random.Generator, src: _Sources, cut: _Cutout | None, w_img: int, h_img: int,
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
    src = _sources()
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


# ---- writing the set -------------------------------------------------------------------------------------


def image_name(index: int) -> str:
    return f"ILSVRC2014_synth_{index:08d}"


def _owned_paths(out: str) -> list[str]:
    """Everything a synthetic set consists of: what replacing one removes."""
    paths = [os.path.join(out, top, "DET", split) for top in ("Data", "Annotations") for split in ("train", "val")]
    paths += [os.path.join(out, "ImageSets", "DET", f"{split}.txt") for split in ("train", "val")]
    return paths + [os.path.join(out, "synth.json")]


def _is_synth_set(out: str) -> bool:
    try:
        with open(os.path.join(out, "synth.json"), encoding="utf-8") as f:
            return parse_json(f.read()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _prepare_out(out: str, overwrite: bool) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out} exists and is not a directory")
    if os.path.isdir(out) and os.listdir(out):
        if not (overwrite or _is_synth_set(out)):
            raise ValueError(f"--out {out} is not empty and holds no synthetic set (no synth.json from `ircnn data "
                             "synth`); choose an empty or new directory, or pass --overwrite to replace "
                             "Data/DET/{train,val}, Annotations/DET/{train,val}, ImageSets/DET/{train,val}.txt "
                             "and synth.json there")
        for path in _owned_paths(out):
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            elif os.path.lexists(path):
                os.remove(path)
    for split in ("train", "val"):
        os.makedirs(os.path.join(out, "Data", "DET", split), exist_ok=True)
        os.makedirs(os.path.join(out, "Annotations", "DET", split), exist_ok=True)
    os.makedirs(os.path.join(out, "ImageSets", "DET"), exist_ok=True)


def _split_of(config: SynthConfig, index: int) -> str:
    return "train" if index <= config.images - config.val_images else "val"


def _write_one(job: tuple[str, SynthConfig, int]) -> list[str]:
    """Render, encode and write image ``index`` and its annotation; returns the WNIDs of its objects."""
    out, config, index = job
    image, objects = render(config, index)
    split, name = _split_of(config, index), image_name(index)
    ok, jpeg = cv2.imencode(".JPEG", image[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality(config, index)])
    if not ok:
        raise OSError(f"OpenCV could not encode {name} as JPEG")
    with open(os.path.join(out, "Data", "DET", split, name + ".JPEG"), "wb") as f:
        f.write(jpeg.tobytes())
    write_annotation(os.path.join(out, "Annotations", "DET", split, name + ".xml"), folder=split, filename=name,
                     width=image.shape[1], height=image.shape[0], objects=objects)
    return [wnid for wnid, _ in objects]


def _init_worker() -> None:
    cv2.setNumThreads(1)  # one process per core already
    _sources()


def write_synth_set(out: str, config: SynthConfig, *, workers: int = 1, overwrite: bool = False) -> dict:
    """Write the set ``config`` describes under ``out`` (module docstring) and return the synth.json document.

    ``out`` must be new, empty, or hold an earlier synthetic set (which is replaced); ``overwrite=True`` also
    replaces the paths a set consists of in any other directory, leaving everything else there alone.
    The files do not depend on ``workers``.
    """
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive int, got {workers!r}")
    _prepare_out(out, overwrite)
    _write_json(out, {"format": FORMAT, "note": "incomplete: being written, or the writer stopped"})
    jobs = ((out, config, i) for i in range(1, config.images + 1))
    workers = min(workers, max(1, config.images // 64))  # starting a process costs about 50 images
    if workers == 1:
        found = [_write_one(job) for job in jobs]
    else:
        import multiprocessing

        # spawn, not fork: the CLI process may hold torch's thread pools, which do not survive a fork.
        with multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker) as pool:
            found = list(pool.imap(_write_one, jobs, chunksize=16))

    splits = {s: [i for i in range(1, config.images + 1) if _split_of(config, i) == s] for s in ("train", "val")}
    for split, indices in splits.items():
        write_imageset(os.path.join(out, "ImageSets", "DET", f"{split}.txt"),
                       [f"{split}/{image_name(i)}" for i in indices])
    doc = summarize(config, found)
    _write_json(out, doc)
    return doc


def _write_json(out: str, doc: dict) -> None:
    with open(os.path.join(out, "synth.json"), "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")


def summarize(config: SynthConfig, found: list[list[str]]) -> dict:
    """The synth.json document: settings, classes with their photos, and counts per split.

    ``found[i]`` lists the WNIDs of the objects in image ``i + 1``.
    """
    vocab = det200()
    counts = {s: {"images": 0, "objects": 0, "images_without_objects": 0} for s in ("train", "val")}
    per_class = {c.wnid: {"train": 0, "val": 0} for c in CLASSES[:config.classes]}
    for index, wnids in enumerate(found, 1):
        split = _split_of(config, index)
        counts[split]["images"] += 1
        counts[split]["objects"] += len(wnids)
        counts[split]["images_without_objects"] += not wnids
        for wnid in wnids:
            per_class[wnid][split] += 1
    classes = []
    for c in CLASSES[:config.classes]:
        row = vocab.row_of_wnid[c.wnid]
        classes.append({"det_id": vocab.ids[row], "wnid": c.wnid, "name": vocab.names[row],
                        "photos": [f"skimage.data.{p}" for p in c.photos], "cut_out": c.note,
                        "objects": per_class[c.wnid]})
    return {
        "format": FORMAT,
        "generator": "eval.synth (ircnn data synth)",
        "seed": config.seed,
        "images": config.images,
        "val_fraction": config.val_fraction,
        "size": config.size,
        "min_object": config.min_object,
        "min_visible": config.min_visible,
        "splits": counts,
        "classes": classes,
        "distractors": list(DISTRACTORS),
        "backgrounds": list(BACKGROUNDS),
        "note": "Synthetic: photo cut-outs pasted on textures. For tests and smoke runs; not a stand-in for ILSVRC.",
    }
