"""The ``ircnn`` command line. Each command parses, validates and calls the same functions the service calls.

Human-readable text by default, one JSON document (or JSON lines) with ``--json``; errors go to stderr with a
non-zero exit code and a message that says what to do.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


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

    _add_proposals_command(sub)
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

    p = sub.add_parser("multibox", help="train MultiBox (K boxes with confidences) into an existing bundle",
                       description="Train MultiBox (Erhan et al. 2014) on ILSVRC-format data: images "
                       "ROOT/Data/DET/<name>.JPEG, ground truth ROOT/Annotations/DET/<name>.xml, names from "
                       "--imageset. Priors are k-means centres of the training boxes; the loss is Hungarian "
                       "matching plus alpha x L2 on matched boxes plus a logistic confidence loss. The averaged "
                       "weights go to BUNDLE_DIR/multibox.safetensors and model.json's \"multibox\" entry; the "
                       "bundle's members are not touched. Create the bundle first with `ircnn model init` or "
                       "`ircnn model import-torchvision`.")
    p.add_argument("--data", required=True, metavar="ROOT", help="ILSVRC-format root (e.g. `ircnn data synth`)")
    p.add_argument("--out", required=True, metavar="BUNDLE_DIR", help="an existing model bundle")
    p.add_argument("--imageset", default="ImageSets/DET/train.txt", metavar="FILE",
                   help="training images, relative to ROOT (default ImageSets/DET/train.txt)")
    p.add_argument("--val-imageset", metavar="FILE", help="e.g. ImageSets/DET/val.txt: recall at IoU 0.5 of the "
                   "K boxes, and of the priors alone, after every epoch")
    p.add_argument("--k", type=int, default=200, help="boxes per image (default 200, the paper's)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate, cosine-decayed (default 1e-3)")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="decoupled, on weights only (default 1e-4)")
    p.add_argument("--alpha", type=float, default=0.3, help="location weight of the loss (default 0.3)")
    p.add_argument("--match", choices=("priors", "predictions"), default="priors",
                   help="match ground truth to the priors by location (default; Erhan et al.'s training with "
                   "priors) or to the predictions by location and confidence")
    p.add_argument("--variant", choices=VARIANTS, help="a new trunk's GoogLeNet variant (default paper)")
    p.add_argument("--width", type=float, help="a new trunk's channel multiplier (default 1.0)")
    p.add_argument("--size", type=int, default=224, help="network input side (default 224)")
    p.add_argument("--grid", type=int, default=1, help="5b features pooled to GRID x GRID before the heads "
                   "(default 1: global average pool)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", metavar="BUNDLE", help="classifier bundle whose member 0 starts the trunk (its "
                   "variant, width and input normalisation are used)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint, if there is one")
    p.add_argument("--checkpoint-dir", metavar="DIR", help="default BUNDLE_DIR/.multibox-checkpoint")
    p.add_argument("--checkpoint-every", type=int, default=2000, metavar="STEPS",
                   help="mid-epoch checkpoint interval (0: epoch ends only; default 2000)")
    p.add_argument("--ema-decay", type=float, default=0.999, help="Polyak averaging decay (default 0.999)")
    p.add_argument("--max-steps", type=int, default=0, help="stop after N steps (0: no limit)")
    p.add_argument("--workers", type=int, default=4, help="data loading processes")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--json", action="store_true", help="one JSON line per epoch, then a summary document")
    p.set_defaults(func=_cmd_train_multibox)


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


def _cmd_train_multibox(args) -> int:
    from proposals.multibox import MULTIBOX_FILE
    from proposals.train_multibox import MultiBoxTrainConfig, train_multibox

    if args.init and (args.variant is not None or args.width is not None):
        raise CliError("--variant and --width describe a new trunk; with --init the bundle's architecture is "
                       "used, so drop them")
    cfg = MultiBoxTrainConfig(
        data=args.data, out=args.out, imageset=args.imageset, val_imageset=args.val_imageset, k=args.k,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        alpha=args.alpha, match=args.match, variant=args.variant or "paper",
        width=1.0 if args.width is None else args.width, size=args.size, grid=args.grid, seed=args.seed,
        init=args.init, resume=args.resume, checkpoint_dir=args.checkpoint_dir,
        checkpoint_every=args.checkpoint_every, ema_decay=args.ema_decay, max_steps=args.max_steps,
        workers=args.workers, device=args.device)

    def report(r: dict) -> None:
        if args.json:
            _print_json(r)
        else:
            val = "" if r["val_recall"] is None else (f"  val recall@0.5 {100 * r['val_recall']:.1f}% (priors "
                                                      f"alone {100 * r['val_priors_recall']:.1f}%)")
            part = "" if r["complete"] else " (stopped at --max-steps)"
            print(f"epoch {r['epoch']}/{r['epochs']}  step {r['step']}  loss {r['train_loss']:.4f} (location "
                  f"{r['location']:.4f}, confidence {r['confidence']:.4f})  lr {r['lr']:.4g}  "
                  f"{r['images_per_s']:.0f} img/s{val}{part}")
        sys.stdout.flush()

    model = train_multibox(cfg, on_epoch=report)
    doc = {"bundle": args.out, "multibox": MULTIBOX_FILE, "config": model.config.to_dict(),
           "parameters": sum(p.numel() for p in model.parameters())}
    if args.json:
        _print_json(doc)
    else:
        c = doc["config"]
        print(f"wrote {os.path.join(args.out, MULTIBOX_FILE)}: K = {c['k']} boxes, {c['variant']} trunk width "
              f"{c['width']}, input {c['size']}x{c['size']}, grid {c['grid']}, {doc['parameters']:,} parameters")
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


# ---- ircnn proposals -------------------------------------------------------------------------------------


def _add_proposals_command(sub) -> None:
    p = sub.add_parser("proposals", help="region proposals: coarsened selective search + MultiBox, merged",
                       description="Proposals for images, or with --eval their coverage of a DET set's ground "
                       "truth per mode: selective search 1x, selective search at --coarsen, MultiBox only, merged.")
    p.add_argument("images", nargs="*", metavar="IMAGE", help="image files or directories (not with --eval)")
    p.add_argument("--model", help="bundle with a MultiBox network (default: torchvision's GoogLeNet, which has none)")
    p.add_argument("--selective-search", choices=("fast", "quality", "off"), default="fast")
    p.add_argument("--coarsen", type=float, default=2.0, help="Felzenszwalb k and min size multiplier (paper: 2)")
    p.add_argument("--multibox", default="auto",
                   help="MultiBox boxes to add: a number (the paper: 200; 0 = off) or auto (all of the bundle's "
                        "MultiBox boxes when it has a network, else none)")
    p.add_argument("--max-proposals", type=int, default=3000, help="cap on merged proposals per image")
    p.add_argument("--eval", action="store_true", help="coverage of --annotations/--imageset instead")
    p.add_argument("--annotations", metavar="DIR", help="Annotations/DET directory (with --eval)")
    p.add_argument("--imageset", metavar="FILE", help="ImageSets/DET/<set>.txt (with --eval)")
    p.add_argument("--data", metavar="DIR", help="Data/DET directory (default: beside --annotations)")
    p.add_argument("--limit", type=int, help="evaluate the first N images of the imageset only")
    p.add_argument("--plots", metavar="DIR", help="with --eval: write recall_vs_proposals.png into DIR")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_proposals)


def _multibox_count(args, multibox) -> int:
    if args.multibox == "auto":
        return multibox.config.k if multibox is not None else 0
    try:
        n = int(args.multibox)
    except ValueError:
        raise CliError(f"--multibox must be a number or auto, got {args.multibox!r}") from None
    if n < 0:
        raise CliError(f"--multibox must be >= 0, got {n}")
    if n and multibox is None:
        raise CliError("the model bundle has no MultiBox network: train one with `ircnn train multibox`, "
                       "pass --model with a bundle that has one, or use --multibox 0")
    if multibox is not None and n > multibox.config.k:
        raise CliError(f"--multibox {n} is more than the {multibox.config.k} boxes the network predicts")
    return n


def _load_multibox(args):
    if args.model is None or args.multibox == "0":
        return None
    from proposals.multibox import load_multibox

    return load_multibox(args.model)


class _TopMultiBox:
    """A MultiBox network whose proposals are cut to its n most confident boxes."""

    def __init__(self, net, n: int) -> None:
        self.net, self.n, self.config = net, n, net.config

    def propose(self, images):
        return [(b[: self.n], s[: self.n]) for b, s in self.net.propose(images)]


def _cmd_proposals(args) -> int:
    from proposals.combine import MergeConfig, ProposalGenerator
    from proposals.selective_search import SelectiveSearchConfig, SelectiveSearchRunner

    if not 0.25 <= args.coarsen <= 16:
        raise CliError(f"--coarsen must be in 0.25..16, got {args.coarsen}")
    merge_config = MergeConfig(max_proposals=args.max_proposals)
    net = _load_multibox(args)
    n_multibox = _multibox_count(args, net)
    multibox = _TopMultiBox(net, n_multibox) if n_multibox else None
    if args.selective_search == "off" and multibox is None:
        raise CliError("nothing to propose with: --selective-search off and no MultiBox boxes")
    ss_config = (None if args.selective_search == "off"
                 else SelectiveSearchConfig(mode=args.selective_search, coarsen=args.coarsen))
    if args.eval:
        return _proposals_eval(args, ss_config, multibox, merge_config)
    if not args.images:
        raise CliError("give images (or --eval with --annotations and --imageset)")
    from detector.image import ImageError, list_images, read_image

    runner = SelectiveSearchRunner(ss_config) if ss_config else None
    failed = 0
    try:
        generate = ProposalGenerator(runner, multibox, merge_config)
        for path in list_images(args.images):
            try:
                image = read_image(path)
                start = time.perf_counter()
                props, seconds = generate(image)
                elapsed = time.perf_counter() - start
            except (ImageError, ValueError) as e:
                failed += 1
                if args.json:
                    _print_json({"image": str(path), "error": str(e)})
                else:
                    print(f"{path}: error: {e}", file=sys.stderr)
                continue
            h, w = image.shape[:2]
            if args.json:
                _print_json({"image": str(path), "width": w, "height": h, "seconds": round(elapsed, 4),
                             "seconds_by_source": {k: round(v, 4) for k, v in seconds.items()},
                             "proposals": props.to_json()})
            else:
                from proposals.combine import MULTIBOX

                n_mb = int((props.source == MULTIBOX).sum())
                split = ", ".join(f"{k.replace('_', ' ')} {v:.2f} s" for k, v in seconds.items())
                print(f"{path} ({w}x{h}): {len(props)} proposals ({len(props) - n_mb} selective search, "
                      f"{n_mb} MultiBox) in {elapsed:.2f} s ({split})")
            sys.stdout.flush()
    finally:
        if runner is not None:
            runner.close()
    return 1 if failed else 0


def _proposals_eval(args, ss_config, multibox, merge_config) -> int:
    from pathlib import Path

    import torch

    from detector.image import read_image
    from eval.formats import read_annotations, read_imageset
    from proposals.combine import Proposals, merge
    from proposals.recall import CoverageEvaluator, plot_recall_curves
    from proposals.selective_search import SelectiveSearchRunner

    if args.images:
        raise CliError("--eval scores an imageset; give --annotations and --imageset instead of images")
    if not args.annotations or not args.imageset:
        raise CliError("--eval needs --annotations DIR and --imageset FILE")
    imageset = read_imageset(args.imageset)
    names = sorted(imageset, key=imageset.get)[: args.limit]
    annotations = read_annotations(args.annotations, {n: imageset[n] for n in names})
    data = Path(args.data) if args.data else Path(args.annotations).parent.parent / "Data" / "DET"
    if not data.is_dir():
        raise CliError(f"no image directory {data}; pass --data DIR (the Data/DET directory)")
    runners = {}
    if ss_config is not None:
        import dataclasses

        runners["SS 1x"] = SelectiveSearchRunner(dataclasses.replace(ss_config, coarsen=1.0))
        runners[f"SS {args.coarsen:g}x"] = SelectiveSearchRunner(ss_config)
    evaluator = CoverageEvaluator()
    try:
        for i, name in enumerate(names):
            files = sorted(data.glob(name + ".*"))
            if not files:
                raise CliError(f"image {name} of {args.imageset} not found under {data}")
            image = read_image(files[0])
            gt = torch.as_tensor(annotations[imageset[name]].boxes, dtype=torch.float32)
            parts, seconds = {}, {}
            for mode, runner in runners.items():
                start = time.perf_counter()
                parts[mode] = Proposals.from_selective_search(runner(image))
                seconds[mode] = time.perf_counter() - start
                evaluator.process(mode, parts[mode].boxes, gt, seconds[mode])
            merged_parts, merged_seconds = [], 0.0
            if multibox is not None:
                start = time.perf_counter()
                (boxes, scores), = multibox.propose([image])
                mb = Proposals.from_multibox(boxes, scores)
                merged_seconds += time.perf_counter() - start
                evaluator.process("MultiBox", mb.boxes, gt, merged_seconds)
                merged_parts.append(mb)
            if ss_config is not None:
                coarse = f"SS {args.coarsen:g}x"
                merged_parts.append(parts[coarse])
                merged_seconds += seconds[coarse]
            if len(merged_parts) == 2:
                start = time.perf_counter()
                merged = merge(merged_parts, merge_config)
                evaluator.process("merged", merged.boxes, gt, merged_seconds + time.perf_counter() - start)
            if sys.stderr.isatty():
                print(f"\r{i + 1}/{len(names)} images", end="", file=sys.stderr, flush=True)
    finally:
        for runner in runners.values():
            runner.close()
    if sys.stderr.isatty():
        print(file=sys.stderr)
    results = evaluator.evaluate()
    if args.plots:
        Path(args.plots).mkdir(parents=True, exist_ok=True)
        plot_recall_curves(results, str(Path(args.plots) / "recall_vs_proposals.png"))
    if args.json:
        _print_json({"images": len(names), "modes": results})
        return 0
    print(f"{'mode':<12}{'proposals/img':>14}{'coverage':>10}{'recall@0.7':>12}{'ABO':>8}{'s/img':>8}")
    for r in results:
        print(f"{r['mode']:<12}{r['proposals_per_image']:>14.1f}{r['coverage']:>10.3f}{r['recall_0.7']:>12.3f}"
              f"{r['abo']:>8.3f}{r['seconds_per_image']:>8.3f}")
    print(f"{len(names)} images, {results[0]['objects'] if results else 0} objects; coverage = objects with a "
          "proposal at IoU >= 0.5")
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
