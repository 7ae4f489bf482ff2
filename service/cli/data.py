"""``ircnn data synth``: a synthetic detection set in the ILSVRC DET layout."""

from __future__ import annotations

import os

from detector.cpus import default_workers
from service.cli.common import CliError, print_json

# Literals so that the parser imports nothing heavy; tests/service/cli checks them against eval.synth_photos.CLASSES
# and eval.synth_config.MAX_IMAGES.
SYNTH_CLASSES = ("cat", "person", "cup or mug", "motorcycle", "horse")  # eval.synth_photos.CLASSES, in order
SYNTH_MAX_IMAGES = 1_000_000


def add_parser(sub) -> None:
    data = sub.add_parser("data", help="make data sets")
    sub = data.add_subparsers(dest="data_command", required=True, metavar="WHAT")
    p = sub.add_parser("synth", help="a synthetic detection set in the ILSVRC DET layout, offline",
                       description="Write Data/DET/{train,val}/*.JPEG, Annotations/DET/{train,val}/*.xml, "
                       "ImageSets/DET/{train,val}.txt and synth.json: objects cut from photographs scikit-image "
                       "ships, pasted at many scales with occlusion, truncation, distractors and photometric "
                       "changes onto real textures, labelled with ILSVRC DET WNIDs. For tests and smoke runs; "
                       "it does not stand in for ILSVRC. Same seed, same files.")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="new or empty directory, or an earlier synthetic set (replaced)")
    p.add_argument("--images", type=int, required=True, metavar="N", help=f"images in all, 1..{SYNTH_MAX_IMAGES:,}")
    p.add_argument("--seed", type=int, default=0, help="same seed, byte-identical files (default 0)")
    p.add_argument("--classes", type=int, default=len(SYNTH_CLASSES), metavar="K",
                   help=f"use the first K classes of {', '.join(SYNTH_CLASSES)} "
                   f"(1..{len(SYNTH_CLASSES)}, default {len(SYNTH_CLASSES)})")
    p.add_argument("--val-fraction", type=float, default=0.2, metavar="F",
                   help="share of the images (the last ones) in val (default 0.2)")
    p.add_argument("--size", type=int, default=500, metavar="PX",
                   help="longer image side; the shorter is 0.6..1.0 of it (default 500, as ILSVRC)")
    p.add_argument("--workers", type=int, default=default_workers(os.cpu_count() or 1),
                   help="processes (default: one per core); the files do not depend on it")
    p.add_argument("--overwrite", action="store_true",
                   help="also replace a set's paths in a non-empty directory that holds no synthetic set")
    p.add_argument("--json", action="store_true", help="print synth.json's document (plus out and seconds)")
    p.set_defaults(func=_cmd_data_synth)


def _cmd_data_synth(args) -> int:
    import time

    from eval.synth import SynthConfig, write_synth_set

    if args.workers < 1:
        raise CliError(f"--workers must be at least 1, got {args.workers}")
    config = SynthConfig(images=args.images, seed=args.seed, classes=args.classes,
                         val_fraction=args.val_fraction, size=args.size)
    start = time.perf_counter()
    doc = write_synth_set(args.out, config, workers=args.workers, overwrite=args.overwrite)
    seconds = time.perf_counter() - start
    if args.json:
        print_json({**doc, "out": args.out, "seconds": round(seconds, 3)})
        return 0
    splits = doc["splits"]
    print(f"wrote {doc['images']} images to {args.out} in {seconds:.1f} s (seed {doc['seed']})")
    for split, c in splits.items():
        print(f"  {split:5s}  {c['images']:7d} images  {c['objects']:7d} objects  "
              f"{c['images_without_objects']:6d} images without objects  ImageSets/DET/{split}.txt")
    print(f"  {'det_id':>6s}  {'wnid':9s}  {'name':12s}  {'train':>7s}  {'val':>7s}  photos")
    for c in doc["classes"]:
        print(f"  {c['det_id']:6d}  {c['wnid']:9s}  {c['name']:12s}  {c['objects']['train']:7d}  "
              f"{c['objects']['val']:7d}  {', '.join(c['photos'])}")
    return 0
