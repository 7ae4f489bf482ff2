import json
import os
from collections import defaultdict

import numpy as np
import pytest

from eval.annotations import ImageAnnotation, write_annotation, write_imageset
from eval.coco import write_coco_results
from eval.detections import DetectionTable
from eval.ilsvrc import (
    DetectionEvaluator,
    GroundTruth,
    coco_ap,
    devkit_boxes,
    devkit_iou,
    devkit_thresholds,
    score,
    voc07_ap,
    voc_ap,
)
from eval.submission import write_submission
from service.cli import main

A, B = 1, 2  # DET ids: accordion, airplane


def box(xmin, ymin, xmax, ymax):
    """A devkit inclusive box as the project's x1, y1, x2, y2."""
    return [xmin, ymin, xmax + 1, ymax + 1]


def ann(*objects, name="img"):
    """ImageAnnotation from (det_id, devkit box) pairs."""
    boxes = np.array([box(*b) for _, b in objects], dtype=np.float64).reshape(-1, 4)
    return ImageAnnotation(name, 500, 500, boxes, np.array([c for c, _ in objects], dtype=np.int64))


def dets(*rows):
    """Detections from (image, det_id, score, devkit box) rows, in file order."""
    if not rows:
        return DetectionTable.empty()
    image, det_id, conf, boxes = zip(*rows)
    return DetectionTable(np.array(image), np.array(det_id), np.array(conf, dtype=np.float64),
                          np.array([box(*b) for b in boxes], dtype=np.float64))


def aps(result):
    return {c.det_id: c.ap for c in result.classes}


# ---- thresholds and IoU ----------------------------------------------------------------------------------


def test_small_object_threshold_hand_computed():
    # Devkit boxes 0..9 x 0..9: w = h = 9 - 0 + 1 = 10, thr = 100 / (20 * 20) = 0.25.
    gt = devkit_boxes(np.array([box(0, 0, 9, 9), box(0, 0, 19, 14), box(0, 0, 99, 99), box(5, 5, 5, 5)]))
    expected = [100 / 400, 20 * 15 / (30 * 25), 0.5, 1 / 121]  # 100 x 100 gives 10000/12100 > 0.5 -> 0.5
    assert expected[1] == 0.4
    assert devkit_thresholds(gt).tolist() == expected


def test_devkit_iou_uses_plus_one_widths():
    det = devkit_boxes(np.array([box(0, 0, 9, 32), box(0, 0, 9, 39), box(10, 0, 19, 9), box(9, 9, 20, 20)]))
    gt = devkit_boxes(np.array([box(0, 0, 9, 9)] * 4))
    # 10x33 over 10x10: 100 / 330; 10x40: 100 / 400; touching at x = 10: no overlap; one shared pixel: 1 / 243.
    assert devkit_iou(det, gt).tolist() == [100 / 330, 100 / 400, 0.0, 1 / (100 + 144 - 1)]


def test_small_object_rule_makes_ilsvrc_and_iou50_differ():
    gt = GroundTruth.from_annotations({1: ann((A, (0, 0, 9, 9)))})
    at_025 = dets((1, A, 0.9, (0, 0, 9, 39)))  # IoU exactly 0.25 = the threshold: a hit (>=)
    at_030 = dets((1, A, 0.9, (0, 0, 9, 32)))  # IoU 0.303
    below = dets((1, A, 0.9, (0, 0, 9, 40)))  # IoU 100 / 410 < 0.25
    assert aps(score(gt, at_025, "ilsvrc")) == {A: 1.0}
    assert aps(score(gt, at_030, "ilsvrc")) == {A: 1.0}
    assert aps(score(gt, at_030, "iou50")) == {A: 0.0}
    assert aps(score(gt, below, "ilsvrc")) == {A: 0.0}


def test_ilsvrc_and_iou50_agree_on_large_objects():
    gt = GroundTruth.from_annotations({1: ann((A, (0, 0, 99, 99)), (A, (200, 200, 299, 299)))})
    # IoU 0.6 on the first object (hit in both), IoU 0.45 on the second (a miss in both).
    d = dets((1, A, 0.9, (0, 0, 99, 59)), (1, A, 0.8, (200, 200, 299, 244)))
    assert score(gt, d, "ilsvrc").map == score(gt, d, "iou50").map == 0.5  # rec [.5, .5], prec [1, .5]


