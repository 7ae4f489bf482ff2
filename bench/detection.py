"""Offline end-to-end detection benchmark: train MultiBox and an ensemble of narrow GoogLeNet
region classifiers on a synthetic ILSVRC-format set, then measure on its val split what section 8 of the paper
reports and what the detector costs.

Phases, each an ``ircnn`` command run in this process (printed before it runs; ``--reuse`` skips a phase whose
output exists, so the evaluation can be rerun without retraining):

1. ``ircnn data synth``: the set (the last 20% of the images are val).
2. ``ircnn model init`` + ``ircnn train multibox``: MultiBox (200 boxes, 3x3 grid head, 128 px input).
3. ``ircnn train detector --multibox-from``: ``--members`` members, ``--minutes-per-member`` each, trained on
   selective search 2x + MultiBox proposals; the MultiBox network is copied into the detector bundle.

Evaluation on val, with every image's proposals computed once (selective search 2x and MultiBox separately, cached
in ``OUT/eval/proposals.npz``) and every member's region probabilities computed once on the union of the boxes that
any row scores. The rows are then pure functions of those probabilities, fed to the project's per-class NMS
(``detector.pipeline.detector.nms_per_class``), written as devkit submissions (``OUT/eval/*.txt``) and scored by
``eval.ilsvrc.evaluate_files`` in devkit mode:

- member 0 alone vs the ensemble of all members (the paper's ensemble effect),
- selective search 2x alone vs merged with MultiBox, both with the full ensemble (the paper's proposal effect),
- the cascade (``DetectConfig.cascade_top_k``) vs the full ensemble,
- the OpenVINO bfloat16 backend vs torch fp32, if OpenVINO is installed (run through ``Detector.score`` on every
  val image, since its probabilities differ from torch's).

Seconds per image by stage come from real runs: decode, selective search and MultiBox as the proposal phase
measured them on every val image; warp, networks and NMS from ``Detections.seconds`` of ``Detector.score`` on the
first ``--timing-images`` val images (after one warm-up image), for every row. Those runs also cross-check the
derived rows: their detections must equal what the cached probabilities give (the largest score difference is
printed). Regions/s per network come from the per-member pass, as a fraction of the matmul peak measured by
``detector.nets.summary.matmul_peak``, with GoogLeNet's exact multiply-adds at the bundle's width and input size
counted by ``detector.nets.summary``'s forward hooks (``summarize`` takes only a variant, so its hook counter runs on
the bundle's own architecture).

    python bench/detection.py --out /tmp/bench-det                 # about 35 minutes on 2 quiet cores
    python bench/detection.py --out /tmp/bench-det --reuse --json  # evaluation again, one JSON document
    python bench/detection.py --out /tmp/q --images 120 --members 2 --minutes-per-member 0.5 --multibox-epochs 2

On a machine shared with other jobs, ``--threads 1`` is often faster than two threads.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from detector.bundle.format import Bundle, load_bundle, read_manifest
from detector.bundle.multibox import load_multibox
from detector.config import DetectConfig
from detector.image import read_image
from detector.nets.googlenet import GoogLeNet
from detector.nets.summary import _counts, format_machine, machine, matmul_peak
from detector.pipeline.detector import MIN_SIDE, Detections, Detector, nms_per_class
from detector.pipeline.ensemble import EnsembleConfig
from detector.pipeline.scoring import RegionScorer
from eval.annotations import read_imageset
from eval.detections import DetectionTable
from eval.ilsvrc import evaluate_files
from eval.submission import write_submission
from proposals.combine import MergeConfig, ProposalGenerator, Proposals, merge
from proposals.selective_search import SelectiveSearchConfig, SelectiveSearchRunner

# What the detector learning test (tests/detector/training/test_detector.py) found to learn fastest from random
# weights in minutes on this CPU: batch-normalised members without the auxiliary heads, batches of 16 windows half
# of them foreground (R-CNN: 128 with 32), lr 0.05. --epochs is only a ceiling: --max-minutes stops each member.
DETECTOR_RECIPE = ("--variant", "torchvision", "--no-aux-heads", "--batch", "16", "--fg-per-batch", "8",
                   "--lr", "0.05", "--epochs", "1000", "--workers", "1")
# A 3x3 grid before MultiBox's heads learns far better than global pooling (grid 1) in a few epochs.
MULTIBOX_RECIPE = ("--variant", "torchvision", "--size", "128", "--grid", "3", "--lr", "2e-3", "--workers", "1")
COARSEN = 2.0  # section 8: superpixels 2x larger than R-CNN's
STAGES = ("decode", "selective_search", "multibox", "warp", "networks", "nms")


@dataclass(frozen=True)
class BenchConfig:
    images: int = 600  # synthetic images in all; the last 20% are the val split
    classes: int = 5  # cat, person, cup or mug, motorcycle, horse: the first K
    members: int = 6  # section 8: an ensemble of 6
    width: float = 0.25  # channel multiplier of every GoogLeNet (1.0 is the paper's)
    minutes_per_member: float = 4.0  # 6 x 4 min + MultiBox + proposals: about 30 min of training on 2 cores
    multibox_epochs: int = 20
    image_size: int = 160  # synthetic images' longer side (ILSVRC's are ~500); selective search segments at it
    input_size: int = 64  # region classifier input side (paper 224); context is R-CNN's 16 px scaled to it
    cascade: tuple[int, ...] = (50, 100)  # cascade_top_k values measured against the full ensemble
    timing_images: int = 10  # val images (after one warm-up) that Detector.score times for every row
    seed: int = 0

    def __post_init__(self) -> None:
        if not 20 <= self.images <= 100_000:
            raise ValueError(f"--images must be in 20..100000, got {self.images}")
        if not 1 <= self.members <= 16:
            raise ValueError(f"--members must be in 1..16, got {self.members}")
        if not 0 < self.minutes_per_member <= 600:
            raise ValueError(f"--minutes-per-member must be in (0, 600], got {self.minutes_per_member}")
        if not 1 <= self.timing_images:
            raise ValueError(f"--timing-images must be at least 1, got {self.timing_images}")
        if any(k < 1 for k in self.cascade):
            raise ValueError(f"--cascade values must be >= 1, got {self.cascade}")


# ---- training ------------------------------------------------------------------------------------------


def plan(out: Path, c: BenchConfig, threads: int, reuse: bool) -> list[tuple[str, list[str], Callable[[], bool]]]:
    """The ``ircnn`` commands in order, as (phase, argv, done() -> whether the output exists)."""
    data, mb, det = out / "data", out / "multibox", out / "detector"
    width = f"{c.width:g}"
    resume = ["--resume"] if reuse else []  # a run cut short continues from its checkpoint
    return [
        ("synth", ["data", "synth", "--out", str(data), "--images", str(c.images), "--classes", str(c.classes),
                   "--size", str(c.image_size), "--seed", str(c.seed), "--workers", str(threads)],
         lambda: (data / "synth.json").is_file()),
        ("multibox", ["model", "init", "--out", str(mb), "--variant", "torchvision", "--width", width,
                      "--seed", str(c.seed)],
         lambda: (mb / "model.json").is_file()),
        ("multibox", ["train", "multibox", "--data", str(data), "--out", str(mb), *MULTIBOX_RECIPE, "--width", width,
                      "--epochs", str(c.multibox_epochs), "--seed", str(c.seed),
                      "--val-imageset", "ImageSets/DET/val.txt", *resume],
         lambda: (mb / "model.json").is_file() and read_manifest(mb).get("multibox") is not None),
        ("detector", ["train", "detector", "--data", str(data), "--out", str(det), "--members", str(c.members),
                      *DETECTOR_RECIPE, "--width", width, "--size", str(c.input_size),
                      "--max-minutes", f"{c.minutes_per_member:g}", "--seed", str(c.seed),
                      "--selective-search-width", str(c.image_size), "--multibox-from", str(mb),
                      "--proposals-cache", str(out / "proposals-train"), *resume],
         lambda: (det / "model.json").is_file()),
    ]


def train(out: Path, c: BenchConfig, threads: int, reuse: bool, log, stdout) -> dict[str, float]:
    """Run (or with ``reuse`` skip) every command, its output to ``stdout``; seconds per phase."""
    seconds: dict[str, float] = {}
    for phase, argv, done in plan(out, c, threads, reuse):
        if reuse and done():
            log(f"(reuse) skipping: ircnn {shlex.join(argv)}")
            seconds.setdefault(phase, 0.0)
            continue
        log(f"$ ircnn {shlex.join(argv)}")
        start = time.perf_counter()
        # the installed `ircnn` (as a user runs it); `import service` here would find bench/service.py instead
        code = subprocess.run(["ircnn", *argv], stdout=stdout, env={**os.environ, "OMP_NUM_THREADS": str(threads)},
                              check=False).returncode
        seconds[phase] = seconds.get(phase, 0.0) + time.perf_counter() - start
        if code != 0:
            raise SystemExit(f"`ircnn {shlex.join(argv)}` failed with exit code {code}; its message is above")
    return seconds


# ---- proposals, once per val image -----------------------------------------------------------------------


@dataclass
class ValImage:
    name: str  # imageset name, e.g. val/ILSVRC2014_synth_00000481
    index: int  # 1-based imageset index
    pixels: np.ndarray  # uint8 [H, W, 3]
    ss: np.ndarray  # float32 [N, 4] selective search 2x, best ranked first
    mb: np.ndarray  # float32 [200, 4] MultiBox, best first
    mb_scores: np.ndarray  # float32 [200]
    seconds: dict[str, float]  # decode, selective_search, multibox

    def proposals(self, multibox: bool, max_regions: int) -> Proposals:
        """What ``ProposalGenerator`` gives for this image: MultiBox's boxes first, then selective search's."""
        parts = [Proposals.from_selective_search(self.ss)]
        if multibox:
            parts.insert(0, Proposals.from_multibox(torch.from_numpy(self.mb), torch.from_numpy(self.mb_scores)))
        return merge(parts, MergeConfig(max_proposals=max_regions))


def val_images(data: Path, detector: Path, image_size: int, cache: Path, log) -> list[ValImage]:
    """Decode every val image; selective search 2x and MultiBox boxes from ``cache`` if it was made for the same
    images and MultiBox weights, else computed (and timed) now, each source on its own, and cached."""
    imageset = read_imageset(str(data / "ImageSets" / "DET" / "val.txt"))
    mb_file = detector / read_manifest(detector)["multibox"]
    key = f"{mb_file.stat().st_mtime_ns}|{mb_file.stat().st_size}|{image_size}|{COARSEN}|{list(imageset)}"
    pixels, decode = {}, {}
    for name in imageset:
        start = time.perf_counter()
        pixels[name] = read_image(data / "Data" / "DET" / f"{name}.JPEG")
        decode[name] = time.perf_counter() - start
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as z:
            if str(z["key"]) == key:
                log(f"(reuse) proposals of {len(imageset)} val images from {cache}")
                seconds = z["seconds"]
                return [ValImage(name, index, pixels[name], z[f"ss{i}"], z[f"mb{i}"], z[f"mbs{i}"],
                                 dict(zip(("decode", "selective_search", "multibox"), seconds[i].tolist())))
                        for i, (name, index) in enumerate(imageset.items())]
    log(f"proposals of {len(imageset)} val images (selective search {COARSEN:g}x at {image_size} px, MultiBox)")
    net = load_multibox(detector)
    out, arrays = [], {"key": np.array(key)}
    with SelectiveSearchRunner(SelectiveSearchConfig(coarsen=COARSEN, resize_width=image_size)) as runner:
        first = next(iter(pixels.values()))
        runner(first), net.propose([first])  # warm-up: the worker process's start is not a per-image cost
        for i, (name, index) in enumerate(imageset.items()):
            image = pixels[name]
            start = time.perf_counter()
            ss = runner(image)
            middle = time.perf_counter()
            (boxes, scores), = net.propose([image])
            seconds = {"decode": decode[name], "selective_search": middle - start,
                       "multibox": time.perf_counter() - middle}
            out.append(ValImage(name, index, image, ss, boxes.numpy(), scores.numpy(), seconds))
            arrays.update({f"ss{i}": ss, f"mb{i}": boxes.numpy(), f"mbs{i}": scores.numpy()})
    arrays["seconds"] = np.array([[v.seconds[k] for k in ("decode", "selective_search", "multibox")] for v in out])
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **arrays)
    return out


def scored_boxes(image: ValImage, proposals: Proposals, max_regions: int) -> torch.Tensor:
    """The boxes ``Detector.score`` scores: the first ``max_regions``, clipped to the image, thin ones dropped."""
    h, w = image.pixels.shape[:2]
    b = proposals.boxes[:max_regions]
    b = torch.stack([b[:, 0].clamp(0, w), b[:, 1].clamp(0, h), b[:, 2].clamp(0, w), b[:, 3].clamp(0, h)], dim=1)
    return b[((b[:, 2] - b[:, 0]) >= MIN_SIDE) & ((b[:, 3] - b[:, 1]) >= MIN_SIDE)]


# ---- rows from cached member probabilities ---------------------------------------------------------------


@dataclass
class Scored:
    """One val image's union of boxes and every member's probabilities on it."""

    boxes: torch.Tensor  # [U, 4]
    rows: dict[str, torch.Tensor]  # proposal set ("merged", "selective_search") -> row indices into boxes, in order
    probs: torch.Tensor  # [M, U, K + 1]


def union(sets: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Distinct boxes of several ordered box sets, and each set's rows into them (order kept)."""
    allb = torch.cat(list(sets.values()))
    boxes, inverse = torch.unique(allb, dim=0, return_inverse=True)
    rows, start = {}, 0
    for name, b in sets.items():
        rows[name] = inverse[start:start + len(b)]
        start += len(b)
    return boxes, rows


