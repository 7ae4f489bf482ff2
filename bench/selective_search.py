"""Selective search on scikit-image's bundled photos: boxes and seconds at coarsen 1.0 (R-CNN) and 2.0 (the paper).

The paper says 2x larger superpixels halve the selective search proposals; the acceptance band is a median
count(2.0) / count(1.0) of 0.4..0.65 over these photos. The "no 20 px" column repeats the ratio without R-CNN's
filter of boxes under 20 px at the 500 px scale, to show how much of the halving that filter carries. Seconds are
in this process (the best of ``--repeat``); the runner's start-up and per-call overhead are measured at the end.

    python bench/selective_search.py             # fast mode, all photos (about a minute on 2 cores)
    python bench/selective_search.py --quality   # also quality mode (several minutes)
    python bench/selective_search.py --json      # one JSON document
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import numpy as np
from skimage import data

from detector.nets.summary import format_machine, machine
from proposals.selective_search import SelectiveSearchConfig, SelectiveSearchRunner, selective_search

# every photo that ships inside scikit-image (no download); camera, coins and moon are grayscale
PHOTOS = ("astronaut", "camera", "chelsea", "coffee", "coins", "hubble_deep_field", "immunohistochemistry", "moon",
          "retina", "rocket", "stereo_motorcycle")


def load(name: str) -> np.ndarray:
    image = getattr(data, name)()
    return image[0] if isinstance(image, tuple) else image  # stereo_motorcycle: (left, right, disparity)


def timed(image: np.ndarray, config: SelectiveSearchConfig, repeat: int) -> tuple[int, float]:
    best, boxes = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        boxes = selective_search(image, config)
        best = min(best, time.perf_counter() - start)
    return len(boxes), best


def run(names: list[str], modes: list[str], repeat: int) -> dict:
    rows = []
    for name in names:
        image = load(name)
        row = {"image": name, "height": image.shape[0], "width": image.shape[1]}
        for mode in modes:
            for coarsen in (1.0, 2.0):
                config = SelectiveSearchConfig(mode=mode, coarsen=coarsen)
                row[f"{mode}_{coarsen:g}_boxes"], row[f"{mode}_{coarsen:g}_seconds"] = timed(image, config, repeat)
                if mode == "fast":
                    row[f"fast_{coarsen:g}_boxes_no_filter"], _ = timed(
                        image, dataclasses.replace(config, min_side_resized=0.0), 1)
            row[f"{mode}_ratio"] = row[f"{mode}_2_boxes"] / max(1, row[f"{mode}_1_boxes"])
        row["fast_ratio_no_filter"] = row["fast_2_boxes_no_filter"] / max(1, row["fast_1_boxes_no_filter"])
        rows.append(row)
    summary = {f"{m}_median_ratio": float(np.median([r[f"{m}_ratio"] for r in rows])) for m in modes}
    summary["fast_median_ratio_no_filter"] = float(np.median([r["fast_ratio_no_filter"] for r in rows]))
    default_seconds = [r["fast_2_seconds"] for r in rows]
    summary["default_seconds_mean"] = float(np.mean(default_seconds))
    summary["default_seconds_max"] = float(np.max(default_seconds))
    summary.update(runner_overhead(load(names[0])))
    return {"rows": rows, "summary": summary, "cpus": os.cpu_count()}


def runner_overhead(image: np.ndarray) -> dict:
    in_process = timed(image, SelectiveSearchConfig(), 3)[1]
    start = time.perf_counter()
    with SelectiveSearchRunner() as runner:
        runner(image)
        first = time.perf_counter() - start
        calls = []
        for _ in range(3):
            start = time.perf_counter()
            runner(image)
            calls.append(time.perf_counter() - start)
    return {"runner_first_call_seconds": first, "runner_call_seconds": min(calls),
            "in_process_seconds": in_process}


def print_table(result: dict, modes: list[str]) -> None:
    head = f"{'image':22s} {'size':>10s}"
    for mode in modes:
        head += f" | {mode + ' 1.0':>11s} {'s':>5s} {mode + ' 2.0':>11s} {'s':>5s} {'ratio':>5s}"
    print(head + " | no 20 px")
    for r in result["rows"]:
        line = f"{r['image']:22s} {r['width']:>5d}x{r['height']:<4d}"
        for m in modes:
            line += (f" | {r[f'{m}_1_boxes']:>11d} {r[f'{m}_1_seconds']:5.2f} {r[f'{m}_2_boxes']:>11d}"
                     f" {r[f'{m}_2_seconds']:5.2f} {r[f'{m}_ratio']:5.2f}")
        print(line + f" | {r['fast_ratio_no_filter']:8.2f}")
    s = result["summary"]
    for m in modes:
        print(f"{m}: median count(2.0)/count(1.0) = {s[f'{m}_median_ratio']:.3f} (acceptance 0.4..0.65)")
    print(f"fast without R-CNN's 20 px filter: median ratio {s['fast_median_ratio_no_filter']:.3f}")
    print(f"default (fast, coarsen 2) at 500 px wide: {s['default_seconds_mean']:.2f} s mean, "
          f"{s['default_seconds_max']:.2f} s max per image, in process, {result['cpus']} CPUs (acceptance < 1.5 s)")
    print(f"runner: first call {s['runner_first_call_seconds']:.2f} s (worker start-up included), then "
          f"{s['runner_call_seconds']:.2f} s per call vs {s['in_process_seconds']:.2f} s in process")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", nargs="+", default=list(PHOTOS), choices=PHOTOS, metavar="NAME")
    parser.add_argument("--quality", action="store_true", help="also measure quality mode")
    parser.add_argument("--repeat", type=int, default=2, help="timed runs per setting (the best counts)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    modes = ["fast", "quality"] if args.quality else ["fast"]
    result = run(args.images, modes, args.repeat)
    result["machine"] = machine()
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result, modes)
        print(f"on {format_machine(result['machine'])}")


if __name__ == "__main__":  # the runner's worker is spawned: it re-imports this file
    main()
