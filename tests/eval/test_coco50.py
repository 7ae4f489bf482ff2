"""``coco50`` against pycocotools' own COCOeval AP@0.5 on random cases (the cross-check that makes it trustworthy)."""

import contextlib
import io

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from eval.annotations import ImageAnnotation
from eval.detections import DetectionTable
from eval.ilsvrc import GroundTruth, score

CLASSES = (1, 2, 7, 200)  # a few DET ids; the random cases use a subset


def random_case(rng):
    """Ground truth and detections with empty images, crowded images, classes without objects or detections,
    ties in score, duplicated objects (ties in IoU), huge objects (COCO 'ignore' by area) and > 100 detections of
    one class in one image (the maxDets cut). Coordinates are multiples of 1/4 so both sides compute exactly."""
    n_images = int(rng.integers(1, 7))
    classes = rng.choice(CLASSES, size=int(rng.integers(1, len(CLASSES) + 1)), replace=False)
    annotations, dets = {}, []
    for index in rng.choice(np.arange(1, 40), size=n_images, replace=False).tolist():
        n_gt = int(rng.choice([0, 0, 1, 2, 3, 6, 15]))
        xy = rng.integers(0, 200, size=(n_gt, 2)) / 4 * rng.choice([1, 4])
        wh = rng.integers(1, 160, size=(n_gt, 2)) / 4 * rng.choice([1, 4])
        if n_gt and rng.random() < 0.05:
            wh[0] = 2e5  # area 4e10 > 1e10: ignored by areaRng 'all'
        if n_gt > 1 and rng.random() < 0.3:
            xy[1], wh[1] = xy[0], wh[0]  # a duplicated object
        det_ids = rng.choice(classes, size=n_gt)
        annotations[index] = ImageAnnotation(f"img{index}", 400, 400, np.c_[xy, xy + wh], det_ids.astype(np.int64))
        n_det = int(rng.choice([0, 1, 5, 20, 40]))
        if rng.random() < 0.03:
            n_det = 130  # more than maxDets of one class
        near = n_gt > 0 and rng.random() < 0.8
        src = rng.integers(0, n_gt, size=n_det) if near else np.zeros(n_det, dtype=int)
        if near:
            dxy = xy[src] + rng.integers(-12, 13, size=(n_det, 2)) / 4 * rng.choice([1, 4])
            dwh = np.maximum(wh[src] + rng.integers(-16, 17, size=(n_det, 2)) / 4 * rng.choice([1, 4]), 0.25)
            dcls = np.where(rng.random(n_det) < 0.8, det_ids[src], rng.choice(classes, size=n_det))
        else:
            dxy = rng.integers(0, 300, size=(n_det, 2)) / 4
            dwh = rng.integers(1, 200, size=(n_det, 2)) / 4
            dcls = rng.choice(classes, size=n_det)
        if n_det == 130:
            dcls[:] = dcls[0]
        scores = rng.random(n_det)
        if rng.random() < 0.5:
            scores = np.round(scores, 1)  # many ties
        dets.append(DetectionTable(np.full(n_det, index), dcls.astype(np.int64), scores, np.c_[dxy, dxy + dwh]))
        if rng.random() < 0.3:
            add_tricky_pair(rng, annotations[index], dets, index, int(rng.choice(classes)))
    return annotations, DetectionTable.concat(dets)