def member_pass(bundle: Bundle, config: DetectConfig, images: list[ValImage], log) -> tuple[list[Scored], list[dict]]:
    """Every member on the union of the merged and the selective-search-only boxes of every image, one member at a
    time through its own ``RegionScorer``; per member: regions, warp and network seconds."""
    unions = []
    for v in images:
        sets = {"merged": scored_boxes(v, v.proposals(True, config.max_regions), config.max_regions),
                "selective_search": scored_boxes(v, v.proposals(False, config.max_regions), config.max_regions)}
        unions.append(union(sets))
    per_image: list[list[torch.Tensor]] = [[] for _ in images]
    stats = []
    for i, member in enumerate(bundle.members):
        scorer = RegionScorer(dataclasses.replace(bundle, members=[member]), config)
        scorer.score_regions(images[0].pixels, unions[0][0][:config.warp_chunk])  # warm-up
        seconds, regions = {"warp": 0.0, "networks": 0.0}, 0
        for k, (v, (boxes, _)) in enumerate(zip(images, unions)):
            probs, s = scorer.score_regions(v.pixels, boxes)
            per_image[k].append(probs)
            seconds = {key: seconds[key] + s[key] for key in seconds}
            regions += len(boxes)
        stats.append({"member": i, "regions": regions, **seconds, "regions_per_s": regions / seconds["networks"]})
        log(f"  member {i}: {regions} regions, {regions / seconds['networks']:.0f} regions/s in the network")
    return [Scored(boxes, rows, torch.stack(p)) for (boxes, rows), p in zip(unions, per_image)], stats


