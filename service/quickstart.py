"""``ircnn quickstart``: the whole system, offline, in minutes: a synthetic ILSVRC-format set, MultiBox and a small
ensemble trained on it, detection on its held-out images, devkit-mode mAP, and pictures.

Each step is the same ``ircnn`` command a user would type (printed before it runs), so the quickstart shows the
real path and breaks when any command does. The networks are narrow (width 0.25) and the training short, so that
it finishes in under 10 minutes on a 2-core CPU; the numbers say the pipeline learns, not how good GoogLeNet is.
"""

from __future__ import annotations

import contextlib
import io
import json
import shlex
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class QuickstartConfig:
    images: int = 200  # synthetic images in all; the last 20% are the held-out val split
    classes: int = 3  # DET classes in the set (cat, person, cup or mug, motorcycle, horse: the first K)
    members: int = 2  # ensemble members of the detector
    width: float = 0.25  # channel multiplier of every GoogLeNet (1.0 is the paper's network)
    size: int = 112  # detector input side (the paper's 224 costs 4x the time)
    detector_minutes: float = 2.0  # training time per detector member
    multibox_epochs: int = 6
    seed: int = 0

    def __post_init__(self) -> None:
        if not 20 <= self.images <= 100_000:
            raise ValueError(f"--images must be in 20..100000, got {self.images}")
        if not 1 <= self.classes <= 5:
            raise ValueError(f"--classes must be in 1..5, got {self.classes}")
        if not 32 <= self.size <= 448:
            raise ValueError(f"--size must be in 32..448, got {self.size}")
        if not 1 <= self.members <= 16:
            raise ValueError(f"--members must be in 1..16, got {self.members}")
        if not 0.0 < self.detector_minutes <= 600:
            raise ValueError(f"--minutes must be in (0, 600], got {self.detector_minutes}")
        if not 1 <= self.multibox_epochs <= 1000:
            raise ValueError(f"--multibox-epochs must be in 1..1000, got {self.multibox_epochs}")


def steps(out: Path, c: QuickstartConfig) -> list[tuple[str, list[str]]]:
    """The commands, in order, as (what it does, ``ircnn`` arguments)."""
    data, model = out / "data", out / "model"
    width = f"{c.width:g}"
    return [
        ("make a synthetic ILSVRC-format set",
         ["data", "synth", "--out", str(data), "--images", str(c.images), "--seed", str(c.seed),
          "--classes", str(c.classes), "--overwrite"]),
        ("train the detector ensemble (R-CNN sampling on selective search 2x proposals)",
         ["train", "detector", "--data", str(data), "--out", str(model), "--members", str(c.members),
          "--variant", "torchvision", "--width", width, "--size", str(c.size),
          "--max-minutes", f"{c.detector_minutes:g}", "--seed", str(c.seed)]),
        ("train MultiBox (200 boxes) into the same bundle",
         ["train", "multibox", "--data", str(data), "--out", str(model), "--variant", "torchvision",
          "--width", width, "--size", "128", "--epochs", str(c.multibox_epochs), "--seed", str(c.seed),
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


def run_quickstart(out: str | Path, config: QuickstartConfig, run_command) -> dict:
    """Run every step with ``run_command(argv) -> exit code``; stop at the first failure with a message.

    Returns ``{"out", "seconds": {step: s}, "eval": eval det's JSON document}``; the document is also written to
    ``OUT/eval.json``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seconds, evaluation = {}, None
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
        else:
            code = run_command(argv)
        seconds[" ".join(argv[:2] if argv[0] in ("data", "train", "eval") else argv[:1])] = round(
            time.perf_counter() - start, 1)
        if code != 0:
            raise RuntimeError(f"step {i} (`ircnn {shlex.join(argv)}`) failed with exit code {code}; "
                               f"its message is above; the files so far are in {out}")
    return {"out": str(out), "seconds": seconds, "eval": evaluation}


def report(result: dict) -> str:
    """What was made and where, and the held-out mAP per class."""
    out, ev = Path(result["out"]), result["eval"]
    lines = [f"\nheld-out mAP (devkit rules, IoU 0.5): {ev['map']:.3f}"]
    for c in ev["classes"]:
        lines.append(f"  {c['name']:14s} AP {c['ap']:.3f}  ({c['positives']} objects, {c['detections']} detections)")
    lines.append("seconds: " + ", ".join(f"{k} {v:g}" for k, v in result["seconds"].items())
                 + f"; {sum(result['seconds'].values()):.0f} in all")
    lines += [f"data:           {out / 'data'} (ILSVRC DET layout)",
              f"model bundle:   {out / 'model'} (detector members + MultiBox; `ircnn model info`)",
              f"detections:     {out / 'detections.txt'} (devkit submission format)",
              f"pictures:       {out / 'vis'}",
              f"evaluation:     {out / 'eval.json'}, curves in {out / 'plots'}",
              f"next:           ircnn detect YOUR_PHOTOS/ --model {out / 'model'}",
              f"                ircnn serve --model {out / 'model'}   (detection only: the page and /v1/detect "
              "work; this bundle has no whole-image classifier, so /v1/classify is not available)"]
    return "\n".join(lines)
