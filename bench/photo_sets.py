"""`ircnn detect` then `ircnn eval det` on the labelled real-photo sets, as a user runs them: the numbers README
reports. Each configuration is one `ircnn detect` process per set (timed whole, model loading included), then
`ircnn eval det` scores it with the devkit's rules.

    python bench/photo_sets.py --model /tmp/lite0 --out /tmp/photo-sets            # defaults
    python bench/photo_sets.py --model /tmp/lite0 --out /tmp/photo-sets --config before="--agreement 0 \
        --context-frames 300 --person-evidence off"

Sets: ``data/package_photos/dev`` (where defaults are chosen), ``data/package_photos/test`` (reported only) and
``data/real_photos`` (where the defaults before were chosen). Besides mAP: the best score on the photos without a
DET object, and the precision and recall of the detections scoring at least 0.3 (``--vis-threshold``'s default).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import time
from pathlib import Path

import numpy as np

from detector.nets.summary import format_machine, machine
from eval.annotations import read_annotations, read_blacklist, read_imageset
from eval.ilsvrc import devkit_iou

REPO = Path(__file__).resolve().parent.parent
SETS = {"dev": REPO / "data/package_photos/dev", "test": REPO / "data/package_photos/test",
        "real_photos": REPO / "data/real_photos"}


def at_threshold(records: list[dict], root: Path, threshold: float) -> dict:
    """Precision and recall of the detections scoring >= threshold (IoU >= 0.5, each object found once, blacklisted
    classes left out), and the best score on the photos without objects."""
    imageset = read_imageset(str(root / "ImageSets/DET/val.txt"))
    truth = read_annotations(str(root / "Annotations/DET"), imageset)
    blacklist = read_blacklist(str(root / "blacklist.txt")) if (root / "blacklist.txt").is_file() else set()
    index = {Path(name).name: i for name, i in imageset.items()}
    right = wrong = 0
    found, best_negative = set(), 0.0
    for rec in records:
        i = index[Path(rec["image"]).stem]
        a = truth[i]
        for d in sorted(rec.get("detections", []), key=lambda d: -d["score"]):
            if not len(a.det_ids):
                best_negative = max(best_negative, d["score"])
            if d["score"] < threshold or (i, d["det_id"]) in blacklist:
                continue
            hit = None
            for j, (g, box) in enumerate(zip(a.det_ids, a.boxes)):
                if g == d["det_id"] and (i, j) not in found and devkit_iou(np.array([d["box"]]), box[None])[0] >= 0.5:
                    hit = j
                    break
            if hit is None:
                wrong += 1
            else:
                found.add((i, hit))
                right += 1
    objects = sum(len(a.det_ids) for a in truth.values())
    return {"precision": right / max(1, right + wrong), "recall": len(found) / max(1, objects),
            "detections": right + wrong, "negatives_best": best_negative}


def run(model: str, name: str, root: Path, flags: list[str], out: Path, reuse: bool = False) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    dets = out / f"{name}.jsonl"
    seconds = float("nan")
    if not (reuse and dets.is_file()):
        dets.unlink(missing_ok=True)
        start = time.perf_counter()
        subprocess.run(["ircnn", "detect", str(root / "Data/DET/val"), "--model", model, "--out", str(dets),
                        "--json", *flags], check=True, stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - start
    records = [json.loads(line) for line in dets.read_text().splitlines() if line.strip()]
    args = ["ircnn", "eval", "det", "--annotations", str(root / "Annotations/DET"), "--imageset",
            str(root / "ImageSets/DET/val.txt"), "--predictions", str(dets), "--json"]
    if (root / "blacklist.txt").is_file() and (root / "blacklist.txt").stat().st_size:
        args += ["--blacklist", str(root / "blacklist.txt")]
    result = json.loads(subprocess.run(args, check=True, capture_output=True, text=True).stdout)
    return {"map": result["map"], "seconds": seconds, "photos": len(records), **at_threshold(records, root, 0.3),
            "classes": {c["name"]: c["ap"] for c in result["classes"] if c["ap"] is not None}}


def main_() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--config", action="append", default=None, metavar='NAME="FLAGS"',
                    help='a configuration: `ircnn detect` flags (default: defaults="")')
    ap.add_argument("--sets", default="dev,test,real_photos")
    ap.add_argument("--reuse", action="store_true", help="score detection files already in --out (no timing)")
    args = ap.parse_args()
    configs = dict(c.split("=", 1) for c in (args.config or ["defaults="]))
    doc = {"machine": machine(), "model": args.model, "rows": {}}
    print(format_machine(doc["machine"]), flush=True)
    for cname, flags in configs.items():
        for sname in args.sets.split(","):
            r = run(args.model, f"{cname}-{sname}", SETS[sname], shlex.split(flags), Path(args.out), args.reuse)
            doc["rows"].setdefault(cname, {})[sname] = r
            print(f"{cname:<12} {sname:<12} mAP {r['map']:.3f}  best on object-free {r['negatives_best']:.2f}  "
                  f">=0.3: precision {r['precision']:.2f} recall {r['recall']:.2f}  "
                  f"{r['seconds'] / r['photos']:.1f} s/photo", flush=True)
    (Path(args.out) / "photo_sets.json").write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main_()
