"""Seconds per image for the paper's proposal step at 500 px, split by stage: selective search (2x coarsened, in
its worker process), MultiBox (200 boxes, one GoogLeNet forward at 224), and the merge.

Issue 4's acceptance: under 1.5 s per 500 px image on this machine, selective search dominating. MultiBox's cost
does not depend on its weights, so a randomly initialised full-width network stands in unless ``--model`` names
a bundle with a trained one. The images are scikit-image's bundled photos resized to 500 px wide (R-CNN's
working size, so selective search does no further resizing).

    python bench/proposal_speed.py                 # about half a minute on 2 cores
    python bench/proposal_speed.py --model BUNDLE  # the bundle's MultiBox network
    python bench/proposal_speed.py --json

(Issue 4 named this file ``bench/proposals.py``; that name would shadow the ``proposals`` package for every script
in ``bench/``, which Python runs with ``bench/`` first on ``sys.path``.)
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
from PIL import Image
from skimage import data

from detector.bundle.multibox import GoogLeNetMultiBox, MultiBoxConfig, load_multibox
from detector.nets.summary import format_machine, machine
from proposals.combine import MergeConfig, Proposals, merge
from proposals.selective_search import SelectiveSearchConfig, SelectiveSearchRunner

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle", "camera", "coins")
WIDTH = 500


def load(name: str) -> np.ndarray:
    image = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    image = image[..., :3]
    h, w = image.shape[:2]
    return np.asarray(Image.fromarray(image).resize((WIDTH, round(h * WIDTH / w)), Image.BILINEAR))


def best_of(fn, repeat: int) -> tuple[object, float]:
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return out, best


def run(model: str | None, repeat: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    multibox = load_multibox(model) if model else None
    source = f"trained, from {model}" if multibox is not None else "random full-width (speed only)"
    if multibox is None:
        torch.manual_seed(0)
        multibox = GoogLeNetMultiBox(MultiBoxConfig(variant="torchvision"))
    multibox.eval()
    rows = []
    with SelectiveSearchRunner(SelectiveSearchConfig(coarsen=2.0)) as ss:
        ss(load(PHOTOS[0]))  # start the worker outside the timings
        multibox.propose([load(PHOTOS[0])])  # first-call allocations outside the timings
        for name in PHOTOS:
            image = load(name)
            ss_boxes, ss_s = best_of(lambda: ss(image), repeat)
            ((mb_boxes, mb_scores),), mb_s = best_of(lambda: multibox.propose([image]), repeat)
            parts = [Proposals.from_multibox(mb_boxes, mb_scores), Proposals.from_selective_search(ss_boxes)]
            merged, merge_s = best_of(lambda: merge(parts, MergeConfig()), repeat)
            rows.append({"image": name, "width": image.shape[1], "height": image.shape[0],
                         "selective_search_boxes": len(ss_boxes), "multibox_boxes": len(mb_boxes),
                         "merged_boxes": len(merged), "selective_search_seconds": ss_s, "multibox_seconds": mb_s,
                         "merge_seconds": merge_s, "total_seconds": ss_s + mb_s + merge_s})
    summary = {k: float(np.mean([r[k] for r in rows]))
               for k in ("selective_search_seconds", "multibox_seconds", "merge_seconds", "total_seconds")}
    summary["total_seconds_max"] = float(max(r["total_seconds"] for r in rows))
    # Selective search runs in its own process, single-threaded, so it can overlap with the network.
    summary["overlapped_seconds"] = float(np.mean([max(r["selective_search_seconds"],
                                                       r["multibox_seconds"] + r["merge_seconds"]) for r in rows]))
    return {"rows": rows, "summary": summary, "multibox": source, "torch_threads": threads,
            "cpus": os.cpu_count()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="bundle with a trained MultiBox (default: random full-width network)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per stage (the best counts)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads for MultiBox")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = run(args.model, args.repeat, args.threads)
    result["machine"] = machine()
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{'image':12s} {'size':>9s} {'SS boxes':>8s} {'SS s':>6s} {'MB s':>6s} {'merge s':>7s} {'merged':>6s}"
          f" {'total s':>7s}")
    for r in result["rows"]:
        print(f"{r['image']:12s} {r['width']:>4d}x{r['height']:<4d} {r['selective_search_boxes']:>8d}"
              f" {r['selective_search_seconds']:6.3f} {r['multibox_seconds']:6.3f} {r['merge_seconds']:7.4f}"
              f" {r['merged_boxes']:>6d} {r['total_seconds']:7.3f}")
    s = result["summary"]
    print(f"mean per 500 px image: selective search {s['selective_search_seconds']:.3f} s, MultiBox "
          f"{s['multibox_seconds']:.3f} s, merge {s['merge_seconds']:.4f} s; total {s['total_seconds']:.3f} s "
          f"(max {s['total_seconds_max']:.3f} s; acceptance < 1.5 s), {s['overlapped_seconds']:.3f} s with "
          f"selective search beside MultiBox")
    print(f"MultiBox: {result['multibox']}; {result['torch_threads']} torch threads on {result['cpus']} CPUs")
    print(f"on {format_machine(result['machine'])}")


if __name__ == "__main__":  # the selective search worker is spawned: it re-imports this file
    main()
