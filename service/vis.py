"""Detections drawn over images (``ircnn detect --save-vis DIR``): a box per detection and a ``"name 0.87"`` label.

Copies are written under DIR with the inputs' relative paths (``photos/a/b.jpg`` -> ``DIR/a/b.jpg``): JPEG inputs
stay JPEG (quality 90), PNG stays PNG, other formats become PNG with ``.png`` appended (``x.webp`` ->
``x.webp.png``), so no two inputs share a copy. A copy never replaces an input file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# 20 colours that stay distinct on photos (Tableau 20 order); a class always gets the same one
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (174, 199, 232), (255, 187, 120),
           (152, 223, 138), (255, 152, 150), (197, 176, 213), (196, 156, 148), (247, 182, 210), (199, 199, 199),
           (219, 219, 141), (158, 218, 229))
JPEG_SUFFIXES = (".jpg", ".jpeg", ".jpe")
JPEG_QUALITY = 90


def colour_of(det_id: int) -> tuple[int, int, int]:
    return PALETTE[det_id % len(PALETTE)]


def draw_detections(image: np.ndarray, detections: list[dict], min_score: float = 0.0) -> Image.Image:
    """A copy of ``image`` (uint8 RGB ``[H, W, 3]``, not modified) with every detection scoring at least
    ``min_score`` drawn: its box (``[x1, y1, x2, y2]`` pixels, x2/y2 exclusive) in its class colour and a label
    ``"name 0.87"`` above it (inside, at the top, when there is no room above). Higher scores are drawn last, on top.
    """
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 RGB array [H, W, 3], got {image.dtype} {image.shape}")
    img = Image.fromarray(np.ascontiguousarray(image).copy(), "RGB")
    w, h = img.size
    draw = ImageDraw.Draw(img)
    width = max(2, round(max(w, h) / 250))  # 2 px on a 500 px image
    font = ImageFont.load_default(size=max(11, round(max(w, h) / 45)))
    pad = max(1, width // 2)
    for d in sorted((d for d in detections if d["score"] >= min_score), key=lambda d: d["score"]):
        x1, y1, x2, y2 = d["box"]
        x1, y1 = min(max(x1, 0), w - 1), min(max(y1, 0), h - 1)
        x2, y2 = min(max(x2 - 1, x1), w - 1), min(max(y2 - 1, y1), h - 1)  # PIL's rectangle includes both ends
        colour = colour_of(d["det_id"])
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=width)
        label = f"{d['name']} {d['score']:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        tw, th = right - left + 2 * pad, bottom - top + 2 * pad
        ty = y1 - th if y1 - th >= 0 else y1
        tx = min(x1, max(0, w - tw))
        draw.rectangle([tx, ty, tx + tw - 1, ty + th - 1], fill=colour)
        ink = (0, 0, 0) if 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2] > 140 else (255, 255, 255)
        draw.text((tx + pad - left, ty + pad - top), label, fill=ink, font=font)
    return img


def vis_name(name: str) -> str:
    """The copy's relative path for an input's relative path (module docstring)."""
    suffix = os.path.splitext(name)[1].lower()
    return name if suffix in JPEG_SUFFIXES + (".png",) else name + ".png"


class VisWriter:
    """Writes the drawn copy of each detected image under ``out_dir``, counting what it drew (``summary``).

    ``names``: input path (as recorded) -> path relative to the inputs' common folder; ``files``: the inputs.
    Raises ValueError at once if two inputs would share a copy or a copy would replace an input.
    """

    def __init__(self, out_dir: str | os.PathLike, names: dict[str, str], files: list[Path],
                 min_score: float = 0.0) -> None:
        self.out_dir, self.min_score = Path(out_dir), min_score
        self.pictures = self.boxes = 0
        self.best_score: float | None = None  # of every detection seen, drawn or not
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise ValueError(f"--save-vis {out_dir} is a file, not a folder")
        self.targets: dict[str, Path] = {}
        owner: dict[str, str] = {}
        inputs = {os.path.realpath(f) for f in files}
        for f in files:
            target = self.out_dir / vis_name(names[str(f)])
            key = os.path.realpath(target)
            if key in inputs:
                raise ValueError(f"--save-vis {out_dir} would overwrite the input {f}; choose a folder outside the "
                                 "inputs")
            if key in owner:
                raise ValueError(f"--save-vis: {f} and {owner[key]} would both be drawn to {target}")
            owner[key] = str(f)
            self.targets[str(f)] = target

    def write(self, record: dict, image: np.ndarray) -> Path:
        """Draw a detections record (``{"image", "detections": [...]}``) over its decoded image and save it."""
        target = self.targets[record["image"]]
        target.parent.mkdir(parents=True, exist_ok=True)
        dets = record["detections"]
        drawn = draw_detections(image, dets, self.min_score)
        if target.suffix.lower() in JPEG_SUFFIXES:
            drawn.save(target, format="JPEG", quality=JPEG_QUALITY)
        else:
            drawn.save(target, format="PNG")
        self.pictures += 1
        self.boxes += sum(d["score"] >= self.min_score for d in dets)
        if dets:
            self.best_score = max(self.best_score or 0.0, max(d["score"] for d in dets))
        return target

    def summary(self) -> dict:
        """``{"dir", "pictures", "boxes", "threshold", "best_score"}``: copies written, boxes drawn on them (score at
        least ``threshold``), and the best score of any detection on them (None: no detections at all)."""
        return {"dir": str(self.out_dir), "pictures": self.pictures, "boxes": self.boxes,
                "threshold": self.min_score, "best_score": self.best_score}