def row_probs(probs: torch.Tensor, members: int, cascade_top_k: int | None) -> torch.Tensor:
    """``probs [M, R, K + 1]`` of one image's rows -> the detector's ``[R, K + 1]``: the mean of the first
    ``members``, or the cascade as ``RegionScorer.score_regions`` runs it (member 0 on every region, the mean of all
    on the ``cascade_top_k`` regions member 0 rates least background). The timing runs check that they agree."""
    if cascade_top_k is None or members == 1:
        return probs[:members].mean(0)
    out = probs[0].clone()
    top = out[:, 0].argsort()[:cascade_top_k]
    if len(top):
        out[top] = (out[top] + (members - 1) * probs[1:members, top].mean(0)) / members
    return out


@dataclass(frozen=True)
class Row:
    name: str
    members: int  # how many members score each region (the cascade: member 0 on all, the rest on the top K)
    multibox: bool  # proposals: selective search 2x merged with MultiBox, or selective search alone
    cascade_top_k: int | None = None
    backend: str = "torch"
    precision: str = "fp32"

    @property
    def proposal_set(self) -> str:
        return "merged" if self.multibox else "selective_search"


def derived_detections(row: Row, scored: list[Scored], det_ids: torch.Tensor, config: DetectConfig) -> list[Detections]:
    out = []
    for s in scored:
        rows = s.rows[row.proposal_set]
        out.append(nms_per_class(s.boxes[rows], row_probs(s.probs[:, rows], row.members, row.cascade_top_k), det_ids,
                                 config))
    return out


