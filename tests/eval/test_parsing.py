"""eval.parsing: JSON nesting limits, as every JSON reader applies them."""

import json

import pytest

from eval.annotations import ImageLookup
from eval.coco import read_coco_gt, read_coco_results
from eval.parsing import parse_json
from eval.records import read_jsonl_detections


def test_deeply_nested_json_is_refused_with_file_and_line(write):
    """A few thousand nested brackets made Python's parser raise RecursionError; they are refused before parsing,
    whatever the brackets inside strings."""
    deep = "[" * 50_000 + "]" * 50_000
    coco = write("res.json", '[\n{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1},\n'
                 + deep + "\n]")
    with pytest.raises(ValueError, match=r"res.json:3: JSON nested more than 32 levels deep"):
        read_coco_results(coco, ImageLookup({}))
    with pytest.raises(ValueError, match=r"gt.json: JSON nested more than 32 levels deep"):
        read_coco_gt(write("gt.json", '{"images": ' + deep + "}"))
    jsonl = write("d.jsonl", '{"image": "a", "detections": []}\n{"image": "a", "detections": ' + deep + "}\n")
    with pytest.raises(ValueError, match=r"d.jsonl:2: JSON nested more than 32 levels deep"):
        read_jsonl_detections(jsonl, ImageLookup({}))
    # brackets in strings do not count; 32 levels are still read
    text = json.dumps([{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1, "note": "[" * 100}])
    assert len(read_coco_results(write("ok.json", text), ImageLookup({}))) == 1
    assert parse_json("[" * 32 + "]" * 32) is not None
    with pytest.raises(ValueError, match=r"^x: JSON nested more than 32"):
        parse_json("[" * 33 + "]" * 33, "x")


def test_dataclass_fields_names_what_is_wrong():
    from dataclasses import dataclass

    from eval.parsing import dataclass_fields

    @dataclass
    class Point:
        x: int = 0
        y: int = 0

    assert dataclass_fields(Point, {"x": 1}, "a point", "point") == {"x": 1}
    with pytest.raises(ValueError, match=r"^a point must be a JSON object, got list$"):
        dataclass_fields(Point, [1, 2], "a point", "point")
    with pytest.raises(ValueError, match=r"unknown point field\(s\) \['z'\]; known: \['x', 'y'\]"):
        dataclass_fields(Point, {"x": 1, "z": 2}, "a point", "point")
