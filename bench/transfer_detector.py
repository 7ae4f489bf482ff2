"""The det200-from-cls1000 transfer detector on real photos and on a synthetic proving ground: which post-processing
finds whole objects (devkit mAP per method, and what each costs).

For every image of each set, the detector's own proposals (selective search 2x, as ``ircnn detect``) are scored
once by the bundle's ensemble, and once more on each box's context frame (``detector.pipeline.warp.warp_frames``); both are
cached in ``--cache`` (npz, keyed by set and image). The rows are then pure functions of those probabilities, through
the functions ``Detector.score`` calls (``contrast_frames``, ``postprocess``), scored by the devkit rules
(``eval.ilsvrc``):

- ``plain``: per-class NMS at 0.3 (the paper's R-CNN post-processing),
- ``parts``: + ``suppress_parts`` (a box mostly inside a larger, nearly as confident same-class box is dropped),
- ``frames``: context-frame contrast on the ``--frames`` least-background regions,
- ``frames+parts``: both.

    python bench/transfer_detector.py --model runs/lite0-det --synth /tmp/synth --cache /tmp/td-cache
    python bench/transfer_detector.py --model runs/lite0-det --synth /tmp/synth --cache /tmp/td-cache --json

The real-photo set is ``data/real_photos`` of this repository; ``--synth DIR`` is an ``ircnn data synth`` set
(its val split). Seconds per image for the extra frames are measured on the networks' pass (``--backend``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from detector.bundle.format import load_bundle
from detector.config import DetectConfig
from detector.image import read_image
from detector.nets.summary import format_machine, machine
from detector.pipeline.detector import Detector, postprocess
from detector.pipeline.ensemble import EnsembleConfig
from detector.pipeline.scoring import contrast_frames
from eval.annotations import read_annotations, read_blacklist, read_imageset
from eval.detections import DetectionTable
from eval.ilsvrc import DetectionEvaluator

REPO = Path(__file__).resolve().parent.parent


def image_sets(args) -> dict[str, tuple[Path, Path, Path | None]]:
    """name -> (root with Data/ and Annotations/, imageset file, blacklist or None)."""
    real = REPO / "data" / "real_photos"
    sets = {"real": (real, real / "ImageSets" / "DET" / "val.txt", real / "blacklist.txt")}
    if args.synth:
        root = Path(args.synth)
        sets["synth"] = (root, root / "ImageSets" / "DET" / "val.txt", None)
    return sets


def cached_scores(detector: Detector, name: str, root: Path, imageset: dict[str, int], cache: Path,
                  limit: int | None) -> dict[int, dict]:
    """{image index: {"boxes", "probs", "frames", "seconds_regions", "seconds_frames"}} for the first ``limit``."""
    out = {}
    for i, (stem, index) in enumerate(imageset.items()):
        if limit is not None and i >= limit:
            break
        file = cache / f"{name}-{index}.npz"
        if file.is_file():
            with np.load(file) as z:
                out[index] = {k: z[k] for k in z.files}
            continue
        image = read_image(str(root / "Data" / "DET" / f"{stem}.JPEG"))
        boxes = detector.regions(image, detector.propose(image))
        t0 = time.perf_counter()
        probs, _ = detector.scorer.score_regions(image, boxes)
        t1 = time.perf_counter()
        frames = detector.scorer.score_frames(image, boxes)
        t2 = time.perf_counter()
        out[index] = {"boxes": boxes.numpy(), "probs": probs.numpy(), "frames": frames.numpy(),
                      "seconds_regions": np.float64(t1 - t0), "seconds_frames": np.float64(t2 - t1)}
        np.savez(file, **out[index])
        print(f"  {name} {stem}: {len(boxes)} regions, {t1 - t0:.1f} s + frames {t2 - t1:.1f} s", flush=True)
    return out


def run_method(scores: dict[int, dict], det_ids: torch.Tensor, config: DetectConfig, frames: int,
               parts: bool) -> DetectionTable:
    found = []
    for index, s in scores.items():
        boxes, probs = torch.from_numpy(s["boxes"]), torch.from_numpy(s["probs"])
        if frames:
            top = probs[:, 0].argsort()[:frames]
            boxes, probs = boxes[top], contrast_frames(probs[top], torch.from_numpy(s["frames"])[top])
        dets = postprocess(boxes, probs, det_ids, config, whole_objects=parts)
        found.append(DetectionTable(np.full(len(dets), index, np.int64), dets.det_ids.numpy().astype(np.int64),
                                    dets.scores.double().numpy(), dets.boxes.double().numpy()))
    return DetectionTable.concat(found)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a det200-from-cls1000 bundle")
    ap.add_argument("--synth", help="an `ircnn data synth` set: its val split is the proving ground")
    ap.add_argument("--cache", default="/tmp/transfer-detector-cache")
    ap.add_argument("--backend", default="onnxruntime", help="torch, onnxruntime or openvino (fp32)")
    ap.add_argument("--frames", type=int, default=300, help="regions re-scored on their context frame")
    ap.add_argument("--limit", type=int, default=None, help="images per set (default all)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    bundle = load_bundle(args.model)
    config = DetectConfig(ensemble=EnsembleConfig(backend=args.backend))
    rows = {}
    with Detector.from_bundle(bundle, config) as detector:
        det_ids = detector.scorer.det_ids
        for name, (root, imageset_file, blacklist_file) in image_sets(args).items():
            imageset = read_imageset(str(imageset_file))
            scores = cached_scores(detector, name, root, imageset, cache, args.limit)
            annotations = read_annotations(str(root / "Annotations" / "DET"), imageset)
            annotations = {k: v for k, v in annotations.items() if k in scores}
            blacklist = read_blacklist(str(blacklist_file)) if blacklist_file else ()
            regions = float(np.mean([len(s["boxes"]) for s in scores.values()]))
            per_region = sum(float(s["seconds_regions"]) for s in scores.values()) / sum(
                len(s["boxes"]) for s in scores.values())
            f = args.frames
            methods = {  # name: (config, regions re-scored on their frames, part suppression)
                "plain": (DetectConfig(), 0, False),
                "parts 0.8/0.8": (DetectConfig(), 0, True),
                "parts 0.9/0.5": (DetectConfig(part_overlap=0.9, part_ratio=0.5), 0, True),
                "parts 0.7/0.9": (DetectConfig(part_overlap=0.7, part_ratio=0.9), 0, True),
                f"frames {f}": (DetectConfig(), f, False),
                "frames all": (DetectConfig(), 3000, False),
                f"frames {f} + parts 0.8/0.8": (DetectConfig(), f, True),
                f"frames {f} + parts 0.9/0.5": (DetectConfig(part_overlap=0.9, part_ratio=0.5), f, True),
            }
            for method, (cfg, frames, parts) in methods.items():
                evaluator = DetectionEvaluator(annotations, blacklist=blacklist)
                evaluator.process(run_method(scores, det_ids, cfg, frames, parts))
                result = evaluator.evaluate()
                extra = min(frames, regions) * per_region
                rows.setdefault(method, {})[name] = {
                    "map": result.map, "classes": {c.name: c.ap for c in result.classes if c.ap is not None},
                    "extra_seconds_per_image": extra, "regions_per_image": regions}
    doc = {"machine": machine(), "backend": args.backend, "model": str(args.model), "rows": rows}
    if args.json:
        print(json.dumps(doc, indent=2))
        return
    print(f"{format_machine(doc['machine'])}, backend {args.backend}")
    for method, sets in rows.items():
        cells = "  ".join(f"{n} mAP {r['map']:.3f} (+{r['extra_seconds_per_image']:.1f} s/img)" for n, r in sets.items())
        print(f"{method:<22} {cells}")
        for n, r in sets.items():
            print(f"{'':<22} {n}: " + ", ".join(f"{c} {ap:.2f}" for c, ap in r["classes"].items()))


if __name__ == "__main__":
    main()