def devkit_map(detections: list[Detections], images: list[ValImage], data: Path, submission: Path) -> float:
    """Write the detections as a devkit submission and score it in devkit mode (what ``ircnn eval det`` does)."""
    parts = [DetectionTable(np.full(len(d), v.index, np.int64), d.det_ids.numpy().astype(np.int64),
                            d.scores.double().numpy(), d.boxes.double().numpy()) for d, v in zip(detections, images)]
    submission.parent.mkdir(parents=True, exist_ok=True)
    write_submission(str(submission), DetectionTable.concat(parts))
    result, _ = evaluate_files(str(data / "Annotations" / "DET"), str(data / "ImageSets" / "DET" / "val.txt"),
                               str(submission), mode="ilsvrc")
    return result.map


# ---- real runs: seconds by stage, cross-check, backends --------------------------------------------------


def detector_for(row: Row, bundle: Bundle, config: DetectConfig) -> Detector:
    """A ``Detector`` for the row; only its ``score`` is used (proposals come from the cache)."""
    members = bundle.members if row.members == len(bundle.members) else bundle.members[:row.members]
    cfg = dataclasses.replace(config, cascade_top_k=row.cascade_top_k,
                              ensemble=EnsembleConfig(backend=row.backend, precision=row.precision))
    scorer = RegionScorer(dataclasses.replace(bundle, members=members), cfg)
    return Detector(scorer, ProposalGenerator(selective_search=lambda image: np.zeros((0, 4), np.float32)), cfg)