# ---- matching rules --------------------------------------------------------------------------------------


def test_duplicate_detection_is_a_false_positive():
    gt = GroundTruth.from_annotations({1: ann((A, (0, 0, 99, 99)), (A, (300, 300, 399, 399)))})
    d = dets((1, A, 0.9, (0, 0, 99, 99)), (1, A, 0.8, (2, 2, 99, 99)), (1, A, 0.7, (300, 300, 399, 399)))
    # TP, FP (its only object is taken), TP: recall .5 .5 1, precision 1 .5 2/3 -> AP .5 * 1 + .5 * 2/3 = 5/6.
    result = score(gt, d)
    assert result.map == pytest.approx(5 / 6, abs=1e-15)
    assert result.classes[0].precision.tolist() == [1.0, 0.5, 2 / 3]


def test_devkit_takes_the_next_free_object_where_voc07_counts_a_duplicate():
    # Objects 0..99 and 40..139 (x); the second detection (15..114) overlaps the taken first object best
    # (85 / 115) and the second object at 75 / 125: the devkit skips detected objects, VOC 2007 only looks at the
    # best one.
    gt = GroundTruth.from_annotations({1: ann((A, (0, 0, 99, 99)), (A, (40, 0, 139, 99)))})
    d = dets((1, A, 0.9, (0, 0, 99, 99)), (1, A, 0.8, (15, 0, 114, 99)))
    assert devkit_iou(devkit_boxes(d.boxes[[1, 1]]), devkit_boxes(gt.boxes)).tolist() == [85 / 115, 75 / 125]
    assert score(gt, d, "ilsvrc").map == 1.0
    assert score(gt, d, "voc07").map == pytest.approx(6 / 11)  # rec [.5, .5]: max prec 1 for t <= .5


def test_equal_iou_goes_to_the_earlier_object():
    gt = GroundTruth.from_annotations({1: ann((A, (0, 0, 99, 99)), (A, (50, 0, 149, 99)))})
    # The first detection overlaps both objects at 0.6; taking the first leaves the second for the next one.
    d = dets((1, A, 0.9, (25, 0, 124, 99)), (1, A, 0.8, (50, 0, 149, 99)))
    assert score(gt, d).map == 1.0


def test_blacklisted_pair_is_removed_from_detections_and_positives():
    annotations = {1: ann((A, (0, 0, 99, 99))), 2: ann((A, (0, 0, 99, 99)), (B, (0, 0, 99, 99)))}
    d = dets((1, A, 0.95, (300, 300, 399, 399)), (2, A, 0.9, (0, 0, 99, 99)), (2, B, 0.5, (0, 0, 99, 99)))
    plain = score(GroundTruth.from_annotations(annotations), d)
    assert aps(plain)[A] == 0.25  # FP then TP of 2 positives: .5 recall at precision .5
    assert aps(plain)[B] == 1.0
    black = score(GroundTruth.from_annotations(annotations), d, blacklist={(1, A)})
    by_id = {c.det_id: c for c in black.classes}
    assert (by_id[A].ap, by_id[A].positives, by_id[A].detections) == (1.0, 1, 1)
    assert by_id[B].ap == 1.0 and black.blacklisted == 1 and black.map == 1.0


def test_image_without_objects_only_gives_false_positives():
    annotations = {1: ann((A, (0, 0, 99, 99))), 2: ann()}
    d = dets((2, A, 0.95, (0, 0, 99, 99)), (1, A, 0.9, (0, 0, 99, 99)))
    assert score(GroundTruth.from_annotations(annotations), d).map == 0.5  # prec [0, .5], rec [0, 1]


