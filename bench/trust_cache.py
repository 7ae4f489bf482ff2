"""Cache what a det200-from-cls1000 bundle computes on each photo of a set, once, so that post-processing methods
(image-level context, class activation maps, person evidence, ensembles) can be compared on the dev split in
seconds instead of re-running the networks (``bench/trust.py`` reads these files).

Per image (``<cache>/<set>/<stem>.npz``), for the detector's own proposals (``ircnn detect`` defaults):

- ``boxes [R, 4]``: the regions ``Detector.regions`` scores;
- ``probs [R, 1000]`` float16: the ensemble's 1000-way softmax of each warped region;
- ``frame_rows [F]``, ``frames [F, 1000]`` float16: the context frames (``warp_frames``) of the ``F`` regions least
  likely DET background (F = ``--frames``);
- ``image10 [1000]``, ``image1 [1000]``: whole-image softmax, 10 crops and 1 centre crop (``crop_views``);
- ``feat [C, h, w]`` float16: the last feature map (before global pooling) of the image resized, aspect kept, to a
  longer side of ``--cam-side`` px, with ``fc_w [1000, C]`` / ``fc_b`` in the bundle file: class activation maps;
- ``seconds``: regions, frames, whole image.

    python bench/trust_cache.py --model /tmp/lite0 --set pkg=data/package_photos --cache /tmp/trust-cache
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from detector.bundle import load_bundle
from detector.config import detect_config
from detector.image import read_image
from detector.pipeline.classify import crop_views
from detector.pipeline.detector import Detector
from detector.pipeline.warp import warp_frames, warp_regions


def images_of(root: Path) -> list[Path]:
    folder = root / "Data" / "DET" / "val"
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpeg", ".jpg", ".png"))


@torch.inference_mode()
def cache_image(detector: Detector, model: torch.nn.Module, image: np.ndarray, frames: int, cam_side: int) -> dict:
    scorer = detector.scorer
    ens = scorer.ensemble
    boxes = detector.regions(image, detector.propose(image))
    t0 = time.perf_counter()
    probs = torch.cat([ens(warp_regions(image, boxes[s:s + 128], scorer.size, scorer.context, scorer.fill))
                       for s in range(0, len(boxes), 128)]) if len(boxes) else torch.zeros(0, 1000)
    t1 = time.perf_counter()
    background = 1.0 - probs[:, scorer.cls_mapped].sum(1)
    rows = background.argsort()[:frames]
    fr = torch.cat([ens(warp_frames(image, boxes[rows][s:s + 128], scorer.size, 1.8, scorer.fill))
                    for s in range(0, len(rows), 128)]) if len(rows) else torch.zeros(0, 1000)
    t2 = time.perf_counter()
    image10 = ens(crop_views(image, 10, scorer.size)).mean(0)
    image1 = ens(crop_views(image, 1, scorer.size)).mean(0)
    h, w = image.shape[:2]
    s = cam_side / max(h, w)
    size = (max(32, round(h * s / 32) * 32), max(32, round(w * s / 32) * 32))
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    feat = model.extract_features(ens.transform(x.round().clamp(0, 255).to(torch.uint8)))[0]
    t3 = time.perf_counter()
    return {"boxes": boxes.numpy(), "probs": probs.half().numpy(), "frame_rows": rows.numpy(),
            "frames": fr.half().numpy(), "image10": image10.numpy(), "image1": image1.numpy(),
            "feat": feat.half().numpy(), "shape": np.array([h, w]),
            "seconds": np.array([t1 - t0, t2 - t1, t3 - t2])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--set", action="append", required=True, help="NAME=DIR (a DET layout: Data/DET/val/...)")
    ap.add_argument("--cache", required=True)
    ap.add_argument("--frames", type=int, default=500)
    ap.add_argument("--cam-side", type=int, default=448)
    ap.add_argument("--backend", default="onnxruntime")
    args = ap.parse_args()
    bundle = load_bundle(args.model)
    detector = Detector.from_bundle(bundle, detect_config(backend=args.backend))
    model = bundle.members[0].eval()
    cache = Path(args.cache)
    fc = model._fc
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(cache / f"fc-{bundle.arch.variant}.npz", w=fc.weight.detach().numpy(), b=fc.bias.detach().numpy())
    with detector:
        for spec in args.set:
            name, root = spec.split("=", 1)
            (cache / name).mkdir(exist_ok=True)
            for path in images_of(Path(root)):
                out = cache / name / f"{path.stem}.npz"
                if out.is_file():
                    continue
                got = cache_image(detector, model, read_image(str(path)), args.frames, args.cam_side)
                np.savez(out, **got)
                print(f"{name} {path.stem}: {len(got['boxes'])} regions, seconds {got['seconds'].round(1)}", flush=True)


if __name__ == "__main__":
    main()