def timed_run(detector: Detector, row: Row, images: list[ValImage], timed: int,
              proposal_seconds: dict[str, float]) -> tuple[list[Detections], dict]:
    """``Detector.score`` on each image's cached proposals (one warm-up call first). Mean seconds by stage: warp,
    networks and NMS from ``Detections.seconds`` over the first ``timed`` images; decode and the proposal sources
    the row uses from ``proposal_seconds`` (the proposal phase's means over every val image); their total."""
    max_regions = detector.config.max_regions
    detector.score(images[0].pixels, images[0].proposals(row.multibox, max_regions))  # warm-up
    dets = [detector.score(v.pixels, v.proposals(row.multibox, max_regions)) for v in images]
    timed_dets = dets[:timed]
    seconds = {**proposal_seconds, "multibox": proposal_seconds["multibox"] if row.multibox else 0.0}
    for key in ("warp", "networks", "nms"):
        seconds[key] = sum(d.seconds[key] for d in timed_dets) / len(timed_dets)
    seconds["total"] = sum(seconds[key] for key in STAGES)
    seconds["regions"] = sum(d.regions for d in timed_dets) / len(timed_dets)
    return dets, seconds


def compare(a: list[Detections], b: list[Detections]) -> dict:
    """Two runs' detections, image by image, matched by rank: the largest score and box coordinate differences
    where the counts agree, and how many images' counts differ."""
    worst, boxes, differ = 0.0, 0.0, 0
    for x, y in zip(a, b):
        if len(x) != len(y):
            differ += 1
        elif len(x):
            worst = max(worst, float((x.scores - y.scores).abs().max()))
            boxes = max(boxes, float((x.boxes - y.boxes).abs().max()))
    return {"max_score_diff": worst, "max_box_diff": boxes, "images_with_other_counts": differ}


def network_macs(bundle: Bundle) -> int:
    """Exact multiply-adds of one member's inference forward at the bundle's input size (convolutions and linear
    layers), by ``detector.nets.summary``'s forward hooks on the bundle's architecture without auxiliary heads."""
    net = GoogLeNet(dataclasses.replace(bundle.arch, aux_logits=False))
    per_child, _ = _counts(net, bundle.preprocess.size)
    return sum(c["macs"] for c in per_child.values())


# ---- the whole benchmark ---------------------------------------------------------------------------------


def _log_stdout(msg: str) -> None:
    print(msg, flush=True)


