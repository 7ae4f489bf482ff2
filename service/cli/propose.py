"""``ircnn proposals``: region proposals for images (coarsened selective search + MultiBox, merged), or with
``--eval`` their coverage of a DET set's ground truth."""

from __future__ import annotations

import dataclasses
import sys
import time

from service.cli.common import CliError, flag_error, given, print_json
from service.paths import check_paths


def add_parser(sub) -> None:
    p = sub.add_parser("proposals", help="region proposals: coarsened selective search + MultiBox, merged",
                       description="Proposals for images, or with --eval their coverage of a DET set's ground "
                       "truth per mode: selective search 1x, selective search at --coarsen, MultiBox only, merged.")
    p.add_argument("images", nargs="*", metavar="IMAGE", help="image files or directories (not with --eval)")
    p.add_argument("--model", help="bundle with a MultiBox network (default: torchvision's GoogLeNet, which has none)")
    p.add_argument("--selective-search", choices=("fast", "quality", "off"), default="fast")
    p.add_argument("--coarsen", type=float, help="Felzenszwalb k and min size multiplier (paper: 2)")
    p.add_argument("--multibox", default="auto",
                   help="MultiBox boxes to add: a number (the paper: 200; 0 = off) or auto (all of the bundle's "
                        "MultiBox boxes when it has a network, else none)")
    p.add_argument("--max-proposals", type=int, help="cap on merged proposals per image")
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
    from detector.bundle.multibox import load_multibox

    return load_multibox(args.model)


def proposal_config(args):
    """``ProposalConfig`` of the flags (MultiBox as the bundle allows, ``_proposal_sources``, comes later); a value
    out of range is the usage error of its flag."""
    from proposals.config import MergeConfig, ProposalConfig, SelectiveSearchConfig

    try:
        search = SelectiveSearchConfig(**given(mode=None if args.selective_search == "off" else args.selective_search,
                                               coarsen=args.coarsen))
        return ProposalConfig(selective_search=args.selective_search != "off", search=search,
                              merge=MergeConfig(**given(max_proposals=args.max_proposals)))
    except ValueError as e:
        raise flag_error(e, "coarsen") from None


def _cmd_proposals(args) -> int:
    config = proposal_config(args)
    if not args.eval and not args.images:
        raise CliError("give images (or --eval with --annotations and --imageset)")
    if args.model is None:  # without a bundle the flags alone decide what can propose
        _proposal_sources(args, None)
    if not args.eval:  # the paths, before any model or image is read
        check_paths(args.images)
    net = _load_multibox(args)
    n_multibox = _proposal_sources(args, net)
    config = dataclasses.replace(config, multibox=n_multibox > 0, multibox_top=n_multibox or None)
    if args.eval:
        return _proposals_eval(args, config, net)
    from detector.image import ImageError, list_images, read_image
    from proposals.combine import MULTIBOX, ProposalGenerator

    failed = 0
    with ProposalGenerator.from_config(config, net) as generate:
        for path in list_images(args.images):
            try:
                image = read_image(path)
                start = time.perf_counter()
                props, seconds = generate(image)
                elapsed = time.perf_counter() - start
            except (ImageError, ValueError) as e:
                failed += 1
                if args.json:
                    print_json({"image": str(path), "error": str(e)})
                else:
                    print(f"{path}: error: {e}", file=sys.stderr)
                continue
            h, w = image.shape[:2]
            if args.json:
                print_json({"image": str(path), "width": w, "height": h, "seconds": round(elapsed, 4),
                            "seconds_by_source": {k: round(v, 4) for k, v in seconds.items()},
                            "proposals": props.to_json()})
            else:
                n_mb = int((props.source == MULTIBOX).sum())
                split = ", ".join(f"{k.replace('_', ' ')} {v:.2f} s" for k, v in seconds.items())
                print(f"{path} ({w}x{h}): {len(props)} proposals ({len(props) - n_mb} selective search, "
                      f"{n_mb} MultiBox) in {elapsed:.2f} s ({split})")
            sys.stdout.flush()
    return 1 if failed else 0


def _proposals_eval(args, config, net) -> int:
    from pathlib import Path

    import torch

    from detector.image import read_image
    from detector.progress import track
    from eval.annotations import read_annotations, read_imageset
    from proposals.combine import ProposalGenerator, Proposals, merge
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
    coarse = f"SS {config.search.coarsen:g}x"
    # R-CNN's selective search (1x) beside the coarsened one the generator runs
    baseline = (SelectiveSearchRunner(dataclasses.replace(config.search, coarsen=1.0))
                if config.selective_search and coarse != "SS 1x" else None)
    evaluator = CoverageEvaluator()
    try:
        with ProposalGenerator.from_config(config, net) as generate:
            for i, name in enumerate(track(names, len(names), "proposals", "img", show=not args.json)):
                files = sorted(data.glob(name + ".*"))
                if not files:
                    raise CliError(f"image {name} of {args.imageset} not found under {data}")
                image = read_image(files[0])
                gt = torch.as_tensor(annotations[imageset[name]].boxes, dtype=torch.float32)
                if baseline is not None:
                    start = time.perf_counter()
                    boxes = Proposals.from_selective_search(baseline(image)).boxes
                    evaluator.process("SS 1x", boxes, gt, time.perf_counter() - start)
                parts, seconds = generate.parts(image)
                if "selective_search" in parts:
                    evaluator.process(coarse, parts["selective_search"].boxes, gt, seconds["selective_search"])
                if "multibox" in parts:
                    evaluator.process("MultiBox", parts["multibox"].boxes, gt, seconds["multibox"])
                if len(parts) == 2:
                    start = time.perf_counter()
                    merged = merge(list(parts.values()), config.merge)
                    evaluator.process("merged", merged.boxes, gt, sum(seconds.values()) + time.perf_counter() - start)
                if sys.stderr.isatty():
                    print(f"\r{i + 1}/{len(names)} images", end="", file=sys.stderr, flush=True)
    finally:
        if baseline is not None:
            baseline.close()
    if sys.stderr.isatty():
        print(file=sys.stderr)
    results = evaluator.evaluate()
    if args.plots:
        Path(args.plots).mkdir(parents=True, exist_ok=True)
        plot_recall_curves(results, str(Path(args.plots) / "recall_vs_proposals.png"))
    if args.json:
        print_json({"images": len(names), "modes": results})
        return 0
    print(f"{'mode':<12}{'proposals/img':>14}{'coverage':>10}{'recall@0.7':>12}{'ABO':>8}{'s/img':>8}")
    for r in results:
        print(f"{r['mode']:<12}{r['proposals_per_image']:>14.1f}{r['coverage']:>10.3f}{r['recall_0.7']:>12.3f}"
              f"{r['abo']:>8.3f}{r['seconds_per_image']:>8.3f}")
    print(f"{len(names)} images, {results[0]['objects'] if results else 0} objects; coverage = objects with a "
          "proposal at IoU >= 0.5")
    return 0
