"""eval.coco: COCO ground truth and results written and read back, and their errors."""

import json

import numpy as np
import pytest

from eval.annotations import ImageAnnotation, ImageLookup
from eval.coco import read_coco_gt, read_coco_results, write_coco_gt, write_coco_results
from eval.detections import DetectionTable

BOW_TIE, BOW, ACCORDION = "n02883205", "n02879718", "n02672831"  # DET ids 28, 29, 1


def test_coco_gt_round_trip(tmp_path):
    annotations = {3: ImageAnnotation("b", 40, 30, np.array([[1.0, 2.0, 11.0, 22.0]]), np.array([28])),
                   5: ImageAnnotation("a", 40, 30)}
    path = str(tmp_path / "gt.json")
    write_coco_gt(path, annotations)
    doc = json.load(open(path))
    assert doc["annotations"][0]["bbox"] == [1.0, 2.0, 10.0, 20.0] and doc["annotations"][0]["area"] == 200.0
    assert len(doc["categories"]) == 200 and doc["categories"][27] == {"id": 28, "name": "bow tie", "wnid": BOW_TIE}
    imageset, back = read_coco_gt(path)
    assert imageset == {"b": 3, "a": 5}
    assert back[3].boxes.tolist() == [[1.0, 2.0, 11.0, 22.0]] and back[3].det_ids.tolist() == [28]
    assert back[5].boxes.shape == (0, 4)


def test_coco_results_round_trip_and_image_names(tmp_path, write, detections):
    path = str(tmp_path / "res.json")
    write_coco_results(path, detections)
    back = read_coco_results(path, ImageLookup({}))
    assert back.image.tolist() == [2, 1, 2] and back.score.tolist() == detections.score.tolist()
    assert back.boxes == pytest.approx(detections.boxes, abs=1e-12)
    named = write("named.json", json.dumps([
        {"image_id": "/x/val_2.JPEG", "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.5},
        {"image_id": "other", "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.5}]))
    assert read_coco_results(named, ImageLookup({"val_1": 1, "val_2": 2})).image.tolist() == [2, -1]


@pytest.mark.parametrize("doc, match", [
    ({"image_id": 1}, "res.json: a COCO results file is a JSON list"),
    ([{"image_id": 1, "category_id": 300, "bbox": [0, 0, 1, 1], "score": 1}], "entry 0: category_id 300"),
    ([{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1], "score": 1}], "entry 0: 'bbox' must be"),
    ([{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "score": None}], "entry 0: 'score' must be"),
    ([{"image_id": 1.5, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1}], "entry 0: 'image_id' must be"),
    ([{"image_id": 10**30, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1}],
     r"entry 0: 'image_id' 1e\+30 is more than 2147483647"),
    ([{"image_id": 0, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1}], r"entry 0: 'image_id' 0 must be >= 1"),
    ([{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1e300], "score": 1}], r"entry 0: bbox box coordinate"),
])
def test_coco_results_errors(doc, match, write):
    with pytest.raises(ValueError, match=match):
        read_coco_results(write("res.json", json.dumps(doc)), ImageLookup({}))


@pytest.mark.parametrize("doc, match", [
    ({"images": [{"id": 2**40}], "annotations": []}, r"images\[0\]: 'id' 1.09951e\+12 is more than"),
    ({"images": [{"id": 1, "width": 10**12}], "annotations": []}, r"images\[0\]: width and height must be"),
    ({"images": [{"id": 1}], "annotations": [{"image_id": 10**30, "category_id": 1, "bbox": [0, 0, 1, 1]}]},
     r"annotations\[0\]: 'image_id' 1e\+30 is more than"),
])
def test_coco_gt_ranges(doc, match, write):
    with pytest.raises(ValueError, match=match):
        read_coco_gt(write("gt.json", json.dumps(doc)))


def test_coco_invalid_json_names_line(write):
    with pytest.raises(ValueError, match=r"res.json:2: invalid JSON"):
        read_coco_results(write("res.json", "[\n{oops}]"), ImageLookup({}))


def test_coco_gt_refuses_crowd(write):
    doc = {"images": [{"id": 1}], "annotations": [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1],
                                                    "iscrowd": 1}]}
    with pytest.raises(ValueError, match=r"annotations\[0\]: crowd annotations"):
        read_coco_gt(write("gt.json", json.dumps(doc)))


def test_coco_results_bytes_and_many_tables(tmp_path, detections):
    """The `ircnn detect --format coco` layout: entries joined by ',' and a newline, whether given at once or as
    one table per image (empty ones write nothing)."""
    d = detections
    assert write_coco_results(str(tmp_path / "one.json"), d) == 3
    text = (tmp_path / "one.json").read_text()
    assert text.startswith('[{"image_id": 2, "category_id": 28, "bbox": [10.0, 5.0, 10.0, 20.0], "score": 0.5},'
                           '{"image_id": 1,') and text.endswith("}]\n")
    parts = [DetectionTable(d.image[k:k + 1], d.det_id[k:k + 1], d.score[k:k + 1], d.boxes[k:k + 1])
             for k in range(len(d))]
    with open(tmp_path / "many.json", "w", encoding="utf-8") as f:
        assert write_coco_results(f, iter([parts[0], DetectionTable.empty(), *parts[1:]])) == 3
    assert (tmp_path / "many.json").read_text() == text
    assert write_coco_results(str(tmp_path / "none.json"), []) == 0
    assert (tmp_path / "none.json").read_text() == "[]\n"
