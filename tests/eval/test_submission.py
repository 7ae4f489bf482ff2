"""eval.submission: devkit submission lines written and read back, and their errors."""

import pytest

from eval.annotations import read_annotation, write_annotation
from eval.detections import DetectionTable
from eval.submission import read_submission, write_submission

BOW_TIE, BOW, ACCORDION = "n02883205", "n02879718", "n02672831"  # DET ids 28, 29, 1


def test_submission_round_trip_matches_annotation_conversion(tmp_path, detections):
    path = str(tmp_path / "sub.txt")
    d = detections
    write_submission(path, d)
    assert open(path).read().splitlines()[0] == "2 28 0.5 10 5 19 24"
    back = read_submission(path)
    assert back.image.tolist() == [2, 1, 2] and back.det_id.tolist() == [28, 1, 200]
    assert back.score.tolist() == d.score.tolist()  # full precision: ties and order survive
    # The same boxes written as ground truth read back identically.
    write_annotation(str(tmp_path / "a.xml"), folder="v", filename="a", width=100, height=60,
                     objects=[(BOW_TIE, tuple(b)) for b in d.boxes.tolist()])
    assert back.boxes.tolist() == read_annotation(str(tmp_path / "a.xml")).boxes.tolist()
    assert back.boxes.tolist() == [[10, 5, 20, 25], [0, 1, 100, 50], [3, 3, 4, 4]]


def test_submission_keeps_float_coordinates(write):
    d = read_submission(write("sub.txt", "1 3 0.9 10.5 2 30.25 40\n\n"))
    assert d.boxes.tolist() == [[10.5, 2.0, 31.25, 41.0]]
    assert len(read_submission(write("empty.txt", ""))) == 0


@pytest.mark.parametrize("text, match", [
    ("1 1 0.9 1 2 3 4\n1 1 0.9 1 2 3\n", r"sub.txt:2: expected 7 fields"),
    ("1 1 0.9 1 2 3 4\n\n1 0 0.9 1 2 3 4\n", r"sub.txt:3: DET id 0 out of range 1..200"),
    ("1.5 1 0.9 1 2 3 4\n", r"sub.txt:1: image index is .1.5., not a whole number"),
    ("0 1 0.9 1 2 3 4\n", r"sub.txt:1: image index 0 must be >= 1"),
    ("1 1 nan 1 2 3 4\n", r"sub.txt:1: score nan is not a finite number"),
    ("1 1 0.9 1 2 3 1e9\n", r"sub.txt:1: box coordinate 1000000000.0 is not a finite number"),
    ("1 1 0.9 1 2 3 inf\n", r"sub.txt:1: box coordinate inf"),
    ("1 1 0.9 1 2 3 x\n", r"sub.txt:1: 'x' is not a number"),
    ("1 1 0.9 1 2 3 4\n1e30 1 0.9 1 2 3 4\n", r"sub.txt:2: image index 1e\+30 is more than 2147483647"),
    ("1 1e30 0.9 1 2 3 4\n", r"sub.txt:1: DET id 1000000000000000019884624838656 out of range"),
    ("1 1 -inf 1 2 3 4\n", r"sub.txt:1: score -inf is not a finite number"),
    ("1 1 0.9 -1e7 2 3 4\n", r"sub.txt:1: box coordinate -10000000.0 is not a finite number"),
])
def test_submission_errors_name_file_and_line(text, match, write):
    with pytest.raises(ValueError, match=match):
        read_submission(write("sub.txt", text))


def test_submission_of_many_tables_equals_their_concatenation(tmp_path, detections):
    d = detections
    parts = [DetectionTable(d.image[k:k + 1], d.det_id[k:k + 1], d.score[k:k + 1], d.boxes[k:k + 1])
             for k in range(len(d))]
    assert write_submission(str(tmp_path / "one.txt"), d) == 3
    with open(tmp_path / "many.txt", "w", encoding="utf-8") as f:  # an open file, as a streaming writer passes
        assert write_submission(f, iter([DetectionTable.empty(), *parts])) == 3
    assert (tmp_path / "many.txt").read_text() == (tmp_path / "one.txt").read_text()
    assert write_submission(str(tmp_path / "none.txt"), []) == 0 and (tmp_path / "none.txt").read_text() == ""