def add_tricky_pair(rng, annotation, dets, index, det_id):
    """Detections at IoU exactly 0.5 and just under; or two objects a detection overlaps equally well (which one
    it takes decides whether a second detection, on the other object only, is a TP); or a regular object and a
    slightly larger area-ignored one."""
    x, y = rng.integers(0, 100, size=2)
    kind = rng.random()
    if kind < 0.2:  # IoU exactly 0.5: the top half of an object
        objects = [[x, y, x + 40, y + 40], [x + 200, y, x + 240, y + 40]]
        boxes = [[x, y, x + 40, y + 20], [x + 200, y, x + 240, y + 19.75]]
    elif kind < 0.7:
        w, h = 40 + 4 * rng.integers(0, 10, size=2)
        s = w // 2  # the objects overlap at IoU 1/3; the first detection overlaps each at 0.6
        objects = [[x, y, x + w, y + h], [x + s, y, x + w + s, y + h]]
        boxes = [[x + s // 2, y, x + w + s // 2, y + h], objects[1]]
    else:  # areas 1e10 (kept) and 1.2e10 (ignored); the detection has the higher IoU with the ignored one
        objects = [[x, y, x + 1e5, y + 1e5], [x, y, x + 1.2e5, y + 1e5]]
        boxes = [[x, y, x + 1.1e5, y + 1e5], objects[0]]
    order = rng.permutation(2)
    annotation.boxes = np.concatenate([annotation.boxes, np.array(objects, dtype=np.float64)[order]])
    annotation.det_ids = np.concatenate([annotation.det_ids, [det_id, det_id]])
    scores = rng.permutation([0.9, 0.4]) if rng.random() < 0.3 else np.array([0.9, 0.4])
    dets.append(DetectionTable(np.full(2, index), np.full(2, det_id), scores, np.array(boxes, dtype=np.float64)))


def pycocotools_ap(annotations, dets, full_params=False):
    """{category: AP@0.5} from COCOeval (-1 classes left out) for the same data."""
    images, anns = [], []
    for index, a in annotations.items():
        images.append({"id": index, "width": a.width, "height": a.height})
        for box, c in zip(a.boxes.tolist(), a.det_ids.tolist()):
            w, h = box[2] - box[0], box[3] - box[1]
            anns.append({"id": len(anns) + 1, "image_id": index, "category_id": c, "bbox": [box[0], box[1], w, h],
                         "area": w * h, "iscrowd": 0})
    results = [{"image_id": i, "category_id": c, "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "score": s}
               for i, c, b, s in zip(dets.image.tolist(), dets.det_id.tolist(), dets.boxes.tolist(),
                                     dets.score.tolist())]
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": c} for c in CLASSES]}
        gt.createIndex()
        dt = gt.loadRes(results)
        e = COCOeval(gt, dt, "bbox")
        if not full_params:  # the same code on the one setting we compare; full defaults in a few cases
            e.params.iouThrs = np.array([0.5])
            e.params.areaRng, e.params.areaRngLbl, e.params.maxDets = [[0, 1e10]], ["all"], [100]
        e.evaluate()
        e.accumulate()
    area_all, max_dets_100 = 0, len(e.params.maxDets) - 1
    aps = {}
    for k, c in enumerate(e.params.catIds):
        p = e.eval["precision"][0, :, k, area_all, max_dets_100]  # iouThrs[0] = 0.5
        if (p > -1).any():
            aps[c] = float(p.mean())
    return aps


@pytest.mark.parametrize("seed", range(4))
def test_coco50_equals_pycocotools_on_random_cases(seed):
    rng = np.random.default_rng(seed)
    compared = 0
    for case in range(60):
        annotations, dets = random_case(rng)
        if len(dets) == 0:  # pycocotools' loadRes cannot take an empty list
            continue
        expected = pycocotools_ap(annotations, dets, full_params=case < 2)
        gt = GroundTruth.from_annotations(annotations)
        if not expected:
            with pytest.raises(ValueError, match="no ground-truth objects"):
                score(gt, dets, "coco50")
            continue
        result = score(gt, dets, "coco50")
        ours = {c.det_id: c.ap for c in result.classes if c.ap is not None}
        assert ours.keys() == expected.keys(), f"seed {seed} case {case}"
        for c in expected:
            assert ours[c] == pytest.approx(expected[c], abs=1e-6), f"seed {seed} case {case} class {c}"
        assert result.map == pytest.approx(np.mean(list(expected.values())), abs=1e-6)
        compared += 1
    assert compared >= 50


def test_coco50_class_with_objects_but_no_detections_is_zero():
    annotations = {1: ImageAnnotation("a", 50, 50, np.array([[0.0, 0, 10, 10]]), np.array([1])),
                   2: ImageAnnotation("b", 50, 50, np.array([[0.0, 0, 10, 10]]), np.array([2]))}
    dets = DetectionTable(np.array([1]), np.array([1]), np.array([0.5]), np.array([[0.0, 0, 10, 10]]))
    result = score(GroundTruth.from_annotations(annotations), dets, "coco50")
    aps = {c.det_id: c.ap for c in result.classes}
    assert aps == pytest.approx({1: 1.0, 2: 0.0}, abs=1e-12)  # COCO's precision tp / (tp + fp + eps) < 1
    assert aps == pytest.approx(pycocotools_ap(annotations, dets), abs=1e-15)
    assert result.map == pytest.approx(0.5)