def test_class_without_positives_has_no_ap_and_is_left_out_of_the_map():
    annotations = {1: ann((A, (0, 0, 99, 99)))}
    d = dets((1, A, 0.9, (0, 0, 99, 99)), (1, B, 0.8, (0, 0, 99, 99)))
    for mode in ("ilsvrc", "iou50", "voc07", "coco50"):
        result = score(GroundTruth.from_annotations(annotations), d, mode)
        by_id = {c.det_id: c for c in result.classes}
        assert by_id[B].ap is None and by_id[B].positives == 0 and by_id[B].detections == 1
        assert result.map == pytest.approx(1.0, abs=1e-12)
        assert result.to_json()["classes"][1]["ap"] is None
    with pytest.raises(ValueError, match="no ground-truth objects"):
        score(GroundTruth.from_annotations({1: ann()}), d)


def test_class_with_positives_but_no_detections_scores_zero():
    annotations = {1: ann((A, (0, 0, 99, 99)), (B, (0, 0, 99, 99)))}
    result = score(GroundTruth.from_annotations(annotations), dets((1, A, 0.9, (0, 0, 99, 99))))
    assert aps(result) == {A: 1.0, B: 0.0} and result.map == 0.5


def test_ties_in_score_are_ordered_by_image_then_file_order():
    annotations = {1: ann((A, (0, 0, 99, 99))), 2: ann()}
    # Same score; the FP (image 2) comes first in the file, but the devkit orders ties by image index: TP first.
    d = dets((2, A, 0.5, (0, 0, 99, 99)), (1, A, 0.5, (0, 0, 99, 99)))
    assert score(GroundTruth.from_annotations(annotations), d).map == 1.0
    # Within one image, file order: the first of two equal-score detections takes the object.
    annotations = {1: ann((A, (0, 0, 99, 99)), (A, (200, 0, 299, 99)))}
    d = dets((1, A, 0.5, (300, 300, 399, 399)), (1, A, 0.5, (0, 0, 99, 99)))
    assert score(GroundTruth.from_annotations(annotations), d).classes[0].precision.tolist() == [0.0, 0.5]


def test_detections_outside_the_imageset_are_not_scored():
    annotations = {1: ann((A, (0, 0, 99, 99)))}
    result = score(GroundTruth.from_annotations(annotations),
                   dets((7, A, 0.99, (0, 0, 99, 99)), (1, A, 0.9, (0, 0, 99, 99))))
    assert result.map == 1.0 and result.unscored == 1


def test_inputs_not_mutated_and_accumulator_matches_one_call():
    annotations = {1: ann((A, (0, 0, 99, 99)), (B, (0, 0, 9, 9))), 2: ann((A, (50, 50, 80, 80)))}
    d = dets((1, A, 0.9, (0, 0, 99, 99)), (2, A, 0.8, (50, 50, 70, 80)), (1, B, 0.7, (0, 0, 12, 12)),
             (2, A, 0.8, (0, 0, 5, 5)))
    before = [a.copy() for a in (d.image, d.det_id, d.score, d.boxes)]
    gt_before = annotations[1].boxes.copy()
    whole = score(GroundTruth.from_annotations(annotations), d)
    assert all((x == y).all() for x, y in zip(before, (d.image, d.det_id, d.score, d.boxes)))
    assert (annotations[1].boxes == gt_before).all()
    evaluator = DetectionEvaluator(annotations)
    evaluator.process(DetectionTable(d.image[:2], d.det_id[:2], d.score[:2], d.boxes[:2]))
    evaluator.process(DetectionTable(d.image[2:], d.det_id[2:], d.score[2:], d.boxes[2:]))
    assert evaluator.evaluate().map == whole.map
    evaluator.reset()
    assert evaluator.evaluate().map == 0.0


# ---- AP ------------------------------------------------------------------------------------------------


