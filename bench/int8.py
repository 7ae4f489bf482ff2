"""int8 members against fp32: accuracy on real warped regions, devkit mAP on the real photos and a proving ground,
and speed as a fraction of the machine's measured peaks and against plain eager torch.

    python bench/int8.py --model runs/lite0-det --calibration /tmp/synth --synth /tmp/synth --limit 24
    python bench/int8.py --model runs/gnet --speed-only

1. ``--calibration DIR`` (an ILSVRC-format set: its train split; or a directory of images) gives the calibration
   images; ``--regions`` (300) warped regions of them calibrate ``detector.runtimes.calibrate`` (written into the bundle's
   ``int8/``, as ``ircnn model quantize`` does). Calibrate on other images than those evaluated below.
2. Accuracy: the real photos' (``data/real_photos``) proposals, scored by the fp32 and the int8 ensemble
   (ONNX Runtime both): top-1 agreement over all regions and over those fp32 is at least 0.5 sure of, and
   probability differences; then each set's devkit mAP through ``Detector.score`` with the defaults, the same
   proposals for both precisions.
3. Speed (member 0, batch 32 of those regions): eager torch fp32 in the default layout (the plain torchvision
   baseline), ONNX Runtime fp32 and int8; FLOPs counted by ``torch.utils.flop_counter``; peaks: an fp32
   ``torch.mm`` and an int8 ``MatMulInteger`` in ONNX Runtime (2048 x 2048).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.utils.flop_counter

from detector.bundle.format import load_bundle
from detector.config import DetectConfig
from detector.image import read_image
from detector.nets.summary import format_machine, machine, matmul_peak
from detector.pipeline.detector import Detector
from detector.pipeline.ensemble import Ensemble, EnsembleConfig
from detector.runtimes.calibrate import calibration_regions, int8_agreement, quantize_bundle
from eval.annotations import read_annotations, read_blacklist, read_imageset
from eval.detections import DetectionTable
from eval.ilsvrc import DetectionEvaluator

REPO = Path(__file__).resolve().parent.parent
SUFFIXES = (".jpg", ".jpeg", ".png")


def calibration_images(root: Path, count: int) -> list[tuple[str, np.ndarray]]:
    train = root / "ImageSets" / "DET" / "train.txt"
    if train.is_file():
        files = [root / "Data" / "DET" / f"{stem}.JPEG" for stem in list(read_imageset(str(train)))[:count]]
    else:
        files = sorted(f for f in root.rglob("*") if f.suffix.lower() in SUFFIXES)[:count]
    return [(f.name, read_image(str(f))) for f in files]


def eval_sets(synth: str | None) -> dict[str, tuple[Path, Path, Path | None]]:
    real = REPO / "data" / "real_photos"
    sets = {"real": (real, real / "ImageSets" / "DET" / "val.txt", real / "blacklist.txt")}
    if synth:
        sets["synth"] = (Path(synth), Path(synth) / "ImageSets" / "DET" / "val.txt", None)
    return sets


def int8_peak(n: int = 2048, seconds: float = 2.0) -> float:
    """Best int8 ops/s (2 per multiply-add) of an n x n ``MatMulInteger`` (uint8 x int8 -> int32) in ONNX Runtime."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b"], ["c"])], "mm",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [n, n])],
        [helper.make_tensor_value_info("c", TensorProto.INT32, [n, n])],
        [helper.make_tensor("b", TensorProto.INT8, [n, n],
                            np.random.default_rng(0).integers(-128, 128, (n, n), dtype=np.int8).tobytes(), raw=True)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "mm.onnx")
        onnx.save(model, path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    a = np.random.default_rng(1).integers(0, 256, (n, n), dtype=np.uint8)
    session.run(None, {"a": a})
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        session.run(None, {"a": a})
        best = max(best, 2 * n**3 / (time.perf_counter() - t))
    return best


def images_per_s(run, x: torch.Tensor, seconds: float) -> float:
    run(x)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        run(x)
        n += len(x)
    return n / (time.perf_counter() - start)


def speed(bundle, regions: torch.Tensor, seconds: float) -> dict:
    member, pre = bundle.members[0], bundle.preprocess
    x = regions[:32].contiguous()
    with torch.utils.flop_counter.FlopCounterMode(display=False) as counter:
        member.eval()(torch.zeros(1, 3, pre.size, pre.size))
    flops = counter.get_total_flops()
    one = load_bundle(bundle.path)
    one.members = one.members[:1]
    eager = Ensemble(one.members, pre.mean, pre.std, EnsembleConfig(channels_last=False))
    fp32 = Ensemble.from_bundle(one, EnsembleConfig(backend="onnxruntime"))
    int8 = Ensemble(one.members, pre.mean, pre.std, EnsembleConfig(backend="onnxruntime", precision="int8"),
                    size=pre.size, int8_models=[Path(bundle.path) / "int8" / "member0.onnx"])
    peak32, peak8 = matmul_peak(torch.float32), int8_peak()
    rows = {}
    for name, ens in (("torch eager fp32", eager), ("onnxruntime fp32", fp32), ("onnxruntime int8", int8)):
        ips = images_per_s(ens, x, seconds)
        rows[name] = {"images_per_s": ips, "fraction_of_fp32_peak": ips * flops / peak32,
                      "fraction_of_int8_peak": ips * flops / peak8}
    base = rows["torch eager fp32"]["images_per_s"]
    for r in rows.values():
        r["vs_eager"] = r["images_per_s"] / base
    return {"flops_per_image": flops, "peak_fp32_gflops": peak32 / 1e9, "peak_int8_gops": peak8 / 1e9, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a bundle on disk (its int8/ is written)")
    ap.add_argument("--calibration", help="an ILSVRC-format set (its train split) or a directory of images")
    ap.add_argument("--calibration-images", type=int, default=20)
    ap.add_argument("--regions", type=int, default=300, help="calibration regions")
    ap.add_argument("--synth", help="an `ircnn data synth` set: its val split is the proving ground")
    ap.add_argument("--limit", type=int, default=None, help="images per evaluation set (default all)")
    ap.add_argument("--seconds", type=float, default=5.0, help="per speed measurement")
    ap.add_argument("--speed-only", action="store_true", help="no detection sets (e.g. random weights)")
    ap.add_argument("--no-speed", action="store_true", help="accuracy only (time the speed on an idle machine)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    bundle = load_bundle(args.model)
    doc = {"machine": machine(), "model": args.model, "members": len(bundle.members)}
    with Detector.from_bundle(bundle, DetectConfig(ensemble=EnsembleConfig(backend="onnxruntime"))) as fp32:
        cal_root = Path(args.calibration) if args.calibration else REPO / "data" / "real_photos"
        start = time.perf_counter()
        calibration = calibration_regions(bundle, calibration_images(cal_root, args.calibration_images),
                                          args.regions, fp32)
        quantize_bundle(bundle, calibration)
        doc["calibration"] = {"root": str(cal_root), "regions": len(calibration.regions),
                              "frames": calibration.frames, "seconds": time.perf_counter() - start}
        int8 = Detector.from_bundle(bundle, DetectConfig(ensemble=EnsembleConfig(backend="onnxruntime",
                                                                                 precision="int8")))
        int8.close()
        int8.proposals = fp32.proposals  # the same proposals (and the one selective search worker)
        sets, agreement, all_regions = {}, None, []
        for name, (root, imageset_file, blacklist_file) in ({} if args.speed_only else eval_sets(args.synth)).items():
            imageset = dict(list(read_imageset(str(imageset_file)).items())[: args.limit])
            found = {"fp32": [], "int8": []}
            p32, p8 = [], []
            for stem, index in imageset.items():
                image = read_image(str(root / "Data" / "DET" / f"{stem}.JPEG"))
                proposals = fp32.propose(image)
                boxes = fp32.regions(image, proposals)
                if name == "real":
                    p32.append(fp32.scorer.ensemble(_warp(fp32, image, boxes)).numpy())
                    p8.append(int8.scorer.ensemble(_warp(int8, image, boxes)).numpy())
                    all_regions.append(_warp(fp32, image, boxes[:64]))
                for precision, det in (("fp32", fp32), ("int8", int8)):
                    d = det.score(image, proposals)
                    found[precision].append(DetectionTable(np.full(len(d), index, np.int64),
                                                           d.det_ids.numpy().astype(np.int64),
                                                           d.scores.double().numpy(), d.boxes.double().numpy()))
            annotations = read_annotations(str(root / "Annotations" / "DET"), imageset)
            blacklist = read_blacklist(str(blacklist_file)) if blacklist_file else ()
            for precision, tables in found.items():
                evaluator = DetectionEvaluator(annotations, blacklist=blacklist)
                evaluator.process(DetectionTable.concat(tables))
                sets.setdefault(name, {})[precision] = evaluator.evaluate().map
            if p32:
                agreement = int8_agreement(np.concatenate(p32), np.concatenate(p8))
            if not args.json:  # as it comes: each set takes minutes
                print(f"  {name}: mAP fp32 {sets[name]['fp32']:.3f}, int8 {sets[name]['int8']:.3f}", flush=True)
        int8.proposals = None
        doc["map"], doc["agreement"] = sets, agreement
        regions = torch.cat(all_regions) if all_regions else torch.from_numpy(calibration.regions)
    doc["speed"] = None if args.no_speed else speed(bundle, regions, args.seconds)
    doc["machine_after"] = machine()
    if args.json:
        print(json.dumps(doc, indent=2))
        return
    print(format_machine(doc["machine"]))
    print(f"calibration: {doc['calibration']['regions']} regions ({doc['calibration']['frames']} frames) of "
          f"{doc['calibration']['root']}, {doc['calibration']['seconds']:.0f} s with quantisation")
    if agreement:
        print(f"real warped regions: top-1 agreement {agreement['top1_agreement']:.3f} over {agreement['regions']}, "
              f"{agreement['confident_top1_agreement']:.3f} over the {agreement['confident_regions']} fp32 is "
              f">= 0.5 sure of; mean |dp| {agreement['mean_abs_diff']:.2g}, max {agreement['max_abs_diff']:.2g}")
    for name, m in sets.items():
        print(f"{name}: mAP fp32 {m['fp32']:.3f}, int8 {m['int8']:.3f} ({100 * (m['int8'] - m['fp32']):+.1f} points)")
    s = doc["speed"]
    if s is None:
        return
    print(f"member 0, batch 32: {s['flops_per_image'] / 1e9:.2f} GFLOP/image; peaks fp32 {s['peak_fp32_gflops']:.0f} "
          f"GFLOP/s, int8 {s['peak_int8_gops']:.0f} GOP/s")
    for name, r in s["rows"].items():
        print(f"  {name:<18} {r['images_per_s']:7.1f} images/s  {r['vs_eager']:5.2f}x eager  "
              f"{100 * r['fraction_of_fp32_peak']:5.1f}% of fp32 peak  {100 * r['fraction_of_int8_peak']:5.1f}% of int8 peak")
    print(format_machine(doc["machine_after"]))


def _warp(detector: Detector, image: np.ndarray, boxes: torch.Tensor) -> torch.Tensor:
    from detector.pipeline.warp import warp_regions

    s = detector.scorer
    return warp_regions(image, boxes, s.size, s.context, s.fill)


if __name__ == "__main__":
    main()
