"""``ircnn classify``: whole-image classification over the 1000 ILSVRC classes (section 7's multi-crop testing)."""

from __future__ import annotations

import sys

from detector.config import PRECISIONS
from service.cli.common import PRECISION_HELP, CliError, backend_choices, backend_help, print_json


def add_parser(sub) -> None:
    p = sub.add_parser("classify", help="whole-image classification over the 1000 ILSVRC classes")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files or directories (searched recursively)")
    p.add_argument("--model", help="bundle directory (default: torchvision's ImageNet GoogLeNet)")
    p.add_argument("--crops", type=int, choices=(1, 10, 144), default=1, help="test-time crops (section 7)")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32, help="crops per forward pass")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help=PRECISION_HELP)
    p.add_argument("--backend", choices=backend_choices(), default="auto", help=backend_help())
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--json", action="store_true", help="one JSON object per image, in input order")
    p.set_defaults(func=_cmd_classify)


def _cmd_classify(args) -> int:
    from detector.image import IMAGE_SUFFIXES, list_images
    from service.paths import check_paths

    if not 1 <= args.top_k <= 1000:
        raise CliError(f"--top-k must be in 1..1000, got {args.top_k}")
    check_paths(args.images)
    paths = list_images(args.images)
    if not paths:
        raise CliError(f"no images found in {' '.join(args.images)} (looked for {', '.join(IMAGE_SUFFIXES)})")
    # torch and the model only now, once the arguments are known to be usable
    from detector.bundle.importers import resolve_bundle
    from detector.pipeline.classify import Classifier
    from detector.pipeline.ensemble import EnsembleConfig

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
            print_json(result)
        elif "error" not in result:
            print(f"{result['image']} ({result['crops']} crops x {result['members']} members)")
            for t in result["top_k"]:
                print(f"  {t['prob']:7.4f}  {t['index']:4d}  {t['wnid']}  {t['name']}")
        sys.stdout.flush()
    return 1 if failed else 0