def test_ap_formulas_on_a_hand_made_pr_sequence():
    rec = np.array([0.2, 0.4, 0.4, 0.6, 0.8])
    prec = np.array([1.0, 0.5, 2 / 3, 0.75, 0.4])
    # VOCap: precision from the right [1, 1, .75, .75, .75, .4, 0] over mrec [0, .2, .4, .4, .6, .8, 1]:
    # .2 * 1 + .2 * .75 + .2 * .75 + .2 * .4 + .2 * 0.
    assert voc_ap(rec, prec) == pytest.approx(0.58, abs=1e-15)
    # 11-point: t = 0, .1, .2 -> 1; .3, .4 -> .75; .5, .6 -> .75; .7, .8 -> .4; .9, 1 -> 0.
    assert voc07_ap(rec, prec) == pytest.approx(6.8 / 11, abs=1e-15)
    # 101-point: recall thresholds 0..0.2 -> 1 (21), 0.21..0.6 -> .75 (40), 0.61..0.8 -> .4 (20), rest 0.
    assert coco_ap(rec, prec) == pytest.approx((21 + 40 * 0.75 + 20 * 0.4) / 101, abs=1e-15)
    assert voc_ap(np.zeros(0), np.zeros(0)) == voc07_ap(np.zeros(0), np.zeros(0)) == coco_ap(np.zeros(0), np.zeros(0))


def test_voc07_counts_a_recall_of_exactly_three_tenths():
    rec = np.array([0.1, 0.2, 0.3])  # 0.1 + 0.2 != 0.3 in floating point, 3 / 10 == 0.3
    assert voc07_ap(np.array([1, 2, 3]) / 10, np.ones(3)) == pytest.approx(4 / 11)
    assert rec[2] == 3 / 10


# ---- against a literal port of the devkit loops ----------------------------------------------------------


def devkit_reference(annotations, d, blacklist=(), fixed_thr=None):
    """eval_detection.m transcribed loop by loop (including blacklisted detections kept as tp = fp = 0 and
    MATLAB's NaN-ignoring max in VOCap), for the random comparison below. Returns {class: AP} for classes with
    positives."""
    num_pos = defaultdict(int)
    for a in annotations.values():
        for c in a.det_ids.tolist():
            num_pos[c] += 1
    order = sorted(range(len(d)), key=lambda i: d.image[i])  # [img_ids ind] = sort(img_ids), stable
    per_image = defaultdict(list)
    for i in order:
        per_image[int(d.image[i])].append(i)
    for i in per_image:
        per_image[i].sort(key=lambda j: -d.score[j])  # sort(obj_confs, 'descend'), stable
    tp_cell, fp_cell = {}, {}
    for image in annotations:
        a = annotations[image]
        gt = devkit_boxes(a.boxes)
        thr = np.full(len(gt), 0.5) if fixed_thr else devkit_thresholds(gt)
        detected = [False] * len(gt)
        black = {c for (i, c) in blacklist if i == image}
        tp, fp = [], []
        for j in per_image.get(image, []):
            if d.det_id[j] in black:
                tp.append(0), fp.append(0)
                continue
            bb = devkit_boxes(d.boxes[j:j + 1])
            ovmax, kmax = -np.inf, -1
            for k in range(len(gt)):
                if d.det_id[j] != a.det_ids[k] or detected[k]:
                    continue
                ov = devkit_iou(bb, gt[k:k + 1])[0]
                if ov > 0 and ov >= thr[k] and ov > ovmax:
                    ovmax, kmax = ov, k
            if kmax >= 0:
                detected[kmax] = True
            tp.append(int(kmax >= 0)), fp.append(int(kmax < 0))
        tp_cell[image], fp_cell[image] = tp, fp
        for c in a.det_ids.tolist():
            if c in black:
                num_pos[c] -= 1
    ids = [j for image in sorted(per_image) for j in per_image[image]]
    tps = [t for image in sorted(per_image) for t in tp_cell[image]]
    fps = [f for image in sorted(per_image) for f in fp_cell[image]]
    glob = sorted(range(len(ids)), key=lambda k: -d.score[ids[k]])  # sort(confs, 'descend'), stable
    result = {}
    for c, n in num_pos.items():
        if n <= 0:
            continue
        sel = [k for k in glob if d.det_id[ids[k]] == c]
        tp = np.cumsum([tps[k] for k in sel], dtype=float)
        fp = np.cumsum([fps[k] for k in sel], dtype=float)
        with np.errstate(invalid="ignore"):
            rec, prec = tp / n, tp / (fp + tp)
        mrec = np.concatenate(([0.0], rec, [1.0]))
        mpre = np.concatenate(([0.0], prec, [0.0]))
        for i in range(len(mpre) - 2, -1, -1):
            mpre[i] = np.fmax(mpre[i], mpre[i + 1])  # MATLAB's max ignores NaN
        i = np.flatnonzero(mrec[1:] != mrec[:-1]) + 1
        result[c] = float(np.sum((mrec[i] - mrec[i - 1]) * mpre[i]))
    return result


