"""eval.records: our detection JSON lines, built from plain values, written and read."""

import json

import pytest

from eval.annotations import ImageLookup
from eval.records import read_jsonl_detections

BOW_TIE, BOW, ACCORDION = "n02883205", "n02879718", "n02672831"  # DET ids 28, 29, 1


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_jsonl_detections(tmp_path):
    lines = [
        {"image": "/d/val_2.JPEG", "width": 9, "height": 9, "detections": [
            {"box": [1, 2, 3, 4], "det_id": 28, "wnid": BOW_TIE, "name": "bow tie", "score": 0.75},
            {"box": [0.5, 0, 9, 9], "wnid": BOW, "score": 0.25}]},
        {"image": "val_1.png", "error": "cannot decode"},
        {"image": "elsewhere.jpg", "width": 9, "height": 9, "detections": [{"box": [0, 0, 1, 1], "det_id": 1,
                                                                            "score": 1}]},
    ]
    path = write(tmp_path, "d.jsonl", "".join(json.dumps(x) + "\n" for x in lines))
    d, failed = read_jsonl_detections(path, ImageLookup({"val_1": 1, "val_2": 2}))
    assert d.image.tolist() == [2, 2, -1] and d.det_id.tolist() == [28, 29, 1]
    assert d.boxes.tolist()[1] == [0.5, 0, 9, 9] and failed == ["val_1.png"]


@pytest.mark.parametrize("line, match", [
    ("{not json", r"d.jsonl:1: invalid JSON"),
    ('{"detections": []}', r"d.jsonl:1: a detections line needs a string field 'image'"),
    ('{"image": "a"}', r"d.jsonl:1: a detections line needs a list 'detections'"),
    ('{"image": "a", "detections": [{"box": [0, 0, 1], "det_id": 1, "score": 1}]}', r"detection 0: 'box' must"),
    ('{"image": "a", "detections": [{"box": [0, 0, 1, 1], "score": 1}]}', r"detection 0: needs a 'det_id'"),
    ('{"image": "a", "detections": [{"box": [0, 0, 1, 1], "det_id": 1, "wnid": "n02883205", "score": 1}]}',
     r"det_id 1 is n02672831, not n02883205"),
    ('{"image": "a", "detections": [{"box": [0, 0, 1, 1], "det_id": 1, "score": NaN}]}', r"'score' must be a finite"),
    ('{"image": "a", "detections": [{"box": [0, 0, 1e12, 1], "det_id": 1, "score": 1}]}', r"box coordinate"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, line, match):
    with pytest.raises(ValueError, match=match):
        read_jsonl_detections(write(tmp_path, "d.jsonl", line + "\n"), ImageLookup({}))
