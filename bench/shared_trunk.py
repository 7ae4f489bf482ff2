"""Shared-trunk scoring (``detector/pipeline/shared_trunk.py``) against warped-region scoring: devkit mAP and seconds per
image on the same proposals, through the same post-processing (``Detector.score`` with its defaults).

For every image of each set, selective search 2x (as ``ircnn detect``, no MultiBox) proposes once; the proposals
are cached in ``--cache`` so that both scorers and every rerun score the same boxes. Rows:

- ``warped``: ``RegionScorer`` (``--backend``), the paper's R-CNN; whole objects on (the bundle is
  det200-from-cls1000), so the 300 least-background regions are scored again on their warped context frames.
- ``shared, frames pooled``: ``SharedTrunkScorer``, the context frames pooled from the same feature maps.
- ``shared, frames warped``: the shared trunk's region scores, the frames warped and scored as ``warped`` does.
- ``... whole objects off``: the same region scores, per-class NMS only (no frames, no part suppression).

``s/img`` columns: ``networks`` (the scorers' network time, frames included), ``scoring`` (``Detector.score``:
warping or resizing and pooling, networks, NMS), ``total`` (selective search + scoring). A random full-width
GoogLeNet bundle (``--googlenet-images``) and the warped scorer in torch (``--torch-images``, the engine the
shared trunk runs on) are timed on the first real photos only: speed, no mAP.

    python bench/shared_trunk.py --model /tmp/trunk-lite0 --synth /tmp/synth --synth-limit 24
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from detector.bundle.format import init_bundle, load_bundle
from detector.config import DetectConfig, EnsembleConfig
from detector.image import read_image
from detector.nets.googlenet import GoogLeNetConfig
from detector.nets.summary import format_machine, machine
from detector.pipeline.detector import Detector, postprocess
from detector.pipeline.scoring import RegionScorer, contrast_frames
from detector.pipeline.shared_trunk import SharedTrunkConfig, SharedTrunkScorer
from eval.annotations import read_annotations, read_blacklist, read_imageset
from eval.detections import DetectionTable
from eval.ilsvrc import DetectionEvaluator
from proposals.combine import ProposalGenerator

REPO = Path(__file__).resolve().parent.parent


class Recording:
    """A scorer that keeps its last ``score_regions`` result (boxes, probabilities, seconds), so that rows which
    differ only after region scoring reuse it; everything else is the wrapped scorer's."""

    def __init__(self, scorer) -> None:
        self.scorer = scorer
        self.last = None

    def __getattr__(self, name):
        return getattr(self.scorer, name)

    def score_regions(self, image, boxes):
        probs, seconds = self.scorer.score_regions(image, boxes)
        self.last = (boxes, probs, dict(seconds))
        return probs, seconds


def image_sets(args) -> dict[str, tuple[Path, Path, Path | None, int | None]]:
    """name -> (root with Data/ and Annotations/, imageset file, blacklist or None, image limit)."""
    real = REPO / "data" / "real_photos"
    sets = {"real": (real, real / "ImageSets" / "DET" / "val.txt", real / "blacklist.txt", args.limit)}
    if args.synth:
        root = Path(args.synth)
        sets["synth"] = (root, root / "ImageSets" / "DET" / "val.txt", None, args.synth_limit)
    return sets


def cached_proposals(generator: ProposalGenerator, detector: Detector, image: np.ndarray,
                     file: Path) -> tuple[torch.Tensor, float]:
    """The boxes ``Detector.score`` scores (``Detector.regions`` of the proposals), and selective search's seconds."""
    if file.is_file():
        with np.load(file) as z:
            return torch.from_numpy(z["boxes"]), float(z["seconds"])
    proposals, seconds = generator(image)
    boxes = detector.regions(image, proposals)
    np.savez(file, boxes=boxes.numpy(), seconds=np.float64(sum(seconds.values())))
    return boxes, float(sum(seconds.values()))


def table(index: int, dets) -> DetectionTable:
    return DetectionTable(np.full(len(dets), index, np.int64), dets.det_ids.numpy().astype(np.int64),
                          dets.scores.double().numpy(), dets.boxes.double().numpy())


