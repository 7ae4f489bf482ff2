"""Rebuild this real-photo detection set from the photographs scikit-image and matplotlib ship in their wheels.

    python data/real_photos/build.py            # rewrites Data/, Annotations/, ImageSets/ and the CLS labels here

The boxes below were drawn by hand on each photo (README.md says how); they are the set's ground truth, written as
ILSVRC DET XML with ``eval.annotations.write_annotation``. Images are stored as JPEG (quality 95; grayscale photos
stay grayscale) so the set stays small in the repository.
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib.cbook
import numpy as np
import skimage.data
from PIL import Image

from eval.classes import det200
from eval.annotations import write_annotation, write_imageset

HERE = Path(__file__).resolve().parent

# name -> (where it comes from, objects [(DET class name, (x1, y1, x2, y2))], blacklisted DET class names)
PHOTOS = {
    "astronaut": ("skimage:astronaut", [("person", (20, 14, 368, 512)), ("helmet", (276, 342, 512, 512))],
                  ["airplane"]),  # the space-shuttle model behind her: a toy, not an airplane in DET's sense
    "camera": ("skimage:camera", [("person", (0, 62, 333, 512))], []),
    "chelsea": ("skimage:chelsea", [("domestic cat", (0, 0, 405, 300))], []),
    "coffee": ("skimage:coffee", [("cup or mug", (173, 18, 410, 308))], ["table"]),  # the table fills the frame
    "motorcycle_left": ("skimage:motorcycle_left", [("motorcycle", (92, 75, 686, 452)),
                                                   ("bench", (42, 104, 283, 308))], ["bicycle"]),
    "motorcycle_right": ("skimage:motorcycle_right", [("motorcycle", (45, 35, 630, 452)),
                                                     ("bench", (14, 105, 258, 308))], ["bicycle"]),
    "grace_hopper": ("matplotlib:grace_hopper.jpg", [("person", (14, 22, 512, 600))], ["bow tie", "tie"]),
    # photographs without any DET object: every detection on them is a false positive
    "rocket": ("skimage:rocket", [], []),
    "hubble_deep_field": ("skimage:hubble_deep_field", [], []),
    "coins": ("skimage:coins", [], []),
    "clock_motion": ("skimage:clock_motion", [], []),  # an analog clock: DET has only "digital clock"
    "moon": ("skimage:moon", [], []),
    "page": ("skimage:page", [], []),
    "text": ("skimage:text", [], []),
    "retina": ("skimage:retina", [], []),
    "brick": ("skimage:brick", [], []),
    "grass": ("skimage:grass", [], []),
    "gravel": ("skimage:gravel", [], []),
}

# whole-image ILSVRC CLS labels (cls1000 index) where a photo has one obvious ImageNet class: the espresso, and the
# cat as "tabby" (its striped coat; "Egyptian cat" and "tiger cat" are as defensible, which top-5 error allows for)
CLS_LABELS = {"chelsea": 281, "coffee": 967}


def load(source: str) -> np.ndarray:
    kind, name = source.split(":")
    if kind == "matplotlib":
        with matplotlib.cbook.get_sample_data(name) as f:
            return np.asarray(Image.open(f))
    folder = Path(skimage.data.__file__).parent  # the photos inside the wheel: nothing is downloaded
    file = next(f for f in sorted(folder.iterdir()) if f.stem == name and f.suffix in (".png", ".jpg"))
    return np.asarray(Image.open(file))


def main() -> None:
    vocab = det200()
    wnid = {n: vocab.wnids[i] for i, n in enumerate(vocab.names)}
    names, black = [], []
    for index, (stem, (source, objects, blacklisted)) in enumerate(PHOTOS.items(), 1):
        pixels = load(source)
        image = Image.fromarray(pixels)
        image = image.convert("L" if image.mode in ("L", "I;16") else "RGB")
        out = HERE / "Data" / "DET" / "val" / f"{stem}.JPEG"
        out.parent.mkdir(parents=True, exist_ok=True)
        image.save(out, quality=95)
        write_annotation(str(HERE / "Annotations" / "DET" / "val" / f"{stem}.xml"), folder="val", filename=stem,
                         width=image.width, height=image.height, objects=[(wnid[c], box) for c, box in objects])
        names.append(f"val/{stem}")
        black += [f"{index} {wnid[c]}" for c in blacklisted]
    write_imageset(str(HERE / "ImageSets" / "DET" / "val.txt"), names)
    (HERE / "blacklist.txt").write_text("".join(line + "\n" for line in black))
    cls_dir = HERE / "cls"
    os.makedirs(cls_dir, exist_ok=True)
    (cls_dir / "labels.txt").write_text(
        "".join(f"{stem}.JPEG {index}\n" for stem, index in CLS_LABELS.items()))


if __name__ == "__main__":
    main()