def _log_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def evaluate(out: Path, c: BenchConfig, log) -> dict:
    data, det_dir = out / "data", out / "detector"
    bundle = load_bundle(det_dir)
    n = len(bundle.members)
    config = DetectConfig(context=round(16 * bundle.preprocess.size / 224))  # R-CNN's 16 px at 224, scaled
    phases: dict[str, float] = {}

    # the matmul peak, best of one measurement before and one after the runs (a busy spell lowers one of them)
    peak = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    start = time.perf_counter()
    images = val_images(data, det_dir, c.image_size, out / "eval" / "proposals.npz", log)
    phases["eval proposals"] = time.perf_counter() - start

    log(f"every member on every val region ({n} members, {len(images)} images)")
    start = time.perf_counter()
    scored, member_stats = member_pass(bundle, config, images, log)
    phases["eval member pass"] = time.perf_counter() - start

    rows = [Row("member 0 alone", 1, True), Row(f"ensemble of {n}", n, True),
            Row(f"ensemble of {n}, selective search 2x only", n, False)]
    if n > 1:
        rows += [Row(f"ensemble of {n}, cascade K={k}", n, True, cascade_top_k=k) for k in c.cascade]
    results: dict[str, dict] = {}
    det_ids = bundle_det_ids(bundle, config)
    start = time.perf_counter()
    for row in rows:
        dets = derived_detections(row, scored, det_ids, config)
        results[row.name] = {"row": dataclasses.asdict(row), "derived": dets,
                             "map": devkit_map(dets, images, data, out / "eval" / f"{slug(row.name)}.txt")}
    phases["eval mAP"] = time.perf_counter() - start

    log(f"seconds by stage: Detector.score on {min(c.timing_images, len(images))} val images per row")
    start = time.perf_counter()
    timing = images[:c.timing_images]
    proposal_seconds = {key: float(np.mean([v.seconds[key] for v in images]))
                        for key in ("decode", "selective_search", "multibox")}
    for row in rows:
        detector = detector_for(row, bundle, config)
        dets, seconds = timed_run(detector, row, timing, len(timing), proposal_seconds)
        results[row.name]["seconds"] = seconds
        results[row.name]["cross_check"] = compare(dets, results[row.name]["derived"][:len(timing)])
    phases["eval timing runs"] = time.perf_counter() - start

    skipped = {}
    start = time.perf_counter()
    row = Row(f"ensemble of {n}, OpenVINO bf16", n, True, backend="openvino", precision="bf16")
    try:
        made = time.perf_counter()
        detector = detector_for(row, bundle, config)  # exports each member once (cached by weight hash)
        setup = time.perf_counter() - made
        log(f"OpenVINO bf16: exported and compiled in {setup:.0f} s; Detector.score on all {len(images)} val images")
        dets, seconds = timed_run(detector, row, images, len(timing), proposal_seconds)
        reference = derived_detections(rows[1], scored, det_ids, config)  # torch fp32, the same rows
        results[row.name] = {"row": dataclasses.asdict(row), "setup_s": setup, "seconds": seconds,
                             "map": devkit_map(dets, images, data, out / "eval" / f"{slug(row.name)}.txt"),
                             "vs_torch_fp32": compare(dets, reference)}
        rows.append(row)
    except Exception as e:  # not installed, no bf16 on this CPU, an export failure: reported, not fatal
        skipped[row.name] = str(e)[:300]
        log(f"skipped {row.name}: {e}")
    phases["eval openvino"] = time.perf_counter() - start

    peak = {"fp32": max(peak["fp32"], matmul_peak(torch.float32)),
            "bf16": max(peak["bf16"], matmul_peak(torch.bfloat16))}
    macs = network_macs(bundle)
    for m in member_stats:
        m["gflops"] = 2 * macs * m["regions_per_s"] / 1e9
        m["fraction_of_fp32_peak"] = m["gflops"] * 1e9 / peak["fp32"]
    for name, r in results.items():
        s = r["seconds"]
        scored_regions = s["regions"] * (r["row"]["members"] if r["row"]["cascade_top_k"] is None else 1)
        if r["row"]["cascade_top_k"] is not None:
            scored_regions += (r["row"]["members"] - 1) * min(r["row"]["cascade_top_k"], s["regions"])
        r["network_regions_per_s"] = scored_regions / s["networks"]  # region x member forwards per second
        dtype = r["row"]["precision"]
        r["fraction_of_peak"] = 2 * macs * r["network_regions_per_s"] / peak[dtype]
        r.pop("derived", None)

    full = results[f"ensemble of {n}"]["map"]
    verdicts = {"ensemble_beats_member0": full > results["member 0 alone"]["map"],
                "multibox_helps": full > results[f"ensemble of {n}, selective search 2x only"]["map"],
                "cascade": {k: {"map_drop_points": 100 * (full - results[f"ensemble of {n}, cascade K={k}"]["map"]),
                                "qualifies": 100 * (full - results[f"ensemble of {n}, cascade K={k}"]["map"]) < 0.5}
                            for k in c.cascade if n > 1}}
    train_images = len(read_imageset(str(data / "ImageSets" / "DET" / "train.txt")))
    return {"config": dataclasses.asdict(c), "machine": machine(), "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "load_average": os.getloadavg(), "train_images": train_images, "val_images": len(images),
            "timing_images": len(timing), "input_size": bundle.preprocess.size, "context": config.context,
            "arch": bundle.arch.to_dict(), "gmacs_per_region": macs / 1e9,
            "matmul_peak_gflops": {k: v / 1e9 for k, v in peak.items()},
            "members": member_stats, "rows": results, "skipped": skipped, "verdicts": verdicts,
            "eval_phases_s": phases, "training": bundle.provenance.get("members")}