def score_image(image: np.ndarray, boxes: torch.Tensor, warped: Recording, shared: Recording,
                generator: ProposalGenerator, config: DetectConfig) -> dict[str, tuple]:
    """{row: (Detections, networks seconds, scoring seconds)} for one image."""
    rows = {}
    for name, scorer in (("warped", warped), ("shared, frames pooled", shared)):
        detector = Detector(scorer, generator, config)
        t0 = time.perf_counter()
        dets = detector.score(image, boxes)
        rows[name] = (dets, dets.seconds["networks"], time.perf_counter() - t0)
        # whole objects off: the same region scores, per-class NMS only (what Detector.score then does)
        regions, probs, seconds = scorer.last
        t0 = time.perf_counter()
        off = postprocess(regions, probs, scorer.det_ids, config, whole_objects=False)
        nms = time.perf_counter() - t0
        rows[f"{name.split(',')[0]}, whole objects off"] = (off, seconds["networks"],
                                                           seconds["warp"] + seconds["networks"] + nms)
    # shared region scores, warped frames: Detector.score's frame step with the warped scorer's frames
    regions, probs, seconds = shared.last
    t0 = time.perf_counter()
    frame_seconds = {"warp": 0.0, "networks": 0.0}
    top = probs[:, 0].argsort()[: config.context_frames]
    framed = contrast_frames(probs[top], warped.score_frames(image, regions[top], frame_seconds))
    dets = postprocess(regions[top], framed, shared.det_ids, config, whole_objects=True)
    rows["shared, frames warped"] = (dets, seconds["networks"] + frame_seconds["networks"],
                                     seconds["warp"] + seconds["networks"] + time.perf_counter() - t0)
    return rows


