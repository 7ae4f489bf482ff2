"""``ircnn detect``: R-CNN detection over images and directories into jsonl, COCO or ILSVRC files, in this
process or on a Ray cluster (``service.batch``, ``service.ray_engine``)."""

from __future__ import annotations

import os
import sys

from detector.config import PRECISIONS
from service.cli.common import PRECISION_HELP, CliError, backend_choices, backend_help, count, flag_error, print_json

# Literals so that building the parser does not import torch; tests/service/cli/test_detect.py checks them against
# service.batch.FORMATS and detector.config.DetectConfig's defaults.
DETECT_FORMATS = ("jsonl", "coco", "ilsvrc")
DETECT_DEFAULTS = {"score_threshold": 0.01, "max_detections": 100, "nms_iou": 0.3, "max_regions": 3000,
                   "agreement": 1.0, "context_frames": 0}


def add_parser(sub) -> None:
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
                   help="prefer whole objects over their parts: each region's class score is weighed by how well its "
                        "box holds the area where the image's regions agree on the class, and detections inside a "
                        "larger, nearly as confident one of their class are dropped (auto: on for "
                        "det200-from-cls1000 bundles, whose ImageNet classifiers know no background; off for det200 "
                        "detectors trained with one)")
    p.add_argument("--agreement", type=float, default=DETECT_DEFAULTS["agreement"], metavar="P",
                   help=f"whole objects: the power of the agreement factor (default {DETECT_DEFAULTS['agreement']:g}; "
                        "0: off)")
    p.add_argument("--context-frames", type=int, default=DETECT_DEFAULTS["context_frames"], metavar="N",
                   help="whole objects: also score the N likeliest regions on their surrounding frame (the box "
                        "blanked) and keep p(box) * (1 - p(frame)); costs N extra regions per image (default 0: off; "
                        "300 was the default before agreement replaced it)")
    p.add_argument("--person-evidence", choices=("on", "off"), default="on",
                   help="det200-from-cls1000 bundles: count the ImageNet classes of clothing only people wear (suit, "
                        "jersey, military uniform, ...) for DET person, which ImageNet-1k barely has (default on)")
    p.add_argument("--image-context", choices=("on", "off"), default="off",
                   help="weigh each class by the whole image's probability of it, from the same networks over 10 "
                        "crops (the paper's Table 5 'contextual model'; default off)")
    p.add_argument("--selective-search", choices=("on", "off"), default="on")
    p.add_argument("--coarsen", type=float, help="superpixel size multiplier of selective search "
                   "(the paper: 2)")
    p.add_argument("--multibox", choices=("auto", "off"), default="auto",
                   help="auto: add the bundle's MultiBox boxes when it has a MultiBox network")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help=PRECISION_HELP)
    p.add_argument("--backend", choices=backend_choices(), default="auto", help=backend_help())
    p.add_argument("--max-regions", type=int, default=DETECT_DEFAULTS["max_regions"], metavar="N",
                   help=f"score the first N proposals per image, in the proposal generator's priority order "
                   f"(default {DETECT_DEFAULTS['max_regions']}, at most {DETECT_DEFAULTS['max_regions']}; the "
                   "service's IRCNN_MAX_REGIONS): the networks' time grows with N; fewer regions cost recall")
    p.add_argument("--cascade", type=int, metavar="K", help="member 0 scores every region, the other members only "
                   "its K least-background regions per image (default: every member scores every region)")
    p.add_argument("--scoring", choices=("warped", "shared-trunk"), default="warped",
                   help="warped (default, the paper's R-CNN): every region warped and scored by the whole networks; "
                   "shared-trunk (SPPnet / Fast R-CNN style, not the paper's method): each member's trunk runs once "
                   "per image at four scales and each region's features are pooled (RoIAlign) and scored by the "
                   "remaining layers: several times faster per image, a few mAP points lower "
                   "(the docs' benchmarks page has the figures); no --cascade")
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
    """The flag combinations that make no sense; the values themselves are checked by the configs."""
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


def detect_config(args):
    """``DetectConfig`` of the flags, made without loading torch; a value out of range is the usage error of its
    flag."""
    from detector.config import detect_config as make

    # Ray workers with a GPU run their networks there whatever --device says (the driver loads on the CPU)
    device = "cuda" if args.engine == "ray" and args.ray_gpus_per_worker else args.device
    try:
        return make(device=device, backend=args.backend, precision=args.precision, batch_size=args.batch_size,
                    scoring=args.scoring, selective_search=args.selective_search == "on", coarsen=args.coarsen,
                    multibox=args.multibox == "auto", score_threshold=args.score_threshold,
                    max_detections=args.max_detections, nms_iou=args.nms_iou, max_regions=args.max_regions,
                    cascade_top_k=args.cascade, whole_objects=args.whole_objects, agreement=args.agreement,
                    context_frames=args.context_frames, person_evidence=args.person_evidence == "on",
                    image_context=args.image_context == "on")
    except ValueError as e:
        raise flag_error(e, "score_threshold", "max_detections", "nms_iou", "coarsen", "batch_size",
                         "max_regions", "agreement", "context_frames") from None


