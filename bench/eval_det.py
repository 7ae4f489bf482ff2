"""Detection scoring speed at the size of ILSVRC DET val: 20,000 images x 200 classes x 100 detections per image
(2M detections, about 55,000 objects), generated in memory. The bar: under 60 s on a 2-core machine.

The objects follow val's statistics loosely (about 2.75 per 500 x 375 image, sides log-uniform 16..400 px, a
third of them small enough for the devkit's small-object rule). A quarter of the detections cluster around objects
(jittered copies of their class, as a detector's output before the last NMS), the rest are random classes and
boxes, scores loosely tied to overlap.

    python bench/eval_det.py                    # ilsvrc mode, in memory
    python bench/eval_det.py --modes all        # every mode
    python bench/eval_det.py --io               # also write and read the devkit submission file
    python bench/eval_det.py --images 2000      # smaller
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np

from detector.nets.summary import format_machine, machine
from eval.annotations import ImageAnnotation
from eval.detections import DetectionTable
from eval.ilsvrc import MODES, DetectionEvaluator
from eval.submission import read_submission, write_submission


def generate(images: int, per_image: int, seed: int = 0) -> tuple[dict[int, ImageAnnotation], DetectionTable]:
    rng = np.random.default_rng(seed)
    width, height = 500, 375
    n_obj = rng.poisson(2.75, size=images)
    n_obj[n_obj == 0] = 1
    g = int(n_obj.sum())
    gt_image = np.repeat(np.arange(1, images + 1), n_obj)
    side = np.exp(rng.uniform(np.log(16), np.log(400), size=(g, 2)))
    side = np.minimum(side, [width, height])
    xy = rng.uniform(0, 1, size=(g, 2)) * ([width, height] - side)
    gt_boxes = np.round(np.c_[xy, xy + side])
    gt_class = rng.integers(1, 201, size=g)

    # Clustered detections: a quarter of each image's budget spread over its objects.
    near_per_image = per_image // 4
    src = np.concatenate([o0 + rng.integers(0, n, size=near_per_image)
                          for o0, n in zip(np.cumsum(n_obj) - n_obj, n_obj)])
    w = gt_boxes[src, 2:] - gt_boxes[src, :2]
    jitter = rng.normal(0, 0.15, size=(len(src), 4)) * np.c_[w, w]
    near_boxes = gt_boxes[src] + jitter
    near_class = np.where(rng.random(len(src)) < 0.7, gt_class[src], rng.integers(1, 201, size=len(src)))
    near_score = np.clip(1 - np.abs(jitter).mean(axis=1) / w.mean(axis=1) + rng.normal(0, 0.2, len(src)), 0, 1)

    far = images * (per_image - near_per_image)
    far_xy = rng.uniform(0, 1, size=(far, 2)) * [width, height]
    far_wh = np.exp(rng.uniform(np.log(8), np.log(300), size=(far, 2)))
    dets = DetectionTable(
        image=np.concatenate([gt_image[src], np.repeat(np.arange(1, images + 1), per_image - near_per_image)]),
        det_id=np.concatenate([near_class, rng.integers(1, 201, size=far)]),
        score=np.round(np.concatenate([near_score, rng.beta(1, 4, size=far)]), 4),  # rounded: plenty of ties
        boxes=np.round(np.concatenate([near_boxes, np.c_[far_xy, far_xy + far_wh]])),
    )
    shuffle = rng.permutation(len(dets))  # a file is not sorted by anything
    dets = DetectionTable(dets.image[shuffle], dets.det_id[shuffle], dets.score[shuffle], dets.boxes[shuffle])

    starts = np.cumsum(n_obj) - n_obj
    annotations = {i + 1: ImageAnnotation(f"ILSVRC2013_val_{i + 1:08d}", width, height,
                                          gt_boxes[s:s + n], gt_class[s:s + n])
                   for i, (s, n) in enumerate(zip(starts.tolist(), n_obj.tolist()))}
    return annotations, dets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--per-image", type=int, default=100)
    parser.add_argument("--modes", default="ilsvrc", help="comma-separated, or 'all'")
    parser.add_argument("--io", action="store_true", help="also time writing and reading a submission file")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    modes = MODES if args.modes == "all" else tuple(args.modes.split(","))

    t = time.perf_counter()
    annotations, dets = generate(args.images, args.per_image)
    report = {"images": args.images, "objects": int(sum(len(a.det_ids) for a in annotations.values())),
              "detections": len(dets), "cores": os.cpu_count(), "generate_s": round(time.perf_counter() - t, 2),
              "machine": machine()}
    if args.io:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "submission.txt")
            t = time.perf_counter()
            write_submission(path, dets)
            report["write_submission_s"] = round(time.perf_counter() - t, 2)
            t = time.perf_counter()
            dets = read_submission(path)
            report["read_submission_s"] = round(time.perf_counter() - t, 2)
    for mode in modes:
        t = time.perf_counter()
        evaluator = DetectionEvaluator(annotations, mode=mode)
        evaluator.process(dets)
        result = evaluator.evaluate()
        report[f"{mode}_s"] = round(time.perf_counter() - t, 2)
        report[f"{mode}_map"] = round(result.map, 4)
    if args.json:
        print(json.dumps(report))
        return
    print(f"{report['images']} images, {report['objects']} objects, {report['detections']} detections, "
          f"{report['cores']} cores (generated in {report['generate_s']} s)")
    print(f"on {format_machine(report['machine'])}")
    for key in ("write_submission_s", "read_submission_s"):
        if key in report:
            print(f"{key[:-2].replace('_', ' '):<18} {report[key]:6.2f} s")
    for mode in modes:
        print(f"score {mode:<12} {report[f'{mode}_s']:6.2f} s   mAP {100 * report[f'{mode}_map']:.2f}%")


if __name__ == "__main__":
    main()
