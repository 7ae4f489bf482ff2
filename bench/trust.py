"""Which post-processing makes a det200-from-cls1000 detector trustworthy on photos nobody tuned on: devkit mAP per
method on each labelled set, from what ``bench/trust_cache.py`` cached (no network runs here: seconds per method).

    python bench/trust.py --cache /tmp/trust/lite0 --set real=data/real_photos:val \
        --set dev=data/package_photos:dev --set test=data/package_photos:test [--method NAME ...]

``--set NAME=DIR:SPLIT`` reads ``DIR/ImageSets/DET/SPLIT.txt``, ``DIR/Annotations/DET`` and ``DIR/blacklist.txt``
(when present) and the cache's ``<cache>/<cache set>/<stem>.npz`` (``--cache-set NAME=CACHESET`` when they differ).
Besides mAP: ``neg max`` is the highest score on the photos without any DET object (the issue's "no detection
should reach 0.5"), ``prec@t`` the share of detections scoring ``>= t`` that match an object (IoU >= 0.5, right
class) and ``rec@t`` the share of objects found at that threshold.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from detector.config import DetectConfig
from detector.pipeline.agreement import agreement_scores
from detector.pipeline.detector import postprocess
from detector.pipeline.scoring import contrast_frames
from eval.annotations import read_annotations, read_blacklist, read_imageset
from eval.classes import det200_from_cls1000
from eval.detections import DetectionTable
from eval.ilsvrc import DetectionEvaluator, devkit_iou

PERSON_EVIDENCE = [399, 400, 411, 445, 465, 474, 501, 568, 578, 601, 608, 610, 614, 617, 652, 689, 697, 735, 775,
                   824, 834, 841, 869, 887, 903, 796, 667, 570, 691]


def mapping(evidence: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    m = det200_from_cls1000()
    det_ids = torch.tensor(sorted(m), dtype=torch.int64)
    cls_to_det = torch.zeros(1000, len(det_ids))
    for j, d in enumerate(det_ids.tolist()):
        cls_to_det[list(m[d]), j] = 1.0
    if evidence:
        person = det_ids.tolist().index(124)
        cls_to_det[PERSON_EVIDENCE, person] = 1.0
    return det_ids, cls_to_det


def to_det(probs: torch.Tensor, cls_to_det: torch.Tensor) -> torch.Tensor:
    mapped = cls_to_det.sum(1) > 0
    det = probs @ cls_to_det
    bg = (1.0 - probs[:, mapped].sum(1, keepdim=True)).clamp(min=0)
    return torch.cat([bg, det], 1)


def cam_maps(feat: np.ndarray, fc_w: np.ndarray, weights: torch.Tensor) -> torch.Tensor:
    """``feat [C, h, w]``, ``fc_w [1000, C]``, ``weights [K, 1000]`` (per DET class, its CLS classes' weights) ->
    ``[K, h, w]`` class activation maps, ReLU'd."""
    f = torch.from_numpy(feat.astype(np.float32))  # [C, h, w]
    cams = torch.from_numpy(fc_w) @ f.flatten(1)  # [1000, h*w]
    return (weights @ cams).clamp(min=0).view(-1, *feat.shape[1:])


def box_cam_factor(boxes: torch.Tensor, cam: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """For each box and class: (CAM mass inside the box / all CAM mass) * (mean CAM inside / max CAM) ->
    ``[R, K]`` in 0..1: high for a box that holds the activated area and little else."""
    h, w = shape
    k, gh, gw = cam.shape
    up = torch.nn.functional.interpolate(cam[None], size=(max(1, h // 4), max(1, w // 4)), mode="bilinear",
                                         align_corners=False)[0]  # [K, H/4, W/4]
    hh, ww = up.shape[1:]
    integral = torch.zeros(k, hh + 1, ww + 1)
    integral[:, 1:, 1:] = up.cumsum(1).cumsum(2)
    b = boxes / 4.0
    x1 = b[:, 0].clamp(0, ww).floor().long(); x2 = b[:, 2].clamp(0, ww).ceil().long()
    y1 = b[:, 1].clamp(0, hh).floor().long(); y2 = b[:, 3].clamp(0, hh).ceil().long()
    inside = (integral[:, y2, x2] - integral[:, y1, x2] - integral[:, y2, x1] + integral[:, y1, x1]).T  # [R, K]
    total = integral[:, -1, -1].clamp(min=1e-9)
    area = ((x2 - x1) * (y2 - y1)).clamp(min=1).float()[:, None]
    peak = up.flatten(1).max(1).values.clamp(min=1e-9)
    return (inside / total) * (inside / area / peak)


def vote_maps(boxes: torch.Tensor, scores: torch.Tensor, shape: tuple[int, int], stride: int = 8) -> torch.Tensor:
    """``boxes [R, 4]``, ``scores [R, K]`` -> ``[K, H/stride, W/stride]``: at each pixel, the mean score of the
    regions that cover it (agreement across overlapping boxes)."""
    h, w = (max(1, shape[0] // stride), max(1, shape[1] // stride))
    b = (boxes / stride).round().long()
    x1, y1 = b[:, 0].clamp(0, w), b[:, 1].clamp(0, h)
    x2, y2 = b[:, 2].clamp(0, w).maximum(x1 + 1).clamp(max=w), b[:, 3].clamp(0, h).maximum(y1 + 1).clamp(max=h)
    k = scores.shape[1]
    acc = torch.zeros(k + 1, h + 1, w + 1)
    vals = torch.cat([scores, torch.ones(len(boxes), 1)], 1).T  # [K + 1, R]: scores and the count
    for ys, xs, sign in ((y1, x1, 1), (y1, x2, -1), (y2, x1, -1), (y2, x2, 1)):
        acc.index_put_((torch.arange(k + 1)[:, None].expand(-1, len(boxes)), ys[None].expand(k + 1, -1),
                        xs[None].expand(k + 1, -1)), sign * vals, accumulate=True)
    acc = acc.cumsum(1).cumsum(2)[:, :h, :w]
    return acc[:k] / acc[k:].clamp(min=1)


def box_map_factor(boxes: torch.Tensor, maps: torch.Tensor, stride: int, mode: str = "global",
                   scale: float = 1.8) -> torch.Tensor:
    """Per box and map -> ``[R, K]``: "global": (mass inside / all mass) * (mean inside / peak); "local": (mass
    inside / mass inside the box ``scale`` times larger) * (mean inside / peak); "density": mean inside / peak."""
    k, hh, ww = maps.shape
    integral = torch.zeros(k, hh + 1, ww + 1)
    integral[:, 1:, 1:] = maps.cumsum(1).cumsum(2)

    def mass(b):
        b = b / stride
        x1 = b[:, 0].clamp(0, ww).floor().long(); x2 = b[:, 2].clamp(0, ww).ceil().long()
        y1 = b[:, 1].clamp(0, hh).floor().long(); y2 = b[:, 3].clamp(0, hh).ceil().long()
        inside = (integral[:, y2, x2] - integral[:, y1, x2] - integral[:, y2, x1] + integral[:, y1, x1]).T
        return inside, ((x2 - x1) * (y2 - y1)).clamp(min=1).float()[:, None]
    inside, area = mass(boxes)
    peak = maps.flatten(1).max(1).values.clamp(min=1e-9)
    density = inside / area / peak
    if mode == "density":
        return density
    if mode.startswith("split"):  # "split A B": (mass share) ** A * density ** B
        a, b = (float(v) for v in mode.split()[1:])
        return (inside / integral[:, -1, -1].clamp(min=1e-9)) ** a * density ** b
    if mode == "local":
        centre, half = (boxes[:, :2] + boxes[:, 2:]) / 2, (boxes[:, 2:] - boxes[:, :2]) * scale / 2
        outer, _ = mass(torch.cat([centre - half, centre + half], 1))
        return inside / outer.clamp(min=1e-9) * density
    total = integral[:, -1, -1].clamp(min=1e-9)
    return (inside / total) * density


@dataclasses.dataclass(frozen=True)
class Method:
    frames: int = 300  # regions re-scored on their context frames (0: none)
    parts: bool = True
    context: str = ""  # "", "image10", "image1": multiply by the image-level DET probability
    context_power: float = 1.0
    gate: float = 0.0  # > 0: multiply by min(1, p_image / gate) ** context_power instead of p_image ** power
    cam: float = 0.0  # power of the CAM factor (0: off)
    evidence: bool = False
    vote: float = 0.0  # power of the vote-map factor (0: off)
    vote_mode: str = "global"
    vote_scale: float = 1.8
    nms_iou: float = 0.3


def run(method: Method, entries: dict[int, dict], fc_w: np.ndarray | None) -> DetectionTable:
    det_ids, cls_to_det = mapping(method.evidence)
    config = DetectConfig(nms_iou=method.nms_iou)
    found = []
    for index, z in entries.items():
        boxes = torch.from_numpy(z["boxes"]).float()
        probs = to_det(torch.from_numpy(z["probs"]).float(), cls_to_det)
        if method.frames and len(boxes):
            rows = torch.from_numpy(z["frame_rows"])
            bg = probs[:, 0]
            order = bg.argsort()[: method.frames]
            # the cache's frames are of the regions least background under the plain mapping
            pos = {int(r): i for i, r in enumerate(rows.tolist())}
            order = torch.tensor([int(r) for r in order.tolist() if int(r) in pos], dtype=torch.long)
            fr = to_det(torch.from_numpy(z["frames"]).float()[[pos[int(r)] for r in order.tolist()]], cls_to_det)
            boxes, probs = boxes[order], contrast_frames(probs[order], fr)
        if method.vote and len(boxes) and method.vote_mode == "product":
            h, w = (int(v) for v in z["shape"])
            probs = agreement_scores(boxes, probs, h, w, method.vote)
        elif method.vote and len(boxes):
            base = torch.from_numpy(z["boxes"]).float()
            all_probs = to_det(torch.from_numpy(z["probs"]).float(), cls_to_det)[:, 1:]
            cols = (probs[:, 1:].max(0).values >= 0.01).nonzero(as_tuple=True)[0]
            factor = torch.zeros(len(boxes), probs.shape[1] - 1)
            if len(cols):
                maps = vote_maps(base, all_probs[:, cols], tuple(int(v) for v in z["shape"]))
                factor[:, cols] = box_map_factor(boxes, maps, 8, method.vote_mode, method.vote_scale)
            probs[:, 1:] = probs[:, 1:] * factor ** method.vote
        if method.context:
            img = to_det(torch.from_numpy(z[method.context]).float()[None], cls_to_det)[0, 1:]  # [K]
            factor = (img / method.gate).clamp(max=1.0) if method.gate else img
            probs[:, 1:] = probs[:, 1:] * factor[None] ** method.context_power
        if method.cam and len(boxes):
            weights = torch.from_numpy(z["image10"]).float()[None] * cls_to_det.T  # [K, 1000]
            cam = cam_maps(z["feat"], fc_w, weights)
            probs[:, 1:] = probs[:, 1:] * box_cam_factor(boxes, cam, tuple(z["shape"])) ** method.cam
        dets = postprocess(boxes, probs, det_ids, config, whole_objects=method.parts)
        found.append(DetectionTable(np.full(len(dets), index, np.int64), dets.det_ids.numpy().astype(np.int64),
                                    dets.scores.double().numpy(), dets.boxes.double().numpy()))
    return DetectionTable.concat(found)


def precision_recall(table: DetectionTable, annotations: dict, threshold: float) -> tuple[float, float, int]:
    hits = tp = 0
    n_obj = sum(len(a.det_ids) for a in annotations.values()) if annotations else 0
    found = set()
    keep = table.score >= threshold
    for img, det, box in zip(table.image[keep], table.det_id[keep], table.boxes[keep]):
        a = annotations.get(int(img))
        hit = False
        if a is not None:
            for j, (d, b) in enumerate(zip(a.det_ids, a.boxes)):
                if int(d) == int(det) and devkit_iou(np.asarray(box)[None], np.asarray(b)[None]).ravel()[0] >= 0.5:
                    hit = True
                    found.add((int(img), j))
        tp += hit
        hits += 1
    return (tp / hits if hits else float("nan")), (len(found) / n_obj if n_obj else float("nan")), hits


def tp_labels(table: DetectionTable, annotations: dict, blacklist) -> np.ndarray:
    """Per detection: 1 right (IoU >= 0.5 with a not yet found object of its class, best score first), 0 wrong,
    -1 not scored (its class is blacklisted on its image)."""
    y = np.zeros(len(table))
    found = set()
    for k in np.argsort(-table.score, kind="stable"):
        img, det = int(table.image[k]), int(table.det_id[k])
        if (img, det) in blacklist:
            y[k] = -1
            continue
        a = annotations.get(img)
        if a is None:
            continue
        best, best_iou = None, 0.5
        for j, (d, b) in enumerate(zip(a.det_ids, a.boxes)):
            if int(d) == det and (img, j) not in found:
                iou = devkit_iou(np.asarray(table.boxes[k])[None], np.asarray(b)[None]).ravel()[0]
                if iou >= best_iou:
                    best, best_iou = j, iou
        if best is not None:
            found.add((img, best))
            y[k] = 1
    return y


def platt(scores: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """P(right | score) = sigmoid(a * log(score) + b), fitted by maximum likelihood -> (a, b)."""
    keep = y >= 0
    x = torch.from_numpy(np.log(np.clip(scores[keep], 1e-6, 1.0))).float()
    t = torch.from_numpy(y[keep]).float()
    w = torch.zeros(2, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(w[0] * x + w[1], t)
        loss.backward()
        return loss
    opt.step(closure)
    return float(w[0]), float(w[1])


def load_set(spec: str, cache: Path, cache_sets: dict[str, str], extra: list[Path] = ()):
    name, rest = spec.split("=", 1)
    root, split = rest.rsplit(":", 1)
    root = Path(root)
    imageset = read_imageset(str(root / "ImageSets" / "DET" / f"{split}.txt"))
    annotations = read_annotations(str(root / "Annotations" / "DET"), imageset)
    black = root / "blacklist.txt"
    blacklist = read_blacklist(str(black)) if black.is_file() and split == "val" else ()
    bl_split = root / f"blacklist-{split}.txt"
    if bl_split.is_file():
        blacklist = read_blacklist(str(bl_split))
    folder = cache / cache_sets.get(name, name)
    entries = {}
    for stem, index in imageset.items():
        with np.load(folder / f"{Path(stem).name}.npz") as z:
            entries[index] = {k: z[k] for k in z.files}
        for other in extra:  # more members, on the same proposals: softmax averaged as the ensemble averages
            with np.load(other / cache_sets.get(name, name) / f"{Path(stem).name}.npz") as z:
                e = entries[index]
                assert np.array_equal(z["boxes"], e["boxes"])
                n = e.get("members", 1)
                for key in ("probs", "image10", "image1"):
                    e[key] = ((e[key].astype(np.float32) * n + z[key].astype(np.float32)) / (n + 1)).astype(e[key].dtype)
                e["members"] = n + 1
    return name, entries, annotations, blacklist


METHODS = {
    **{f"split {a} {b}": Method(evidence=True, vote=1.0, frames=0, vote_mode=f"split {a} {b}")
       for a, b in ((1.0, 1.0), (0.5, 1.0), (1.0, 0.5), (0.5, 0.5), (0.75, 1.0))},
    **{f"local {sc}": Method(evidence=True, vote=1.0, frames=0, vote_mode="local", vote_scale=sc) for sc in (2.5, 3.0, 4.0)},
    "agreement, no person evidence": Method(vote=1.0, frames=0, vote_mode="product"),
    "agreement + image context (gate 0.03, ^0.5)": Method(evidence=True, vote=1.0, frames=0, vote_mode="product",
                                                         context="image10", gate=0.03, context_power=0.5),
    "agreement + image context (p_image)": Method(evidence=True, vote=1.0, frames=0, vote_mode="product",
                                                 context="image10"),
    "agreement + image context (1 crop, p_image)": Method(evidence=True, vote=1.0, frames=0, vote_mode="product",
                                                         context="image1"),
    "agreement + CAM": Method(evidence=True, vote=1.0, frames=0, vote_mode="product", cam=1.0),
    "agreement + frames 300": Method(evidence=True, vote=1.0, frames=300, vote_mode="product"),
    "agreement^1.5": Method(evidence=True, vote=1.5, frames=0, vote_mode="product"),
    "agreement (product)": Method(evidence=True, vote=1.0, frames=0, vote_mode="product"),
    **{f"vm {m} {sc} ^{v}": Method(evidence=True, vote=v, frames=0, vote_mode=m, vote_scale=sc)
       for m in ("local", "density", "global") for sc in (1.5, 1.8, 2.5) for v in (1.0, 1.5)
       if m == "local" or sc == 1.8},
    **{f"ev vote^{v} parts={pa} nms={n}": Method(evidence=True, vote=v, frames=0, parts=pa, nms_iou=n)
       for v in (1.0, 1.5, 2.0) for pa in (True, False) for n in (0.3, 0.5)},
    **{f"ev vote^1 cam^{c}": Method(evidence=True, vote=1.0, frames=0, cam=c) for c in (0.5, 1.0)},
    **{f"ev vote^1 gate {g} ^{p}": Method(evidence=True, vote=1.0, frames=0, context="image10", gate=g,
                                          context_power=p) for g in (0.03, 0.3) for p in (0.5, 1.0)},
    **{f"evidence, vote^{v}{', frames' if f else ''}{', gate 0.1' if g else ''}": Method(
        evidence=True, vote=v, frames=f, context="image10" if g else "", gate=0.1 if g else 0.0)
       for v in (0.5, 1.0) for f in (0, 300) for g in (False, True)},
    **{f"evidence, gate {g} ^{p}": Method(context="image10", gate=g, context_power=p, evidence=True)
       for g in (0.01, 0.03, 0.1, 0.3) for p in (0.5, 1.0)},
    **{f"evidence, gate {g} + cam^{c}": Method(context="image10", gate=g, cam=c, evidence=True)
       for g in (0.03, 0.1) for c in (0.25, 0.5)},
    "evidence": Method(evidence=True),
    "default (frames 300 + parts)": Method(),
    "plain NMS": Method(frames=0, parts=False),
    "context image10": Method(context="image10"),
    "context image1": Method(context="image1"),
    "context image10 ^0.5": Method(context="image10", context_power=0.5),
    "context image10 + cam": Method(context="image10", cam=1.0),
    "context image10 + cam^0.5": Method(context="image10", cam=0.5),
    "cam": Method(cam=1.0),
    "context image10, no frames": Method(frames=0, context="image10"),
    "context image10 + cam, no frames": Method(frames=0, context="image10", cam=1.0),
    "context image10 + evidence": Method(context="image10", evidence=True),
    "context image10 + cam + evidence": Method(context="image10", cam=1.0, evidence=True),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", required=True)
    ap.add_argument("--set", action="append", required=True)
    ap.add_argument("--cache-set", action="append", default=[])
    ap.add_argument("--with", dest="extra", action="append", default=[],
                    help="another member's cache (same proposals): the ensemble's average (no frames, no CAM)")
    ap.add_argument("--fc", default=None, help="the cached classifier weights (default: the one fc-*.npz in --cache)")
    ap.add_argument("--method", action="append", default=None)
    ap.add_argument("--prefix", default=None, help="run the methods whose names start with this")
    ap.add_argument("--calibrate", action="store_true", help="fit P(right | score) on the first set, apply to all")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    cache = Path(args.cache)
    fc_file = Path(args.fc) if args.fc else next(cache.glob("fc-*.npz"))
    with np.load(fc_file) as z:
        fc_w = z["w"]
    cache_sets = dict(s.split("=", 1) for s in args.cache_set)
    sets = [load_set(s, cache, cache_sets, [Path(e) for e in args.extra]) for s in args.set]
    names = args.method or [m for m in METHODS if args.prefix is None or m.startswith(args.prefix)]
    rows = {}
    for mname in names:
        method = METHODS[mname]
        calibration = None
        for name, entries, truth, blacklist in sets:
            table = run(method, entries, fc_w)
            if args.calibrate:
                if calibration is None:
                    calibration = platt(table.score, tp_labels(table, truth, blacklist))
                    print(f"{mname}: calibration a = {calibration[0]:.4f}, b = {calibration[1]:.4f} (on {name})")
                a, b = calibration
                table = DetectionTable(table.image, table.det_id,
                                       1 / (1 + np.exp(-(a * np.log(np.clip(table.score, 1e-6, 1)) + b))), table.boxes)
            ev = DetectionEvaluator(truth, blacklist=blacklist)
            ev.process(table)
            res = ev.evaluate()
            negatives = [i for i, a in truth.items() if len(a.det_ids) == 0]
            neg = table.score[np.isin(table.image, negatives)]
            p5, r5, _ = precision_recall(table, truth, 0.5)
            p3, r3, _ = precision_recall(table, truth, 0.3)
            rows.setdefault(mname, {})[name] = {
                "map": res.map, "neg_max": float(neg.max()) if len(neg) else 0.0, "prec@0.5": p5, "rec@0.5": r5,
                "prec@0.3": p3, "rec@0.3": r3,
                "classes": {c.name: round(c.ap, 3) for c in res.classes if c.ap is not None}}
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    for mname, per in rows.items():
        cells = "  ".join(f"{n}: mAP {r['map']:.3f} neg {r['neg_max']:.2f} p/r@.5 {r['prec@0.5']:.2f}/{r['rec@0.5']:.2f}"
                          for n, r in per.items())
        print(f"{mname:<36} {cells}", flush=True)


if __name__ == "__main__":
    main()
