"""``ircnn train classifier|detector|multibox``: the paper's training recipes, into model bundles."""

from __future__ import annotations

import os
import sys

from detector.cpus import default_workers
from service.cli.common import VARIANTS, CliError, given, print_bundle, print_json


def add_parser(sub) -> None:
    train = sub.add_parser("train", help="train classifiers, R-CNN detectors and MultiBox")
    sub = train.add_subparsers(dest="train_command", required=True, metavar="WHAT")
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
    add_network_flags(p, "network")
    p.add_argument("--members", type=int, default=1, help="ensemble members, member i with seed + i")
    p.add_argument("--init", metavar="BUNDLE", help="start every member from this bundle's weights and arch")
    p.add_argument("--max-steps", type=int, default=0, help="stop each member after N steps (0: no limit)")
    add_run_flags(p, checkpoint_dir=".checkpoint", checkpoint_every=2000, max_workers=4,
                  workers="data loading processes per training process")
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
    add_det_data_flags(p, "an existing model bundle")
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
    add_network_flags(p, "trunk")
    p.add_argument("--grid", type=int, default=1, help="5b features pooled to GRID x GRID before the heads "
                   "(default 1: global average pool)")
    p.add_argument("--init", metavar="BUNDLE", help="classifier bundle whose member 0 starts the trunk (its "
                   "variant, width and input normalisation are used)")
    p.add_argument("--max-steps", type=int, default=0, help="stop after N steps (0: no limit)")
    add_run_flags(p, checkpoint_dir=".multibox-checkpoint", checkpoint_every=2000, max_workers=4,
                  workers="data loading processes")
    p.add_argument("--json", action="store_true", help="one JSON line per epoch, then a summary document")
    p.set_defaults(func=_cmd_train_multibox)

    p = sub.add_parser("detector", help="fine-tune region classifiers with R-CNN's sampling (section 8)",
                       description="Train an ensemble of region classifiers (GoogLeNet, or the members of a --from bundle, "
                       "EfficientNet-Lite included) on ILSVRC-format data "
                       "(ROOT/Data/DET, Annotations/DET, ImageSets/DET/train.txt). Head: background + the DET "
                       "classes present in the training annotations. Proposals (2x coarsened selective search, plus "
                       "MultiBox with --multibox-from) are computed once per image and cached; a proposal with IoU "
                       ">= 0.5 to a ground-truth box takes its class, the rest are background, ground-truth boxes "
                       "are positives too; batches of 128 warped windows, 32 of them foreground; SGD momentum 0.9; "
                       "the bundle gets the Polyak-averaged weights. Members differ in seed, context, flips and "
                       "background range (written into the bundle's provenance). Ctrl-C leaves a checkpoint that "
                       "--resume continues. Runs under `torchrun --nproc_per_node=N` too.")
    add_det_data_flags(p, "bundle directory to write (task det200)")
    p.add_argument("--from", dest="init", metavar="BUNDLE", help="classifier bundle whose weights start every "
                   "member (trunk copied, new head); default: random weights")
    p.add_argument("--members", type=int, default=6, help="ensemble members (default 6, the paper's)")
    add_network_flags(p, "network", "; the context (16 px at 224) scales with it")
    p.add_argument("--no-aux-heads", action="store_true", help="a new network without the auxiliary heads")
    p.add_argument("--epochs", type=int, default=10, help="passes over the foreground windows (default 10)")
    p.add_argument("--iterations", type=int, default=0, metavar="STEPS",
                   help="steps per member, overriding --epochs (default 0: use --epochs)")
    p.add_argument("--max-minutes", type=float, default=0.0, help="stop each member after this many minutes of "
                   "training (default 0: no limit)")
    p.add_argument("--batch", type=int, default=128, help="windows per step (default 128, R-CNN's)")
    p.add_argument("--fg-per-batch", type=int, default=32, help="foreground windows per step (default 32)")
    p.add_argument("--lr", type=float, help="learning rate (default 0.001 with --from, 0.01 from random weights)")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="on weights, not biases (default 5e-4)")
    p.add_argument("--same-sampling", action="store_true", help="every member samples as member 0 (only the "
                   "seed differs)")
    p.add_argument("--coarsen", type=float, help="selective search superpixel factor (default 2.0)")
    p.add_argument("--selective-search-width", type=int, default=500, metavar="PX",
                   help="selective search segments images resized to this width (default 500, R-CNN's)")
    p.add_argument("--no-selective-search", action="store_true", help="MultiBox proposals only")
    p.add_argument("--multibox-from", metavar="BUNDLE", help="add this bundle's MultiBox boxes to the proposals "
                   "(the network is copied into the new bundle)")
    p.add_argument("--max-proposals", type=int, help="per image, after merging (default 3000)")
    p.add_argument("--proposals-cache", metavar="DIR", help="default BUNDLE_DIR/.proposals")
    add_run_flags(p, checkpoint_dir=".detector-checkpoint", checkpoint_every=200, max_workers=2,
                  workers="window loading processes", seed="member i uses seed + i (default 0)")
    p.add_argument("--json", action="store_true", help="JSON lines: the proposal summary, one per epoch, then "
                   "the bundle's description")
    p.set_defaults(func=_cmd_train_detector)


