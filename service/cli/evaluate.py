"""``ircnn eval cls|det``: classification top-1/top-5 error and ILSVRC detection mAP of prediction files."""

from __future__ import annotations

from service.cli.common import print_json


def add_parser(sub) -> None:
    ev = sub.add_parser("eval", help="score predictions")
    sub = ev.add_subparsers(dest="eval_command", required=True, metavar="WHAT")
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
        print_json(result.to_json())
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
        print_json({**result.to_json(), "predictions_format": predictions.format,
                     "failed_images": len(predictions.failed), "plots": plots})
        return 0
    in_map = [c for c in result.classes if c.ap is not None]
    without = [c for c in result.classes if c.ap is None]
    # the classes the mAP averages, one row each; those without positives (most, on a small set) as one line
    print(f"{'det_id':>6}  {'name':<24} {'AP':>6} {'positives':>9} {'detections':>10}")
    for c in in_map:
        print(f"{c.det_id:>6}  {c.name[:24]:<24} {c.ap:6.3f} {c.positives:>9} {c.detections:>10}")
    if without:
        print(f"({len(without)} classes with detections but no positives are not counted: "
              f"{sum(c.detections for c in without)} detections between them; --json lists them)")
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
    print(f"mAP          {result.map:.4f}  (mean AP over the {len(in_map)} classes with positives)")
    return 0