def run_arguments(model: str | None, config) -> dict:
    """What decides a run's records, for ``--resume`` to compare: the bundle (its model.json's hash) and the
    detection settings (less those that change only speed: batch sizes, runtime)."""
    import dataclasses

    from detector.files import file_sha256

    manifest = os.path.join(model, "model.json") if model else None
    if manifest and os.path.isfile(manifest):
        identity = "model.json sha256 " + file_sha256(manifest)[:16]
    else:
        identity = "torchvision googlenet-1378be20.pth" if model is None else f"{model} (no model.json)"
    detect = dataclasses.asdict(config)
    detect.pop("warp_chunk", None)
    detect["ensemble"].pop("batch_size", None)
    detect["ensemble"].pop("channels_last", None)
    return {"model": identity, "detect": detect}


def model_files(model: str | None) -> list[str]:
    """The files of a bundle directory (none for torchvision's default checkpoint, found later)."""
    if model is None or not os.path.isdir(model):
        return []
    return [os.path.join(root, name) for root, _, names in os.walk(model) for name in names]


def _cmd_detect(args) -> int:
    config = detect_config(args)
    _check_detect_args(args)
    from service.paths import check_paths

    check_paths(args.paths)  # in a second, before torch and the model load
    from service.batch import BatchConfig, DetectorSpec, check_outputs, check_resume, input_files, run_batch

    try:
        batch = BatchConfig(out=args.out, format=args.format, resume=args.resume, retry_errors=args.retry_errors,
                            imageset=args.imageset, save_vis=args.save_vis, vis_threshold=args.vis_threshold,
                            progress=not (args.json and sys.stderr.isatty()), report_errors=not args.json)
    except ValueError as e:
        raise flag_error(e, "vis_threshold") from None
    reads = {"--model": model_files(args.model)}
    run = run_arguments(args.model, config)
    try:  # before the model loads: no output may be an input or a file the run reads, nor resume other arguments
        check_outputs(input_files(args.paths), batch, reads)
        check_resume(batch, run)
    except ValueError as e:
        raise CliError(str(e)) from None
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

    built = []

    def make_detector():
        built.append(spec.build(bundle))
        return built[-1]

    try:
        summary = run_batch(make_detector, args.paths, batch, engine=engine, reads=reads, run=run)
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
    networks = built[0].runtimes() if built else None
    if args.json:
        if args.out:
            print_json({**summary.to_json(), "networks": networks})
        return 1 if failed else 0
    doc = summary.to_json()
    to = sys.stdout if args.out else sys.stderr
    rate = f", {doc['images_per_s']:.3g} images/s" if doc["images_per_s"] else ""
    print(f"detected {count(summary.detected, 'image')} in {summary.seconds:.1f} s{rate}: "
          f"{count(summary.detections, 'detection')}, {summary.failed} failed", file=to)
    if summary.skipped:
        print(f"skipped {count(summary.skipped, 'image')} already in the output ({summary.failed_before} of them "
              "failed)", file=to)
    if summary.retried:
        print(f"retried {count(summary.retried, 'image')} that had failed before (--retry-errors)", file=to)
    if doc["seconds_per_image_by_stage"]:
        print("seconds per image: " + ", ".join(f"{k} {v:.3f}" for k, v in doc["seconds_per_image_by_stage"].items())
              + " (decode and proposals overlap the networks)", file=to)
    if networks:  # what ran, per member (auto's choice, or what was asked); Ray workers choose on their own nodes
        print("networks: " + ", ".join(f"member {i} {name}" for i, name in enumerate(networks)), file=to)
    if doc["regions_per_s_networks"]:
        print(f"regions: {doc['regions_per_image']:g} per image, {doc['regions_per_s_networks']:g}/s through the "
              "networks", file=to)
    if args.out:
        extra = "" if args.format == "jsonl" else f", image ids in {doc['images_file']}; journal {doc['journal']}"
        print(f"wrote {args.out} ({args.format}){extra}", file=to)
    if summary.vis is not None:
        v = summary.vis
        print(f"drew {count(v['boxes'], 'box', 'boxes')} (score >= {v['threshold']:g}) on "
              f"{count(v['pictures'], 'picture')} in {v['dir']}", file=to)
    return 1 if failed else 0
