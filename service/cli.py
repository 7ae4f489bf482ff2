"""The ``ircnn`` command line. Each command parses, validates and calls the same functions the service calls.

Human-readable text by default, one JSON document (or JSON lines) with ``--json``; errors go to stderr with a
non-zero exit code and a message that says what to do.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


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

    _add_classify_command(sub)
    return parser


# ---- ircnn model ... -------------------------------------------------------------------------------------


def _add_model_commands(sub) -> None:
    from detector.googlenet import VARIANTS

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
    pass


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