def bundle_det_ids(bundle: Bundle, config: DetectConfig) -> torch.Tensor:
    """The DET id of each non-background head column (as ``RegionScorer`` reads it from the bundle)."""
    return RegionScorer(dataclasses.replace(bundle, members=bundle.members[:1]), config).det_ids


def slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in name.lower()).strip("-")


def markdown(doc: dict, command: str) -> str:
    c, rows = doc["config"], doc["rows"]
    n = c["members"]
    full = rows[f"ensemble of {n}"]["map"] if f"ensemble of {n}" in rows else None
    lines = [f"`{command}`", "",
             f"Synthetic ILSVRC-format set: {doc['train_images']} train / {doc['val_images']} val images of "
             f"{c['image_size']} px, {c['classes']} classes. Detector: {len(doc['members'])} GoogLeNet members "
             f"(torchvision variant, width {doc['arch']['width']:g}, {doc['input_size']} px input, "
             f"{2 * doc['gmacs_per_region']:.3f} GFLOP per region), {c['minutes_per_member']:g} min of training "
             f"each; MultiBox {c['multibox_epochs']} epochs. mAP: devkit rules on all val images. Seconds per "
             f"image: decode and proposals averaged over all val images, warp, networks and NMS over "
             f"{doc['timing_images']}; {format_machine(doc['machine'])}.", "",
             "| configuration | proposals | regions/img | mAP | decode | selective search | MultiBox | warp "
             "| networks | NMS | s/img |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        s = r["seconds"]
        proposals = "SS 2x + MultiBox" if r["row"]["multibox"] else "SS 2x"
        lines.append(f"| {name} | {proposals} | {s['regions']:.0f} | {100 * r['map']:.1f} | {s['decode']:.3f} "
                     f"| {s['selective_search']:.3f} | {s['multibox']:.3f} | {s['warp']:.3f} | {s['networks']:.3f} "
                     f"| {s['nms']:.3f} | {s['total']:.3f} |")
    peak = doc["matmul_peak_gflops"]
    lines += ["", f"Networks: {2 * doc['gmacs_per_region']:.3f} GFLOP per region (exact, detector.nets.summary's hooks); "
              f"matmul peak {peak['fp32']:.0f} GFLOP/s fp32, {peak['bf16']:.0f} GFLOP/s bf16.", "",
              "| network | regions/s | GFLOP/s | of the matmul peak |", "|---|---:|---:|---:|"]
    for m in doc["members"]:
        lines.append(f"| member {m['member']} (torch fp32) | {m['regions_per_s']:.0f} | {m['gflops']:.1f} "
                     f"| {100 * m['fraction_of_fp32_peak']:.1f}% (fp32) |")
    for name, r in rows.items():
        if r["row"]["backend"] != "torch":
            rate = r["network_regions_per_s"]
            lines.append(f"| {name}, per member | {rate:.0f} | {2 * doc['gmacs_per_region'] * rate:.1f} "
                         f"| {100 * r['fraction_of_peak']:.1f}% ({r['row']['precision']}) |")
    if doc["training"]:
        lines += ["", "Training (batches of 16 windows): " + ", ".join(
            f"member {m['member']} {m['epochs'][-1]['step']} steps (fg accuracy {m['epochs'][-1]['fg_accuracy']:.2f})"
            for m in doc["training"] if m["epochs"]) + "."]
    v = doc["verdicts"]
    member0 = rows["member 0 alone"]["map"]
    lines += ["", f"Ensemble mAP > member-0 mAP: {'yes' if v['ensemble_beats_member0'] else 'no'} "
              f"({100 * full:.1f} vs {100 * member0:.1f})."]
    ss = rows[f"ensemble of {n}, selective search 2x only"]["map"]
    lines.append(f"MultiBox added to selective search 2x raises mAP: {'yes' if v['multibox_helps'] else 'no'} "
                 f"({100 * full:.1f} vs {100 * ss:.1f}).")
    for k, cv in v["cascade"].items():
        lines.append(f"Cascade K={k} qualifies as default (mAP drop < 0.5 points vs full): "
                     f"{'yes' if cv['qualifies'] else 'no'} (drop {cv['map_drop_points']:+.2f} points).")
    checks = [r["cross_check"] for r in rows.values() if "cross_check" in r]
    lines.append(f"Cross-check, rows derived from cached member probabilities vs Detector.score on the timed images: "
                 f"largest score difference {max(x['max_score_diff'] for x in checks):.1e}, box difference "
                 f"{max(x['max_box_diff'] for x in checks):.1e} px, images with another detection count "
                 f"{sum(x['images_with_other_counts'] for x in checks)}.")
    for name, r in rows.items():
        if "vs_torch_fp32" in r:
            x = r["vs_torch_fp32"]
            lines.append(f"{name} vs torch fp32 (all val images): largest score difference {x['max_score_diff']:.1e}, "
                         f"images with another detection count {x['images_with_other_counts']}; export and compile "
                         f"{r['setup_s']:.0f} s.")
    for name, why in doc["skipped"].items():
        lines.append(f"Skipped {name}: {why}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = BenchConfig()
    parser.add_argument("--out", required=True, metavar="DIR", help="data, bundles and submissions go here")
    parser.add_argument("--images", type=int, default=d.images, help=f"synthetic images in all (default {d.images})")
    parser.add_argument("--classes", type=int, default=d.classes, help=f"DET classes (default {d.classes})")
    parser.add_argument("--members", type=int, default=d.members, help=f"ensemble members (default {d.members})")
    parser.add_argument("--width", type=float, default=d.width, help=f"channel multiplier (default {d.width:g})")
    parser.add_argument("--minutes-per-member", type=float, default=d.minutes_per_member,
                        help=f"training minutes of each detector member (default {d.minutes_per_member:g})")
    parser.add_argument("--multibox-epochs", type=int, default=d.multibox_epochs,
                        help=f"MultiBox training epochs (default {d.multibox_epochs})")
    parser.add_argument("--image-size", type=int, default=d.image_size,
                        help=f"synthetic images' longer side in px (default {d.image_size})")
    parser.add_argument("--input-size", type=int, default=d.input_size,
                        help=f"region classifier input side in px (default {d.input_size})")
    parser.add_argument("--cascade", type=int, nargs="+", default=list(d.cascade), metavar="K",
                        help="cascade_top_k values to measure (default 50 100)")
    parser.add_argument("--timing-images", type=int, default=d.timing_images,
                        help=f"val images Detector.score times per row (default {d.timing_images})")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads (default: one per core; 1 is faster on a machine busy with other jobs)")
    parser.add_argument("--reuse", action="store_true", help="skip phases whose outputs exist in --out")
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout (progress on stderr)")
    args = parser.parse_args()

    if args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    c = BenchConfig(images=args.images, classes=args.classes, members=args.members, width=args.width,
                    minutes_per_member=args.minutes_per_member, multibox_epochs=args.multibox_epochs,
                    image_size=args.image_size, input_size=args.input_size, cascade=tuple(args.cascade),
                    timing_images=args.timing_images, seed=args.seed)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.reuse:
        parser.error(f"{out} is not empty: pass --reuse to continue or re-evaluate it, or choose a new --out")
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # for the processes the commands start
    log = _log_stderr if args.json else _log_stdout
    command = "python bench/detection.py " + shlex.join(sys.argv[1:])
    began = time.perf_counter()
    phases = train(out, c, args.threads, args.reuse, log, sys.stderr if args.json else sys.stdout)
    doc = evaluate(out, c, log)
    doc["phases_s"] = {**phases, **doc.pop("eval_phases_s"), "total": time.perf_counter() - began}
    doc["command"] = command
    (out / "eval").mkdir(parents=True, exist_ok=True)
    (out / "eval" / "bench.json").write_text(json.dumps(doc, indent=2) + "\n")
    if args.json:
        print(json.dumps(doc, indent=2))
        return
    print()
    print(markdown(doc, command))
    print("\nphases (s): " + ", ".join(f"{k} {v:.0f}" for k, v in doc["phases_s"].items()))


if __name__ == "__main__":
    main()
