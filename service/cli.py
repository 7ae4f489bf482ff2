"""The ``ircnn`` command line. Each command parses, validates and calls the same functions the service calls.

Human-readable text by default, one JSON document (or JSON lines) with ``--json``; errors go to stderr with a
non-zero exit code and a message that says what to do.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


# Literal here so that building the parser does not import torch (``ircnn data synth`` never needs it);
# tests/service checks it equals detector.googlenet.VARIANTS.
VARIANTS = ("paper", "torchvision")


class CliError(Exception):
    """A user-facing error: printed to stderr as ``ircnn: error: <message>``, exit code 2."""


def _print_json(doc) -> None:
    print(json.dumps(doc))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ircnn", description="GoogLeNet classification and R-CNN detection "
                                     "as in 'Going deeper with convolutions'")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    model = sub.add_parser("model", help="create, import and inspect model bundles")
    model_sub = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    _add_model_commands(model_sub)

    train = sub.add_parser("train", help="train a classifier (and later detectors, MultiBox)")
    train_sub = train.add_subparsers(dest="train_command", required=True, metavar="WHAT")
    _add_train_commands(train_sub)

    ev = sub.add_parser("eval", help="score predictions")
    eval_sub = ev.add_subparsers(dest="eval_command", required=True, metavar="WHAT")
    _add_eval_commands(eval_sub)

    data = sub.add_parser("data", help="make data sets")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="WHAT")
    _add_data_commands(data_sub)

    _add_classify_command(sub)
    return parser


# ---- ircnn model ... -------------------------------------------------------------------------------------


def _add_model_commands(sub) -> None:
    p = sub.add_parser("summary", help="Table 1: per-row output size, depth, weights and multiply-adds")
    p.add_argument("--variant", choices=VARIANTS, default="paper")
    p.add_argument("--json", action="store_true", help="one JSON document")
    p.set_defaults(func=_cmd_model_summary)

    p = sub.add_parser("init", help="a bundle of randomly initialised members (tests, training starts)")
    p.add_argument("--out", required=True, help="bundle directory to write")
    p.add_argument("--members", type=int, default=1, help="ensemble size (default 1)")
    p.add_argument("--variant", choices=VARIANTS, default="paper")
    p.add_argument("--task", choices=("cls1000", "det200", "det200-from-cls1000"), default="cls1000")
    p.add_argument("--width", type=float, default=1.0, help="channel multiplier (1.0 = the paper's network)")
    p.add_argument("--seed", type=int, default=0, help="member i is initialised with seed + i")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_model_init)

    p = sub.add_parser("import-torchvision", help="a torchvision GoogLeNet checkpoint as a 1-member bundle")
    p.add_argument("file", help="e.g. googlenet-1378be20.pth, or torch.save(model.state_dict(), path)")
    p.add_argument("--out", required=True, help="bundle directory to write")
    p.add_argument("--input-range", choices=("auto", "unit", "imagenet"), default="auto",
                   help="unit: weights expect [-1, 1] inputs (torchvision's ImageNet checkpoint, found by its "
                        "hash under auto); imagenet: ImageNet mean/std normalised inputs")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_model_import)

    p = sub.add_parser("info", help="describe a bundle")
    p.add_argument("dir", help="bundle directory")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_model_info)


def _print_bundle(bundle, as_json: bool) -> None:
    info = bundle.describe()
    if as_json:
        _print_json(info)
        return
    arch = info["arch"]
    print(f"bundle      {info['path']}")
    print(f"task        {info['task']} ({info['classes']} classes)")
    print(f"arch        GoogLeNet {arch['variant']} variant, width {arch['width']}, aux heads {arch['aux_logits']}")
    print(f"members     {info['members']} x {info['parameters_per_member']:,} parameters")
    pre = info["preprocess"]
    print(f"preprocess  {pre['size']}x{pre['size']}, mean {pre['mean']}, std {pre['std']}")
    print(f"multibox    {info['multibox'] or 'none'}")
    print(f"provenance  {json.dumps(info['provenance'])}")


def _cmd_model_summary(args) -> int:
    from detector.summary import format_summary, summarize

    doc = summarize(args.variant)
    if args.json:
        _print_json(doc)
    else:
        print(format_summary(doc))
    return 0


def _cmd_model_init(args) -> int:
    from detector.bundle import init_bundle, save_bundle
    from detector.googlenet import GoogLeNetConfig

    classes = 201 if args.task == "det200" else 1000
    arch = GoogLeNetConfig(variant=args.variant, num_classes=classes, width=args.width)
    bundle = init_bundle(arch, members=args.members, seed=args.seed, task=args.task)
    save_bundle(args.out, bundle)
    _print_bundle(bundle, args.json)
    return 0


def _cmd_model_import(args) -> int:
    from detector.bundle import import_torchvision, save_bundle

    bundle = import_torchvision(args.file, input_range=args.input_range)
    save_bundle(args.out, bundle)
    _print_bundle(bundle, args.json)
    return 0


def _cmd_model_info(args) -> int:
    from detector.bundle import load_bundle

    _print_bundle(load_bundle(args.dir), args.json)
    return 0


# ---- ircnn train ... -------------------------------------------------------------------------------------


def _add_train_commands(sub) -> None:
    p = sub.add_parser("classifier", help="train GoogLeNet members with the paper's recipe (section 6)",
                       description="Train on an ImageFolder tree <class>/<images>: random 8-100% area crops "
                       "with random interpolation, photometric distortions, SGD momentum 0.9, learning rate "
                       "-4% every 8 epochs, auxiliary losses x0.3; the bundle gets the Polyak-averaged weights. "
                       "ILSVRC WNID folders train a 1000-way cls1000 head, other folders one output each. "
                       "Runs under `torchrun --nproc_per_node=N` too (--batch-size is per process).")
    p.add_argument("--data", required=True, metavar="DIR", help="training images, <class>/<images>")
    p.add_argument("--out", required=True, metavar="BUNDLE_DIR", help="bundle directory to write")
    p.add_argument("--val", metavar="DIR", help="validation images, <class>/<images>: top-1 after each epoch")
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=32, help="per process (default 32)")
    p.add_argument("--lr", type=float, default=0.01, help="initial learning rate (default 0.01)")
    p.add_argument("--weight-decay", type=float, default=2e-4, help="on weights, not biases (default 2e-4)")
    p.add_argument("--workers", type=int, default=4, help="data loading processes per training process")
    p.add_argument("--variant", choices=VARIANTS, help="a new network's variant (default paper)")
    p.add_argument("--width", type=float, help="a new network's channel multiplier (default 1.0)")
    p.add_argument("--size", type=int, default=224, help="network input side (default 224)")
    p.add_argument("--members", type=int, default=1, help="ensemble members, member i with seed + i")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", metavar="BUNDLE", help="start every member from this bundle's weights and arch")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint, if there is one")
    p.add_argument("--checkpoint-dir", metavar="DIR", help="default BUNDLE_DIR/.checkpoint")
    p.add_argument("--checkpoint-every", type=int, default=2000, metavar="STEPS",
                   help="mid-epoch checkpoint interval (0: epoch ends only; default 2000)")
    p.add_argument("--ema-decay", type=float, default=0.999, help="Polyak averaging decay (default 0.999)")
    p.add_argument("--max-steps", type=int, default=0, help="stop each member after N steps (0: no limit)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--json", action="store_true", help="one JSON line per epoch, then the bundle's description")
    p.set_defaults(func=_cmd_train_classifier)


def _cmd_train_classifier(args) -> int:
    from detector.train import TrainConfig, train

    if args.init and (args.variant is not None or args.width is not None):
        raise CliError("--variant and --width describe a new network; with --init the bundle's architecture is "
                       "used, so drop them")
    cfg = TrainConfig(
        data=args.data, out=args.out, val=args.val, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, workers=args.workers, variant=args.variant or "paper",
        width=1.0 if args.width is None else args.width, size=args.size, members=args.members, seed=args.seed, init=args.init,
        resume=args.resume, checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every,
        ema_decay=args.ema_decay, max_steps=args.max_steps, device=args.device)

    def report(r: dict) -> None:
        if args.json:
            _print_json(r)
        else:
            val = "" if r["val_top1"] is None else f"  val top-1 {100 * r['val_top1']:.2f}%"
            part = "" if r["complete"] else " (stopped at --max-steps)"
            print(f"member {r['member']} epoch {r['epoch']}/{r['epochs']}  step {r['step']}  train loss "
                  f"{r['train_loss']:.4f}  lr {r['lr']:.4g}  {r['images_per_s']:.0f} img/s{val}{part}")
        sys.stdout.flush()

    bundle = train(cfg, on_epoch=report)
    if bundle is not None:  # rank 0
        _print_bundle(bundle, args.json)
    return 0


# ---- ircnn eval ... --------------------------------------------------------------------------------------


def _add_eval_commands(sub) -> None:
    cls = sub.add_parser("cls", help="top-1 / top-5 error of classification predictions",
                         description="Score ranked class predictions against ILSVRC classification labels. "
                         "Images are matched by file name without directories and extension.")
    cls.add_argument("--labels", required=True, metavar="FILE",
                     help="ImageFolder tree <wnid>/<images>, '<image> <wnid or index>' lines, or the devkit's "
                     "ILSVRC2012_validation_ground_truth.txt")
    cls.add_argument("--labels-format", choices=("imagefolder", "pairs", "ilsvrc2012"), default=None,
                     help="force the labels format (default: detect it)")
    cls.add_argument("--predictions", required=True, metavar="FILE",
                     help="'<image> <label1> .. <label5>' lines (WNID or index 0..999), "
                     "or the output of `ircnn classify --json`")
    cls.add_argument("--json", action="store_true", help="print one JSON document")
    cls.set_defaults(func=_run_eval_cls)

    det = sub.add_parser("det", help="ILSVRC detection mAP (the devkit's rules, or a cross-check mode)",
                         description="Score detections against ILSVRC DET annotations. Modes: ilsvrc = the "
                         "2013/2014 devkit (per-object IoU threshold min(0.5, wh/((w+10)(h+10))), VOCap); iou50 = "
                         "devkit with a fixed 0.5 threshold; voc07 = PASCAL VOC 2007 matching and 11-point AP; "
                         "coco50 = pycocotools' AP at IoU 0.5. The mAP is the mean over the classes with at least "
                         "one ground-truth object.")
    det.add_argument("--annotations", required=True, metavar="DIR",
                     help="folder of the imageset's XML files, e.g. Annotations/DET/val")
    det.add_argument("--imageset", required=True, metavar="FILE", help="'<image name> <index>' lines, "
                     "e.g. ImageSets/DET/val.txt")
    det.add_argument("--predictions", required=True, metavar="FILE",
                     help="devkit submission lines '<image_index> <det_id> <confidence> <xmin> <ymin> <xmax> "
                     "<ymax>', `ircnn detect` JSON lines (images matched by file name without directories and "
                     "extension), or a COCO results list (integer image_id = imageset index, string = image name)")
    det.add_argument("--predictions-format", choices=("ilsvrc", "jsonl", "coco"), default=None,
                     help="force the predictions format (default: detect it from the first character)")
    det.add_argument("--blacklist", metavar="FILE", help="'<image index> <wnid or det id>' pairs to leave out")
    det.add_argument("--mode", choices=("ilsvrc", "iou50", "voc07", "coco50"), default="ilsvrc")
    det.add_argument("--json", action="store_true", help="print one JSON document")
    det.add_argument("--plots", metavar="DIR", help="write pr_curves.png and ap_per_class.png into DIR")
    det.set_defaults(func=_run_eval_det)


def _run_eval_cls(args) -> int:
    from eval.classification import evaluate_files

    result = evaluate_files(args.labels, args.predictions, args.labels_format)
    if args.json:
        _print_json(result.to_json())
        return 0
    print(f"images       {result.images}")
    print(f"top-1 error  {100 * result.top1_error:.2f}%")
    print(f"top-5 error  {100 * result.top5_error:.2f}%")
    print(f"missing      {result.missing}  (labelled images without a prediction, counted as wrong)")
    print(f"unmatched    {result.unmatched}  (predictions for unlabelled images, ignored)")
    print(f"errors       {result.errors}  (error lines, counted as wrong)")
    return 0


def _run_eval_det(args) -> int:
    from eval.ilsvrc import evaluate_files

    result, predictions = evaluate_files(args.annotations, args.imageset, args.predictions, mode=args.mode,
                                         blacklist_path=args.blacklist, predictions_format=args.predictions_format)
    plots = []
    if args.plots:
        from eval.plots import write_plots

        plots = write_plots(result, args.plots)
    if args.json:
        _print_json({**result.to_json(), "predictions_format": predictions.format,
                     "failed_images": len(predictions.failed), "plots": plots})
        return 0
    in_map = [c for c in result.classes if c.ap is not None]
    print(f"{'det_id':>6}  {'name':<24} {'AP':>7} {'positives':>9} {'detections':>10}")
    for c in result.classes:
        ap = "-" if c.ap is None else f"{100 * c.ap:6.2f}%"
        print(f"{c.det_id:>6}  {c.name[:24]:<24} {ap:>7} {c.positives:>9} {c.detections:>10}")
    print(f"mode         {result.mode}")
    print(f"images       {result.images}")
    print(f"predictions  {predictions.format} file, {len(predictions.detections)} detections")
    if result.unscored:
        print(f"unscored     {result.unscored} detections on images outside the imageset (ignored)")
    if result.blacklisted:
        print(f"blacklisted  {result.blacklisted} detections")
    if predictions.failed:
        print(f"errors       {len(predictions.failed)} images with an error line (scored as no detections)")
    for path in plots:
        print(f"plot         {path}")
    print(f"mAP          {100 * result.map:.2f}%  (mean over {len(in_map)} classes with positives; "
          "'-' = no positives, not counted)")
    return 0


# ---- ircnn data ... --------------------------------------------------------------------------------------


def _add_data_commands(sub) -> None:
    from eval.synth import CLASSES, MAX_IMAGES

    p = sub.add_parser("synth", help="a synthetic detection set in the ILSVRC DET layout, offline",
                       description="Write Data/DET/{train,val}/*.JPEG, Annotations/DET/{train,val}/*.xml, "
                       "ImageSets/DET/{train,val}.txt and synth.json: objects cut from photographs scikit-image "
                       "ships, pasted at many scales with occlusion, truncation, distractors and photometric "
                       "changes onto real textures, labelled with ILSVRC DET WNIDs. For tests and smoke runs; "
                       "it does not stand in for ILSVRC. Same seed, same files.")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="new or empty directory, or an earlier synthetic set (replaced)")
    p.add_argument("--images", type=int, required=True, metavar="N", help=f"images in all, 1..{MAX_IMAGES:,}")
    p.add_argument("--seed", type=int, default=0, help="same seed, byte-identical files (default 0)")
    p.add_argument("--classes", type=int, default=len(CLASSES), metavar="K",
                   help=f"use the first K classes of cat, person, cup or mug, motorcycle, horse "
                   f"(1..{len(CLASSES)}, default {len(CLASSES)})")
    p.add_argument("--val-fraction", type=float, default=0.2, metavar="F",
                   help="share of the images (the last ones) in val (default 0.2)")
    p.add_argument("--size", type=int, default=500, metavar="PX",
                   help="longer image side; the shorter is 0.6..1.0 of it (default 500, as ILSVRC)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
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
        _print_json({**doc, "out": args.out, "seconds": round(seconds, 3)})
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


# ---- ircnn classify --------------------------------------------------------------------------------------


def _add_classify_command(sub) -> None:
    p = sub.add_parser("classify", help="whole-image classification over the 1000 ILSVRC classes")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files or directories (searched recursively)")
    p.add_argument("--model", help="bundle directory (default: torchvision's ImageNet GoogLeNet)")
    p.add_argument("--crops", type=int, choices=(1, 10, 144), default=1, help="test-time crops (section 7)")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32, help="crops per forward pass")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--json", action="store_true", help="one JSON object per image, in input order")
    p.set_defaults(func=_cmd_classify)


def _cmd_classify(args) -> int:
    from detector.bundle import resolve_bundle
    from detector.classify import Classifier
    from detector.ensemble import EnsembleConfig
    from detector.image import IMAGE_SUFFIXES, list_images

    if not 1 <= args.top_k <= 1000:
        raise CliError(f"--top-k must be in 1..1000, got {args.top_k}")
    paths = list_images(args.images)
    if not paths:
        raise CliError(f"no images found in {' '.join(args.images)} (looked for {', '.join(IMAGE_SUFFIXES)})")
    bundle = resolve_bundle(args.model, device=args.device)
    classifier = Classifier(bundle, EnsembleConfig(batch_size=args.batch_size, precision=args.precision))
    failed = 0
    for result in classifier.classify_paths(paths, crops=args.crops, top_k=args.top_k):
        if "error" in result:
            failed += 1
            if not args.json:
                print(f"{result['image']}: error: {result['error']}", file=sys.stderr)
        if args.json:
            _print_json(result)
        elif "error" not in result:
            print(f"{result['image']} ({result['crops']} crops x {result['members']} members)")
            for t in result["top_k"]:
                print(f"  {t['prob']:7.4f}  {t['index']:4d}  {t['wnid']}  {t['name']}")
        sys.stdout.flush()
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (CliError, ValueError, OSError) as e:
        # Domain errors (bad bundle, bad image, malformed file) are ValueError/OSError subclasses whose
        # messages say what to do; IRCNN_DEBUG=1 shows the traceback instead.
        if os.environ.get("IRCNN_DEBUG"):
            raise
        print(f"ircnn: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ircnn: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