def speed_only(bundle, images: list[np.ndarray], boxes: list[torch.Tensor], generator,
               trunk: SharedTrunkConfig) -> dict[str, dict]:
    """Seconds per image of ``Detector.score``, warped and shared trunk, each in torch and in ONNX Runtime, on
    ``images`` (no mAP)."""
    scorers, out = {}, {}
    for engine in ("torch", "onnxruntime"):
        config = DetectConfig(ensemble=EnsembleConfig(backend=engine))
        scorers[f"warped ({engine})"] = RegionScorer(bundle, config)
        scorers[f"shared ({engine})"] = SharedTrunkScorer(bundle, config, dataclasses.replace(trunk, engine=engine))
    for name, scorer in scorers.items():
        detector = Detector(scorer, generator, DetectConfig())
        networks = scoring = 0.0
        for image, b in zip(images, boxes):
            t0 = time.perf_counter()
            dets = detector.score(image, b)
            scoring += time.perf_counter() - t0
            networks += dets.seconds["networks"]
        out[name] = {"networks": networks / len(images), "scoring": scoring / len(images),
                     "regions": float(np.mean([len(b) for b in boxes]))}
        print(f"  {name}: {out[name]}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a det200-from-cls1000 bundle")
    ap.add_argument("--synth", help="an `ircnn data synth` set: its val split")
    ap.add_argument("--synth-limit", type=int, default=24, help="synthetic images (the first of the val split)")
    ap.add_argument("--limit", type=int, default=None, help="real photos (default all)")
    ap.add_argument("--cache", default="/tmp/shared-trunk-cache", help="proposals per image (npz)")
    ap.add_argument("--backend", default="onnxruntime", help="the warped scorer's: torch, onnxruntime, openvino")
    ap.add_argument("--short-sides", default="224,320,448,640", help="the shared trunk's pyramid")
    ap.add_argument("--engine", default="onnxruntime", help="the shared trunk's: torch or onnxruntime")
    ap.add_argument("--speed-images", default="val/camera", help="real photos (comma-separated) timed in torch and "
                    "ONNX Runtime, for Lite and a random full-width GoogLeNet; '' for none")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    start_machine = machine()
    bundle = load_bundle(args.model)
    config = DetectConfig(ensemble=EnsembleConfig(backend=args.backend))
    trunk = SharedTrunkConfig(short_sides=tuple(int(v) for v in args.short_sides.split(",")), engine=args.engine)
    warped = Recording(RegionScorer(bundle, config))
    shared = Recording(SharedTrunkScorer(bundle, config, trunk))
    generator = ProposalGenerator.from_config(config.proposals)  # selective search 2x; the bundle has no MultiBox
    proposer = Detector(warped, generator, config)
    rows: dict[str, dict] = {}
    speed_stems = [v for v in args.speed_images.split(",") if v]
    first: tuple[list, list] = ([], [])  # the --speed-images photos and their boxes
    try:
        for set_name, (root, imageset_file, blacklist_file, limit) in image_sets(args).items():
            imageset = dict(list(read_imageset(str(imageset_file)).items())[:limit])
            found: dict[str, list] = {}
            seconds: dict[str, list] = {}
            proposal_seconds, regions = [], []
            for stem, index in imageset.items():
                image = read_image(str(root / "Data" / "DET" / f"{stem}.JPEG"))
                boxes, s = cached_proposals(generator, proposer, image, cache / f"{set_name}-{index}.npz")
                proposal_seconds.append(s)
                regions.append(len(boxes))
                if set_name == "real" and stem in speed_stems:
                    first[0].append(image)
                    first[1].append(boxes)
                for row, (dets, networks, scoring) in score_image(image, boxes, warped, shared, generator,
                                                                  config).items():
                    found.setdefault(row, []).append(table(index, dets))
                    seconds.setdefault(row, []).append((networks, scoring))
                print(f"  {set_name} {stem}: {len(boxes)} regions, " + ", ".join(
                    f"{row} {seconds[row][-1][1]:.1f} s" for row in seconds), flush=True)
            annotations = read_annotations(str(root / "Annotations" / "DET"), imageset)
            blacklist = read_blacklist(str(blacklist_file)) if blacklist_file else ()
            for row, tables in found.items():
                evaluator = DetectionEvaluator(annotations, blacklist=blacklist)
                evaluator.process(DetectionTable.concat(tables))
                net, scoring = np.mean(seconds[row], axis=0)
                rows.setdefault(row, {})[set_name] = {
                    "map": evaluator.evaluate().map, "networks": float(net), "scoring": float(scoring),
                    "total": float(scoring + np.mean(proposal_seconds)), "proposals": float(np.mean(proposal_seconds)),
                    "regions": float(np.mean(regions)), "images": len(imageset)}
        speed = {}
        if first[0]:
            print("speed only, Lite:", flush=True)
            speed["lite"] = speed_only(bundle, *first, generator, trunk)
            print("speed only, GoogLeNet (random, full width):", flush=True)
            google = init_bundle(GoogLeNetConfig(variant="torchvision"), task="det200-from-cls1000")
            speed["googlenet"] = speed_only(google, *first, generator, trunk)
    finally:
        generator.close()
    doc = {"machine": start_machine, "load_average_end": [round(v, 2) for v in os.getloadavg()],
           "backend": args.backend, "model": str(args.model), "short_sides": list(trunk.short_sides),
           "rows": rows, "speed_only": speed}
    if args.json:
        print(json.dumps(doc, indent=2))
        return
    print(f"{format_machine(doc['machine'])}; load average at the end "
          f"{' / '.join(f'{v:.1f}' for v in doc['load_average_end'])}; warped backend {args.backend}, "
          f"shared trunk in {args.engine}, pyramid {args.short_sides}")
    print(f"{'row':<34} {'set':<6} {'mAP':>6} {'regions':>8} {'networks':>9} {'scoring':>8} {'total':>8}  (s/img)")
    for row, sets in rows.items():
        for set_name, r in sets.items():
            print(f"{row:<34} {set_name:<6} {r['map']:>6.3f} {r['regions']:>8.0f} {r['networks']:>9.2f} "
                  f"{r['scoring']:>8.2f} {r['total']:>8.2f}")
    for name, scorers in speed.items():
        for scorer, r in scorers.items():
            print(f"{name + ', ' + scorer:<34} {'real':<6} {'-':>6} {r['regions']:>8.0f} {r['networks']:>9.2f} "
                  f"{r['scoring']:>8.2f}")


if __name__ == "__main__":
    main()
