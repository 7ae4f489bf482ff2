"""eval.records: our detection JSON lines, built from plain values, written and read."""

import io
import json

import numpy as np
import pytest
import torch

from eval.annotations import ImageLookup
from eval.records import (
    detection_record,
    detections_json,
    error_record,
    read_jsonl_detections,
    record_table,
    write_record,
)

BOW_TIE, BOW, ACCORDION = "n02883205", "n02879718", "n02672831"  # DET ids 28, 29, 1


# ---- building and writing records ------------------------------------------------------------------------


def test_detections_json_rounds_and_names_the_classes():
    boxes, scores, det_ids = [[1.234, 2.005, 30.0, 40.4999]], [0.12345678], [28]
    want = [{"box": [1.23, 2.0, 30.0, 40.5], "det_id": 28, "wnid": BOW_TIE, "name": "bow tie", "score": 0.123457}]
    assert detections_json(boxes, scores, det_ids) == want
    assert list(want[0]) == ["box", "det_id", "wnid", "name", "score"]  # the documented order
    # lists, numpy arrays and float32 tensors give the same entries (float32 values exactly as their tolist())
    t_boxes, t_scores = torch.tensor(boxes), torch.tensor(scores)
    from_tensors = detections_json(t_boxes, t_scores, torch.tensor(det_ids))
    assert from_tensors == detections_json(t_boxes.numpy(), t_scores.numpy(), np.array(det_ids))
    assert from_tensors[0]["box"] == [round(v, 2) for v in t_boxes[0].tolist()]
    assert from_tensors[0]["score"] == round(t_scores[0].item(), 6)
    assert detections_json(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64)) == []
    assert detections_json([], [], []) == []


@pytest.mark.parametrize("boxes, scores, det_ids, match", [
    ([[0, 0, 1]], [0.5], [1], "must agree"),
    ([[0, 0, 1, 1]], [0.5, 0.1], [1], "must agree"),
    ([[0, 0, 1, 1]], [0.5], [201], "DET id 201"),
])
def test_detections_json_refuses_bad_arrays(boxes, scores, det_ids, match):
    with pytest.raises(ValueError, match=match):
        detections_json(boxes, scores, det_ids)


def test_records_written_read_back(write):
    f = io.StringIO()
    write_record(f, detection_record("d/a.jpg", 80, 60, [[1, 2, 3, 4]], [0.5], [1]))
    write_record(f, error_record("d/b.jpg", ValueError("cannot decode")))
    lines = f.getvalue().splitlines(keepends=True)
    assert lines == ['{"image": "d/a.jpg", "width": 80, "height": 60, "detections": [{"box": [1.0, 2.0, 3.0, 4.0], '
                     '"det_id": 1, "wnid": "n02672831", "name": "accordion", "score": 0.5}]}\n',
                     '{"image": "d/b.jpg", "error": "cannot decode"}\n']
    path = write("d.jsonl", f.getvalue())
    d, failed = read_jsonl_detections(path, ImageLookup({"a": 7}))
    assert (d.image.tolist(), d.det_id.tolist(), d.boxes.tolist(), failed) == ([7], [1], [[1, 2, 3, 4]], ["d/b.jpg"])
    table = record_table(json.loads(lines[0]), 3, "x")
    assert (table.image.tolist(), table.score.tolist()) == ([3], [0.5])
    assert len(record_table({"image": "e", "detections": []}, 3, "x")) == 0
    with pytest.raises(ValueError, match=r"^x: detection 0: needs a 'det_id'"):
        record_table({"image": "e", "detections": [{"box": [0, 0, 1, 1], "score": 1}]}, 3, "x")


# ---- reading ---------------------------------------------------------------------------------------------


def test_jsonl_detections(write):
    lines = [
        {"image": "/d/val_2.JPEG", "width": 9, "height": 9, "detections": [
            {"box": [1, 2, 3, 4], "det_id": 28, "wnid": BOW_TIE, "name": "bow tie", "score": 0.75},
            {"box": [0.5, 0, 9, 9], "wnid": BOW, "score": 0.25}]},
        {"image": "val_1.png", "error": "cannot decode"},
        {"image": "elsewhere.jpg", "width": 9, "height": 9, "detections": [{"box": [0, 0, 1, 1], "det_id": 1,
                                                                            "score": 1}]},
    ]
    path = write("d.jsonl", "".join(json.dumps(x) + "\n" for x in lines))
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
def test_jsonl_errors_name_file_and_line(line, match, write):
    with pytest.raises(ValueError, match=match):
        read_jsonl_detections(write("d.jsonl", line + "\n"), ImageLookup({}))