@pytest.mark.parametrize("seed", range(3))
def test_vectorised_scorer_equals_the_devkit_loops(seed):
    rng = np.random.default_rng(seed)
    for case in range(25):
        annotations, rows = {}, []
        for image in rng.choice(np.arange(1, 30), size=int(rng.integers(1, 6)), replace=False).tolist():
            n = int(rng.choice([0, 1, 2, 4, 8]))
            xy = rng.integers(0, 80, size=(n, 2))
            wh = rng.integers(2, rng.choice([16, 120]), size=(n, 2))  # many small objects
            cls = rng.choice([A, B, 3], size=n)
            annotations[image] = ann(*[(c, (*p, *(p + s - 1))) for c, p, s in zip(cls.tolist(), xy, wh)])
            for _ in range(int(rng.integers(0, 12))):
                k = int(rng.integers(0, n)) if n and rng.random() < 0.8 else -1
                p = (xy[k] if k >= 0 else rng.integers(0, 80, size=2)) + rng.integers(-4, 5, size=2)
                s = np.maximum((wh[k] if k >= 0 else rng.integers(2, 60, size=2)) + rng.integers(-4, 5, size=2), 1)
                c = int(cls[k]) if k >= 0 and rng.random() < 0.8 else int(rng.choice([A, B, 3]))
                rows.append((image, c, float(np.round(rng.random(), 1)), (*p, *(p + s - 1))))
        d = dets(*rows)
        images = list(annotations)
        blacklist = {(int(rng.choice(images)), int(rng.choice([A, B, 3])))} if rng.random() < 0.5 else set()
        for mode, fixed in (("ilsvrc", False), ("iou50", True)):
            expected = devkit_reference(annotations, d, blacklist, fixed)
            if not expected:
                continue
            got = {c.det_id: c.ap for c in score(GroundTruth.from_annotations(annotations), d, mode, blacklist)
                   .classes if c.ap is not None}
            assert got == pytest.approx(expected, abs=1e-12), f"seed {seed} case {case} {mode}"


# ---- ircnn eval det, end to end --------------------------------------------------------------------------

TINY = {  # image name -> [(wnid, (x1, y1, x2, y2))], objects 20 px and larger
    "val_001": [("n02672831", (10, 10, 60, 50)), ("n02691156", (100, 40, 220, 120))],
    "val_002": [("n02691156", (0, 0, 40, 20))],
    "val_003": [],
    "val_004": [("n02672831", (30, 30, 130, 230)), ("n02672831", (150, 20, 180, 60))],
}


def tiny_set(tmp_path):
    root = tmp_path / "ILSVRC"
    for name, objects in TINY.items():
        write_annotation(str(root / "Annotations/DET/val" / f"{name}.xml"), folder="val", filename=name,
                         width=320, height=240, objects=objects)
    write_imageset(str(root / "ImageSets/DET/val.txt"), list(TINY))
    return str(root / "Annotations/DET/val"), str(root / "ImageSets/DET/val.txt")


def tiny_predictions(shift: float) -> list[dict]:
    """JSONL records: every object detected at score 1.0, shifted right by ``shift`` times its width."""
    from eval.classes import det200

    vocab = det200()
    lines = []
    for name, objects in TINY.items():
        found = []
        for wnid, (x1, y1, x2, y2) in objects:
            dx = shift * (x2 - x1)
            row = vocab.row_of_wnid[wnid]
            found.append({"box": [x1 + dx, y1, x2 + dx, y2], "det_id": vocab.ids[row], "wnid": wnid,
                          "name": vocab.names[row], "score": 1.0})
        lines.append({"image": f"/data/Data/DET/val/{name}.JPEG", "width": 320, "height": 240, "detections": found})
    return lines


