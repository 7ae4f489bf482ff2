"""Regions/s of R-CNN's warp (``detector/pipeline/warp.py``): its two backends against per-box loops, 1000 random boxes on
a 500x375 photo, best of 3.

    python bench/warp.py [--threads N]

The per-box ``cv2.warpAffine`` backend (the CPU default) against the batched ``grid_sample`` one (used for images
on a GPU), a per-box loop over the batched code (what batching saves), and pad + crop the rounded box +
``cv2.resize`` (faster still, but up to half a pixel off R-CNN's box; the networks cost about 50x more per region
than any of these, so the exact mapping is kept).
"""

from __future__ import annotations

import argparse
import time

import cv2
import numpy as np
import torch
from skimage import data

from detector.nets.summary import format_machine, machine
from detector.pipeline.warp import dilate_boxes, warp_regions

FILL = (124, 116, 104)
REGIONS = 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    img = cv2.resize(data.astronaut(), (500, 375), interpolation=cv2.INTER_AREA)
    h, w = img.shape[:2]
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(REGIONS, 2, generator=g) * torch.tensor([w, h])
    wh = 20 + torch.rand(REGIONS, 2, generator=g) * torch.tensor([w, h]) * 0.6
    boxes = torch.cat([xy - wh / 2, xy + wh / 2], 1)

    def per_box_torch():
        return torch.cat([warp_regions(img, boxes[i:i + 1], fill=FILL, backend="torch") for i in range(REGIONS)])

    def per_box_reference():
        d = dilate_boxes(boxes).round().int().tolist()
        pad = int(np.abs(np.array(d)).max()) + 1
        padded = cv2.copyMakeBorder(img, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=FILL)
        return [cv2.resize(padded[y1 + pad:y2 + pad, x1 + pad:x2 + pad], (224, 224)) for x1, y1, x2, y2 in d]

    cases = {
        "per-box cv2.warpAffine (backend='opencv', CPU default)":
            lambda: warp_regions(img, boxes, fill=FILL, backend="opencv"),
        "batched grid_sample (backend='torch')": lambda: warp_regions(img, boxes, fill=FILL, backend="torch"),
        "per-box loop over the batched torch code": per_box_torch,
        "pad + crop rounded box + cv2.resize (not exact)": per_box_reference,
    }
    for name, fn in cases.items():
        fn()
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        print(f"{name:58s} {REGIONS / best:8.0f} regions/s")
    print(f"on {format_machine(machine())}")


if __name__ == "__main__":
    main()
