"""eval.predictions: any predictions file, its format told apart and read."""

import pytest

from eval.predictions import detect_predictions_format, read_predictions


def test_detect_and_read_any_predictions(write):
    assert detect_predictions_format(write("a", "\n  [ ]")) == "coco"
    assert detect_predictions_format(write("b", '{"image": "x", "error": "e"}\n')) == "jsonl"
    assert detect_predictions_format(write("c", "1 1 0.5 0 0 1 1\n")) == "ilsvrc"
    assert detect_predictions_format(write("d", "")) == "ilsvrc"
    p = read_predictions(write("e", '{"image": "x", "error": "e"}\n'), {"x": 1})
    assert (p.format, len(p.detections), p.failed) == ("jsonl", 0, ["x"])
    with pytest.raises(ValueError, match="unknown predictions format"):
        read_predictions(write("f", ""), {}, "xml")