def as_detections(lines):
    index = {name: i for i, name in enumerate(TINY, 1)}
    rows = [(index[os.path.splitext(os.path.basename(r["image"]))[0]], d["det_id"], d["score"], d["box"])
            for r in lines for d in r["detections"]]
    image, det_id, conf, boxes = zip(*rows)
    return DetectionTable(np.array(image), np.array(det_id), np.array(conf), np.array(boxes, dtype=np.float64))


@pytest.mark.parametrize("fmt", ["jsonl", "ilsvrc", "coco"])
@pytest.mark.parametrize("shift, expected", [(0.0, 1.0), (0.5, 0.0)])
def test_cli_ground_truth_as_predictions(tmp_path, capsys, fmt, shift, expected):
    ann_dir, imageset = tiny_set(tmp_path)
    lines = tiny_predictions(shift)
    pred = tmp_path / f"pred.{fmt}"
    if fmt == "jsonl":
        pred.write_text("".join(json.dumps(r) + "\n" for r in lines))
    elif fmt == "ilsvrc":
        write_submission(str(pred), as_detections(lines))
    else:
        write_coco_results(str(pred), as_detections(lines))
    for mode in ("ilsvrc", "iou50", "voc07", "coco50"):
        assert main(["eval", "det", "--annotations", ann_dir, "--imageset", imageset, "--predictions", str(pred),
                     "--mode", mode, "--json"]) == 0
        doc = json.loads(capsys.readouterr().out)
        assert doc["mode"] == mode and doc["predictions_format"] == fmt
        assert doc["map"] == pytest.approx(expected, abs=1e-9)
        assert [(c["det_id"], c["positives"], c["detections"]) for c in doc["classes"]] == [(1, 3, 3), (2, 2, 2)]
        assert {"det_id", "wnid", "name", "ap", "positives", "detections"} <= set(doc["classes"][0])


def test_cli_text_table_blacklist_and_plots(tmp_path, capsys):
    ann_dir, imageset = tiny_set(tmp_path)
    pred = tmp_path / "pred.jsonl"
    lines = tiny_predictions(0.0)
    lines[2] = {"image": "val_003.JPEG", "error": "cannot decode"}
    extra = dict(lines[0]["detections"][0], det_id=199, wnid="n04591713", name="wine bottle", score=0.5)
    lines[0]["detections"].append(extra)  # a class without positives: not counted, one summary line
    pred.write_text("".join(json.dumps(r) + "\n" for r in lines))
    blacklist = tmp_path / "blacklist.txt"
    blacklist.write_text("4 n02672831\n")
    plots = tmp_path / "plots"
    assert main(["eval", "det", "--annotations", ann_dir, "--imageset", imageset, "--predictions", str(pred),
                 "--blacklist", str(blacklist), "--plots", str(plots)]) == 0
    out = capsys.readouterr().out
    assert "accordion" in out and "airplane" in out and " 1.000 " in out and "%" not in out
    assert len([line for line in out.splitlines() if line.strip().split(" ")[0].isdigit()]) == 2  # one row each
    assert "(1 classes with detections but no positives are not counted: 1 detections" in out
    assert "blacklisted  2 detections" in out and "errors       1 images" in out
    assert "mAP          1.0000  (mean AP over the 2 classes with positives)" in out
    for name in ("pr_curves.png", "ap_per_class.png"):
        assert (plots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_malformed_predictions_name_file_and_line(tmp_path, capsys):
    ann_dir, imageset = tiny_set(tmp_path)
    pred = tmp_path / "sub.txt"
    pred.write_text("1 1 0.9 10 10 50 50\n1 1 nan 10 10 50 50\n")
    assert main(["eval", "det", "--annotations", ann_dir, "--imageset", imageset, "--predictions", str(pred)]) == 2
    err = capsys.readouterr().err
    assert f"{pred}:2: score nan is not a finite number" in err
