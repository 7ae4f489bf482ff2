"""Whole-image classification with the paper's test-time crops (section 7, Table 3).

- 1 crop: shorter side resized to 256, the centre 224x224.
- 10 crops: the 4 corners and the centre of that resized image, and their mirrors (Krizhevsky et al.).
- 144 crops: shorter side resized to 256, 288, 320 and 352; the left, centre and right squares (top, centre,
  bottom for portrait images); in each square the 4 corner and the centre 224x224 crops plus the whole square
  resized to 224; and the mirrors of all of them: 4 x 3 x 6 x 2.

Softmax probabilities are averaged over the crops and over the ensemble's members, each member seeing the
crops at its own input size (the sides above scale with it). The crops of all images in a call are batched
together through the networks.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor

from detector.bundle.format import Bundle
from detector.image import ImageError, read_image
from detector.pipeline.ensemble import Ensemble, EnsembleConfig
from eval.classes import Vocabulary, cls1000

CROP_SCHEMES = (1, 10, 144)
SCALES_144 = (256, 288, 320, 352)  # shorter side, section 7
BASE_SCALE = 256
MAX_ASPECT = 64.0  # beyond this the resized image of a 1-pixel-high strip would need gigabytes
CLASSIFY_TASKS = ("cls1000", "det200-from-cls1000")  # 1000-way heads over ILSVRC's CLS classes


def _resize_shorter(img: Tensor, side: int) -> Tensor:
    """``Tensor[3, H, W]`` uint8 with its shorter side resized to ``side`` (aspect kept, antialiased bilinear)."""
    h, w = img.shape[-2:]
    # the long side is truncated, as torchvision's Resize(side) does, so 1-crop equals its reference eval
    if h <= w:
        size = [side, max(side, int(w * side / h))]
    else:
        size = [max(side, int(h * side / w)), side]
    return TF.resize(img, size, antialias=True)


def _five_crops(img: Tensor, size: int) -> list[Tensor]:
    """Top-left, top-right, bottom-left, bottom-right and centre ``size`` crops of ``Tensor[3, H, W]``."""
    h, w = img.shape[-2:]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return [img[:, :size, :size], img[:, :size, w - size:], img[:, h - size:, :size], img[:, h - size:, w - size:],
            img[:, top:top + size, left:left + size]]


def check_aspect(image: np.ndarray) -> None:
    h, w = image.shape[:2]
    if max(h, w) / min(h, w) > MAX_ASPECT:
        raise ImageError("bad_aspect", f"image is {w}x{h}: aspect ratio above {MAX_ASPECT:.0f}:1 is not supported")


def crop_views(image: np.ndarray, crops: int, size: int = 224) -> Tensor:
    """The test-time crops of one image: ``uint8 [H, W, 3]`` -> ``Tensor[crops, 3, size, size]`` uint8."""
    if crops not in CROP_SCHEMES:
        raise ValueError(f"crops must be one of {', '.join(map(str, CROP_SCHEMES))}, got {crops}")
    check_aspect(image)
    img = torch.tensor(image).permute(2, 0, 1)  # [3, H, W], a copy: callers may pass read-only arrays
    scale = lambda s: s * size // 224  # the paper's sides are for 224 inputs  # noqa: E731
    if crops == 1:
        views = [_five_crops(_resize_shorter(img, scale(BASE_SCALE)), size)[4]]
    elif crops == 10:
        views = _five_crops(_resize_shorter(img, scale(BASE_SCALE)), size)
    else:
        views = []
        for side in SCALES_144:
            resized = _resize_shorter(img, scale(side))
            s = scale(side)
            h2, w2 = resized.shape[-2:]
            if w2 >= h2:
                squares = [resized[:, :, x:x + s] for x in (0, (w2 - s) // 2, w2 - s)]
            else:
                squares = [resized[:, y:y + s, :] for y in (0, (h2 - s) // 2, h2 - s)]
            for sq in squares:
                views.extend(_five_crops(sq, size))
                views.append(TF.resize(sq, [size, size], antialias=True))
    views = torch.stack(views)  # [n, 3, size, size]
    if crops != 1:
        views = torch.cat([views, views.flip(-1)])  # mirrors
    return views


def _vocabulary(bundle: Bundle) -> Vocabulary:
    """The head's classes: ILSVRC's 1000, or the folder names a ``classes`` bundle was trained on."""
    k = bundle.arch.num_classes
    if bundle.task in CLASSIFY_TASKS and k == 1000:
        return cls1000()
    names = bundle.provenance.get("classes")
    if bundle.task == "classes" and isinstance(names, list) and len(names) == k:
        names = tuple(str(n) for n in names)
        return Vocabulary(ids=tuple(range(k)), wnids=names, names=names)
    raise ValueError(f"bundle task {bundle.task!r} with {k} classes cannot classify whole images; use a cls1000 "
                     f"bundle (e.g. `ircnn model import-torchvision`) or one made by `ircnn train classifier`")


class Classifier:
    """Whole-image 1000-class classification by an ensemble (the function the CLI and the service call)."""

    def __init__(self, bundle: Bundle, config: EnsembleConfig = EnsembleConfig()) -> None:
        self.vocab = _vocabulary(bundle)
        self.bundle = bundle
        self.ensemble = Ensemble.from_bundle(bundle, config)

    @property
    def members(self) -> int:
        return len(self.ensemble.members)

    def probabilities(self, images: list[np.ndarray], crops: int = 1) -> Tensor:
        """``len(images)`` uint8 RGB arrays -> ``Tensor[len(images), K]``, averaged over crops and members."""
        if not images:
            return torch.zeros(0, len(self.vocab))
        views = {size: torch.cat([crop_views(im, crops, size) for im in images])
                 for size, _ in self.ensemble.size_groups()}  # [sum of crops, 3, size, size] per member input size
        probs = self.ensemble.by_size(views)  # [sum of crops, K]
        return probs.view(len(images), crops, -1).mean(dim=1).cpu()

    def top_k(self, probs: Tensor, k: int) -> list[list[dict]]:
        """``Tensor[N, K]`` -> per image, the ``k`` best ``{index, wnid, name, prob}``."""
        values, indices = probs.topk(min(k, probs.shape[1]), dim=1)
        return [[{"index": int(i), "wnid": self.vocab.wnids[i], "name": self.vocab.names[i], "prob": float(v)}
                 for v, i in zip(vs.tolist(), ix.tolist())] for vs, ix in zip(values, indices)]

    def classify(self, images: list[np.ndarray], crops: int = 1, top_k: int = 5) -> list[dict]:
        """Per image: ``{"crops", "members", "top_k": [...]}``."""
        if not 1 <= top_k <= 1000:
            raise ValueError(f"top_k must be in 1..1000, got {top_k}")  # k above K returns all K
        probs = self.probabilities(images, crops)
        return [{"crops": crops, "members": self.members, "top_k": t} for t in self.top_k(probs, top_k)]

    def classify_paths(self, paths: Iterable[str | os.PathLike], crops: int = 1, top_k: int = 5,
                       images_per_batch: int | None = None) -> Iterator[dict]:
        """Classify files in order; a file that cannot be read yields ``{"image", "error"}`` and the rest go on.

        Files are decoded one batch ahead in a background thread while the networks run on the current batch.
        """
        if images_per_batch is None:
            images_per_batch = max(1, self.ensemble.config.batch_size // crops)
        paths = [Path(p) for p in paths]
        batches = [paths[i:i + images_per_batch] for i in range(0, len(paths), images_per_batch)]

        def decode(batch: list[Path]) -> list[np.ndarray | ImageError]:
            out = []
            for p in batch:
                try:
                    image = read_image(p)
                    check_aspect(image)
                    out.append(image)
                except ImageError as e:
                    out.append(e)
            return out

        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(decode, batches[0]) if batches else None
            for i, batch in enumerate(batches):
                decoded = pending.result()
                pending = pool.submit(decode, batches[i + 1]) if i + 1 < len(batches) else None
                good = [im for im in decoded if not isinstance(im, ImageError)]
                results = iter(self.classify(good, crops, top_k))
                for path, im in zip(batch, decoded):
                    if isinstance(im, ImageError):
                        yield {"image": str(path), "error": str(im)}
                    else:
                        h, w = im.shape[:2]
                        yield {"image": str(path), "width": w, "height": h, **next(results)}