def add_network_flags(p, what: str, size_note: str = "") -> None:
    """A new GoogLeNet's shape: --variant, --width and the input --size."""
    p.add_argument("--variant", choices=VARIANTS, help=f"a new {what}'s GoogLeNet variant (default paper)")
    p.add_argument("--width", type=float, help=f"a new {what}'s channel multiplier (default 1.0)")
    p.add_argument("--size", type=int, default=224, help=f"network input side (default 224){size_note}")


def add_det_data_flags(p, out: str) -> None:
    """ILSVRC-format training data (--data ROOT, --imageset) and the bundle the command writes (--out)."""
    p.add_argument("--data", required=True, metavar="ROOT", help="ILSVRC-format root (e.g. `ircnn data synth`)")
    p.add_argument("--out", required=True, metavar="BUNDLE_DIR", help=out)
    p.add_argument("--imageset", default="ImageSets/DET/train.txt", metavar="FILE",
                   help="training images, relative to ROOT (default ImageSets/DET/train.txt)")


def add_run_flags(p, *, checkpoint_dir: str, checkpoint_every: int, max_workers: int, workers: str,
                  seed: str | None = None) -> None:
    """The flags of ``RunConfig`` that every ``ircnn train`` command has (read back by ``_run_config``)."""
    p.add_argument("--seed", type=int, default=0, help=seed)
    p.add_argument("--ema-decay", type=float, default=0.999, help="Polyak averaging decay (default 0.999)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint, if there is one")
    p.add_argument("--checkpoint-dir", metavar="DIR", help=f"default BUNDLE_DIR/{checkpoint_dir}")
    p.add_argument("--checkpoint-every", type=int, default=checkpoint_every, metavar="STEPS",
                   help=f"mid-epoch checkpoint interval (0: epoch ends only; default {checkpoint_every})")
    p.add_argument("--workers", type=int, default=default_workers(max_workers),
                   help=f"{workers} (default: one per core, at most {max_workers}: {default_workers(max_workers)} "
                   f"here)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")


def _run_config(args, **limits):
    """The run settings that every `ircnn train` command has flags for, and ``limits`` (max_steps, max_minutes)."""
    from detector.training.engine import RunConfig

    return RunConfig(seed=args.seed, device=args.device, workers=args.workers, ema_decay=args.ema_decay,
                     resume=args.resume, checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every,
                     **limits)


def _cmd_train_classifier(args) -> int:
    if args.init and (args.variant is not None or args.width is not None):
        raise CliError("--variant and --width describe a new network; with --init the bundle's architecture is "
                       "used, so drop them")
    from detector.training.classifier import ClassifierTrainConfig, train_classifier

    cfg = ClassifierTrainConfig(
        data=args.data, out=args.out, val=args.val, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, variant=args.variant or "paper",
        width=1.0 if args.width is None else args.width, size=args.size, members=args.members, init=args.init,
        run=_run_config(args, max_steps=args.max_steps))

    def report(r: dict) -> None:
        if args.json:
            print_json(r)
        else:
            val = "" if r["val_top1"] is None else f"  val top-1 {100 * r['val_top1']:.2f}%"
            part = "" if r["complete"] else " (stopped at --max-steps)"
            print(f"member {r['member']} epoch {r['epoch']}/{r['epochs']}  step {r['step']}  train loss "
                  f"{r['train_loss']:.4f}  lr {r['lr']:.4g}  {r['images_per_s']:.0f} img/s{val}{part}")
        sys.stdout.flush()

    bundle = train_classifier(cfg, on_epoch=report)
    if bundle is not None:  # rank 0
        print_bundle(bundle, args.json)
    return 0


