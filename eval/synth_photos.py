"""The scikit-image photos the synthetic detection set (``eval.synth``) is made of: hand-drawn outlines of the
objects, the DET classes they stand for, and the cut-outs, backgrounds and textures ``eval.synth_render`` pastes.
All of them ship with scikit-image; none needs a download.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import cv2
import numpy as np

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
class Cutout:
    rgb: np.ndarray    # uint8 [h, w, 3]
    alpha: np.ndarray  # uint8 [h, w], 255 inside, soft at the edge


@dataclass(frozen=True)
class Sources:
    classes: dict[str, tuple[Cutout, ...]]  # wnid -> cut-outs
    distractors: tuple[tuple[Cutout, ...], ...]  # groups: the cut-outs of one photo
    backgrounds: tuple[np.ndarray, ...]      # uint8 [h, w] grey or [h, w, 3]
    textures: tuple[np.ndarray, ...]         # uint8 [h, w, 3], for distractor polygons


def _rgb(img: np.ndarray) -> np.ndarray:
    if img.ndim == 2:
        return np.repeat(img[:, :, None], 3, axis=2)
    return np.ascontiguousarray(img[:, :, :3])


def _cutout(img: np.ndarray, mask: np.ndarray) -> Cutout:
    """Crop ``img`` to the bounding box of ``mask`` (bool [H, W]) with a soft one-pixel edge."""
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    alpha = cv2.GaussianBlur(mask[y0:y1, x0:x1].astype(np.uint8) * 255, (0, 0), 0.8)
    return Cutout(np.ascontiguousarray(_rgb(img)[y0:y1, x0:x1]), alpha)


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
def load_sources() -> Sources:
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
    return Sources(classes, distractors, backgrounds, textures)
