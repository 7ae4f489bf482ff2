"""Whole-image classification throughput: images/s for 1, 10 and 144 crops at batch sizes 1 and 32.

Every figure is also given as a fraction of the machine's measured matmul peak (GoogLeNet's exact multiply-adds
x 2 per crop, from ``detector.nets.summary``) and as a ratio against the plain baseline (default layout, fp32)
measured in the same run. bfloat16 is reported with its largest probability difference from fp32.

    python bench/classify.py                 # full table (a few minutes on 2 cores)
    python bench/classify.py --quick         # fewer configurations and repetitions
    python bench/classify.py --json          # one JSON document
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
from torch import nn

from detector.bundle.format import init_bundle
from detector.nets.googlenet import GoogLeNetConfig
from detector.nets.summary import format_machine, machine, matmul_peak, summarize
from detector.pipeline.classify import Classifier
from detector.pipeline.ensemble import EnsembleConfig


def images_per_second(clf: Classifier, images: list[np.ndarray], crops: int, min_seconds: float) -> float:
    clf.probabilities(images[:1], crops)  # warm-up: allocator, oneDNN kernels
    done, start = 0, time.perf_counter()
    while True:
        clf.probabilities(images, crops)
        done += len(images)
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return done / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=("torchvision", "paper"), default="torchvision")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seconds", type=float, default=None, help="minimum seconds per measurement")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    seconds = args.seconds or (1.0 if args.quick else 4.0)

    torch.manual_seed(0)
    bundle = init_bundle(GoogLeNetConfig(variant=args.variant, aux_logits=False))
    for m in bundle.members[0].modules():  # non-degenerate outputs, so the bf16 comparison means something
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight)
    macs = summarize(args.variant)["total"]["macs"]
    peak32 = matmul_peak(torch.float32)
    peak16 = matmul_peak(torch.bfloat16)
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)

    modes = {
        "baseline fp32": EnsembleConfig(channels_last=False),
        "channels_last fp32": EnsembleConfig(channels_last=True),
        "channels_last bf16": EnsembleConfig(channels_last=True, precision="bf16"),
    }
    crop_set = (1, 10) if args.quick else (1, 10, 144)
    rows = []
    for crops in crop_set:
        for batch in (1, 32):
            n_images = max(1, batch // crops)  # images per call so that a call fills whole batches
            images = [photo] * n_images
            base = None
            for mode, cfg in modes.items():
                clf = Classifier(bundle, EnsembleConfig(batch_size=batch, channels_last=cfg.channels_last,
                                                        precision=cfg.precision))
                ips = images_per_second(clf, images, crops, seconds)
                base = base or ips
                flops = ips * crops * macs * 2
                rows.append({"crops": crops, "batch": batch, "mode": mode, "images_per_s": ips,
                             "crops_per_s": ips * crops, "fraction_of_fp32_peak": flops / peak32,
                             "fraction_of_bf16_peak": flops / peak16, "vs_baseline": ips / base})
            if not args.json:
                for r in rows[-len(modes):]:
                    print(f"crops {r['crops']:>3}  batch {r['batch']:>2}  {r['mode']:<20} {r['images_per_s']:8.2f} img/s"
                          f"  {r['crops_per_s']:7.1f} crops/s  {100 * r['fraction_of_fp32_peak']:5.1f}% of fp32 peak"
                          f"  x{r['vs_baseline']:.2f} vs baseline", flush=True)

    fp32 = Classifier(bundle, EnsembleConfig()).probabilities([photo], 10)
    bf16 = Classifier(bundle, EnsembleConfig(precision="bf16")).probabilities([photo], 10)
    doc = {
        "variant": args.variant,
        "machine": machine(),
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "macs_per_crop": macs,
        "matmul_peak_gflops": {"fp32": peak32 / 1e9, "bf16": peak16 / 1e9},
        "bf16_max_prob_diff": float((fp32 - bf16).abs().max()),
        "bf16_same_top1": bool(fp32.argmax() == bf16.argmax()),
        "rows": rows,
    }
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(f"on {format_machine(doc['machine'])}")
        print(f"matmul peak: fp32 {peak32 / 1e9:.0f} GFLOP/s, bf16 {peak16 / 1e9:.0f} GFLOP/s; "
              f"{macs / 1e9:.3f} GMAC per crop; {torch.get_num_threads()} threads")
        print(f"bf16 vs fp32 (10 crops): max probability difference {doc['bf16_max_prob_diff']:.4f}, "
              f"same top-1: {doc['bf16_same_top1']}")


if __name__ == "__main__":
    main()