def _cmd_train_detector(args) -> int:
    if args.init and (args.variant is not None or args.width is not None or args.no_aux_heads):
        raise CliError("--variant, --width and --no-aux-heads describe a new network; with --from the bundle's "
                       "architecture is used, so drop them")
    from detector.training.detector import DetectorTrainConfig, train_detector

    cfg = DetectorTrainConfig(
        data=args.data, out=args.out, imageset=args.imageset, init=args.init, members=args.members,
        variant=args.variant or "paper", width=1.0 if args.width is None else args.width,
        aux_logits=not args.no_aux_heads, size=args.size, epochs=args.epochs, iterations=args.iterations,
        batch_size=args.batch, fg_per_batch=args.fg_per_batch, lr=args.lr, weight_decay=args.weight_decay,
        vary_members=not args.same_sampling, selective_search=not args.no_selective_search,
        selective_search_width=args.selective_search_width, multibox_from=args.multibox_from,
        proposals_cache=args.proposals_cache, run=_run_config(args, max_minutes=args.max_minutes),
        **given(coarsen=args.coarsen, max_proposals=args.max_proposals))

    def proposals(s: dict) -> None:
        if args.json:
            print_json({"proposals": s})
        else:
            print(f"proposals: {s['images']} images ({s['cached']} cached, {s['computed']} computed"
                  f"{', %d unreadable files redone' % s['repaired'] if s['repaired'] else ''}) in "
                  f"{s['seconds']:.1f} s, {s['proposals_per_image']:.0f} per image, recall@0.5 of the "
                  f"{s['objects']} objects {100 * s['recall']:.1f}%; {s['foreground']} foreground and "
                  f"{s['background']} background windows, {s['classes']} classes")
        sys.stdout.flush()

    def report(r: dict) -> None:
        if args.json:
            print_json(r)
        else:
            part = "" if r["complete"] else " (partial epoch)"
            print(f"member {r['member']} epoch {r['epoch']}/{r['epochs']}  step {r['step']}/{r['steps']}  loss "
                  f"{r['train_loss']:.4f}  fg acc {100 * r['fg_accuracy']:.1f}%  bg acc "
                  f"{100 * r['bg_accuracy']:.1f}%  lr {r['lr']:.4g}  {r['regions_per_s']:.0f} regions/s{part}")
        sys.stdout.flush()

    bundle = train_detector(cfg, on_epoch=report, on_proposals=proposals)
    if bundle is not None:  # rank 0
        print_bundle(bundle, args.json)
    return 0


def _cmd_train_multibox(args) -> int:
    if args.init and (args.variant is not None or args.width is not None):
        raise CliError("--variant and --width describe a new trunk; with --init the bundle's architecture is "
                       "used, so drop them")
    from detector.bundle.multibox import MULTIBOX_FILE
    from detector.training.multibox import MultiBoxTrainConfig, train_multibox

    cfg = MultiBoxTrainConfig(
        data=args.data, out=args.out, imageset=args.imageset, val_imageset=args.val_imageset, k=args.k,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        alpha=args.alpha, match=args.match, variant=args.variant or "paper",
        width=1.0 if args.width is None else args.width, size=args.size, grid=args.grid, init=args.init,
        run=_run_config(args, max_steps=args.max_steps))

    def report(r: dict) -> None:
        if args.json:
            print_json(r)
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
        print_json(doc)
    else:
        c = doc["config"]
        print(f"wrote {os.path.join(args.out, MULTIBOX_FILE)}: K = {c['k']} boxes, {c['variant']} trunk width "
              f"{c['width']}, input {c['size']}x{c['size']}, grid {c['grid']}, {doc['parameters']:,} parameters")
    return 0
