import json

import numpy as np
import pytest

from eval.formats import (
    Detections,
    ImageAnnotation,
    ImageLookup,
    detect_predictions_format,
    from_devkit,
    read_blacklist,
    read_coco_gt,
    read_coco_results,
    read_jsonl_detections,
    read_predictions,
    read_submission,
    write_coco_gt,
    write_coco_results,
    write_submission,
    read_annotation,
    read_annotations,
    read_imageset,
    to_devkit_ints,
    write_annotation,
    write_imageset,
)

BOW_TIE, BOW, ACCORDION = "n02883205", "n02879718", "n02672831"  # DET ids 28, 29, 1


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


# ---- box conversion --------------------------------------------------------------------------------------


def test_devkit_conversion_hand_computed():
    # A box covering pixels 10..19 (10 px wide) is x1=10, x2=20 here and xmin=10, xmax=19 in the devkit.
    assert to_devkit_ints(np.array([[10.0, 5.0, 20.0, 25.0]])).tolist() == [[10, 5, 19, 24]]
    assert from_devkit(np.array([[10, 5, 19, 24]])).tolist() == [[10.0, 5.0, 20.0, 25.0]]
    # Round half up, then xmax = round(x2) - 1.
    assert to_devkit_ints(np.array([[0.5, 1.49, 10.5, 11.4]])).tolist() == [[1, 1, 10, 10]]
    assert to_devkit_ints(np.zeros((0, 4))).shape == (0, 4)


# ---- annotations and image sets --------------------------------------------------------------------------


def test_annotation_round_trip(tmp_path):
    path = str(tmp_path / "Annotations/DET/val/img1.xml")
    objects = [(BOW_TIE, (10.0, 5.0, 20.0, 25.0)), (ACCORDION, (0.0, 0.0, 64.0, 48.0))]
    write_annotation(path, folder="val", filename="img1", width=64, height=48, objects=objects)
    text = open(path, encoding="utf-8").read()
    assert "<xmin>10</xmin>" in text and "<xmax>19</xmax>" in text and "<ymax>24</ymax>" in text
    ann = read_annotation(path)
    assert (ann.name, ann.width, ann.height) == ("img1", 64, 48)
    assert ann.det_ids.tolist() == [28, 1]
    assert ann.boxes.tolist() == [[10.0, 5.0, 20.0, 25.0], [0.0, 0.0, 64.0, 48.0]]


def test_annotation_without_objects(tmp_path):
    path = str(tmp_path / "a.xml")
    write_annotation(path, folder="val", filename="a", width=10, height=10, objects=[])
    ann = read_annotation(path)
    assert ann.boxes.shape == (0, 4) and ann.det_ids.shape == (0,)


@pytest.mark.parametrize("objects, match", [
    ([("n99999999", (0, 0, 5, 5))], "not one of the 200"),
    ([("dog", (0, 0, 5, 5))], "not a WNID"),
    ([(BOW, (3.0, 0, 3.2, 5))], "empty after rounding"),
    ([(BOW, (0, float("nan"), 5, 5))], "finite"),
])
def test_write_annotation_refuses_bad_objects(tmp_path, objects, match):
    with pytest.raises(ValueError, match=match):
        write_annotation(str(tmp_path / "a.xml"), folder="f", filename="a", width=10, height=10, objects=objects)


def test_imageset_round_trip(tmp_path):
    path = str(tmp_path / "ImageSets/DET/val.txt")
    write_imageset(path, ["b", "a", "c"])
    assert open(path).read() == "b 1\na 2\nc 3\n"
    assert read_imageset(path) == {"b": 1, "a": 2, "c": 3}


@pytest.mark.parametrize("text, match", [
    ("a 1\nb\n", r"val.txt:2: expected"),
    ("a 1\nb x\n", r"val.txt:2: image index 'x'"),
    ("a 1\na 2\n", r"val.txt:2: image 'a' listed twice"),
    ("a 1\nb 1\n", r"val.txt:2: image index 1 already used at .*val.txt:1"),
    ("a 0\n", r"val.txt:1: image index 0"),
    ("a 99999999999999999999\n", r"val.txt:1: image index 1e\+20 is more than 2147483647"),
    ("\n", "no images"),
])
def test_read_imageset_errors(tmp_path, text, match):
    with pytest.raises(ValueError, match=match):
        read_imageset(write(tmp_path, "val.txt", text))


@pytest.mark.parametrize("body, match", [
    ("<annotation><size><width>5</width><height>5</height></size>", "not well-formed"),
    ("<foo/>", "expected <annotation>"),
    ("<annotation><size><width>5</width></size></annotation>", "missing <size/height>"),
    ("<annotation><size><width>5</width><height>5</height></size><object><name>n02883205</name>"
     "<bndbox><xmin>3</xmin><ymin>0</ymin><xmax>2</xmax><ymax>4</ymax></bndbox></object></annotation>",
     "object 1: box .* xmax < xmin"),
    ("<annotation><size><width>5</width><height>5</height></size><object><name>n02883205</name>"
     "<bndbox><xmin>a</xmin><ymin>0</ymin><xmax>2</xmax><ymax>4</ymax></bndbox></object></annotation>",
     "object 1: <bndbox/xmin> is 'a'"),
    ("<annotation><size><width>5</width><height>5</height></size><object><name>n02883205</name>"
     "<bndbox><xmin>1e300</xmin><ymin>0</ymin><xmax>2</xmax><ymax>4</ymax></bndbox></object></annotation>",
     "object 1: box coordinate"),
    ("<annotation><size><width>1e30</width><height>5</height></size></annotation>", "image size .* is not within"),
])
def test_read_annotation_errors(tmp_path, body, match):
    path = write(tmp_path, "x.xml", body)
    with pytest.raises(ValueError, match=match) as e:
        read_annotation(path)
    assert path in str(e.value)


BILLION_LAUGHS = ('<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
                  + "".join(f'<!ENTITY lol{i + 1} "{("&lol" + str(i) + ";") * 10}">' for i in range(9)).replace(
                      "&lol0;", "&lol;")
                  + ']><annotation><filename>&lol9;</filename></annotation>')
XXE = ('<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
       '<annotation><filename>&x;</filename></annotation>')


@pytest.mark.parametrize("body, encoding", [(BILLION_LAUGHS, "utf-8"), (XXE, "utf-8"), (XXE, "utf-16")])
def test_annotations_with_a_dtd_are_refused_unexpanded(tmp_path, body, encoding):
    (tmp_path / "a.xml").write_bytes(body.encode(encoding))
    with pytest.raises(ValueError, match="DOCTYPE or ENTITY declaration"):
        read_annotation(str(tmp_path / "a.xml"))


def test_oversized_annotation_is_refused_unread(tmp_path):
    (tmp_path / "a.xml").write_bytes(b"<annotation>" + b" " * (11 << 20) + b"</annotation>")
    with pytest.raises(ValueError, match="over 10 MB"):
        read_annotation(str(tmp_path / "a.xml"))


def test_read_annotations_by_imageset(tmp_path):
    ann_dir = tmp_path / "ann"
    write_annotation(str(ann_dir / "a.xml"), folder="v", filename="a", width=9, height=9,
                     objects=[(BOW, (1, 1, 4, 4))])
    anns = read_annotations(str(ann_dir), {"a": 7})
    assert list(anns) == [7] and anns[7].det_ids.tolist() == [29]
    with pytest.raises(ValueError, match=r"b.xml: missing annotation of image 'b' \(index 2\)"):
        read_annotations(str(ann_dir), {"a": 1, "b": 2})


# ---- blacklist -------------------------------------------------------------------------------------------


def test_blacklist_accepts_wnids_and_det_ids(tmp_path):
    path = write(tmp_path, "bl.txt", f"36 {BOW_TIE}\n\n36 29\n7 1\n")
    assert read_blacklist(path) == {(36, 28), (36, 29), (7, 1)}


@pytest.mark.parametrize("text, match", [
    ("36\n", r"bl.txt:1: expected '<image index> <wnid or DET id>'"),
    ("x n02883205\n", r"bl.txt:1: image index 'x'"),
    ("1 1\n2 n99999999\n", r"bl.txt:2: WNID 'n99999999' is not one of the 200"),
    ("1 201\n", r"bl.txt:1: DET id 201 out of range"),
    ("0 1\n", r"bl.txt:1: image index 0 must be >= 1"),
    ("4294967296 1\n", r"bl.txt:1: image index 4.29497e\+09 is more than 2147483647"),
])
def test_blacklist_errors(tmp_path, text, match):
    with pytest.raises(ValueError, match=match):
        read_blacklist(write(tmp_path, "bl.txt", text))


# ---- submissions -----------------------------------------------------------------------------------------


def detections():
    return Detections(np.array([2, 1, 2]), np.array([28, 1, 200]), np.array([0.5, 0.1 + 0.2, 1e-7]),
                      np.array([[10.0, 5.0, 20.0, 25.0], [0.4, 0.6, 99.5, 50.2], [3.0, 3.0, 4.0, 4.0]]))


def test_submission_round_trip_matches_annotation_conversion(tmp_path):
    path = str(tmp_path / "sub.txt")
    d = detections()
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


def test_submission_keeps_float_coordinates(tmp_path):
    d = read_submission(write(tmp_path, "sub.txt", "1 3 0.9 10.5 2 30.25 40\n\n"))
    assert d.boxes.tolist() == [[10.5, 2.0, 31.25, 41.0]]
    assert len(read_submission(write(tmp_path, "empty.txt", ""))) == 0


@pytest.mark.parametrize("text, match", [
    ("1 1 0.9 1 2 3 4\n1 1 0.9 1 2 3\n", r"sub.txt:2: expected 7 fields"),
    ("1 1 0.9 1 2 3 4\n\n1 0 0.9 1 2 3 4\n", r"sub.txt:3: DET id 0 out of range 1..200"),
    ("1.5 1 0.9 1 2 3 4\n", r"sub.txt:1: image index '1.5' is not an integer"),
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
def test_submission_errors_name_file_and_line(tmp_path, text, match):
    with pytest.raises(ValueError, match=match):
        read_submission(write(tmp_path, "sub.txt", text))


# ---- COCO ------------------------------------------------------------------------------------------------


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


def test_coco_results_round_trip_and_image_names(tmp_path):
    path = str(tmp_path / "res.json")
    write_coco_results(path, detections())
    back = read_coco_results(path, ImageLookup({}))
    assert back.image.tolist() == [2, 1, 2] and back.score.tolist() == detections().score.tolist()
    assert back.boxes == pytest.approx(detections().boxes, abs=1e-12)
    named = write(tmp_path, "named.json", json.dumps([
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
def test_coco_results_errors(tmp_path, doc, match):
    with pytest.raises(ValueError, match=match):
        read_coco_results(write(tmp_path, "res.json", json.dumps(doc)), ImageLookup({}))


@pytest.mark.parametrize("doc, match", [
    ({"images": [{"id": 2**40}], "annotations": []}, r"images\[0\]: 'id' 1.09951e\+12 is more than"),
    ({"images": [{"id": 1, "width": 10**12}], "annotations": []}, r"images\[0\]: width and height must be"),
    ({"images": [{"id": 1}], "annotations": [{"image_id": 10**30, "category_id": 1, "bbox": [0, 0, 1, 1]}]},
     r"annotations\[0\]: 'image_id' 1e\+30 is more than"),
])
def test_coco_gt_ranges(tmp_path, doc, match):
    with pytest.raises(ValueError, match=match):
        read_coco_gt(write(tmp_path, "gt.json", json.dumps(doc)))


def test_deeply_nested_json_is_refused_with_file_and_line(tmp_path):
    """A few thousand nested brackets made Python's parser raise RecursionError; they are refused before parsing,
    whatever the brackets inside strings."""
    deep = "[" * 50_000 + "]" * 50_000
    coco = write(tmp_path, "res.json", '[\n{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1},\n'
                 + deep + "\n]")
    with pytest.raises(ValueError, match=r"res.json:3: JSON nested more than 32 levels deep"):
        read_coco_results(coco, ImageLookup({}))
    with pytest.raises(ValueError, match=r"gt.json: JSON nested more than 32 levels deep"):
        read_coco_gt(write(tmp_path, "gt.json", '{"images": ' + deep + "}"))
    jsonl = write(tmp_path, "d.jsonl", '{"image": "a", "detections": []}\n{"image": "a", "detections": ' + deep + "}\n")
    with pytest.raises(ValueError, match=r"d.jsonl:2: JSON nested more than 32 levels deep"):
        read_jsonl_detections(jsonl, ImageLookup({}))
    # brackets in strings do not count; 32 levels are still read
    text = json.dumps([{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1, "note": "[" * 100}])
    assert len(read_coco_results(write(tmp_path, "ok.json", text), ImageLookup({}))) == 1
    from eval.formats import parse_json

    assert parse_json("[" * 32 + "]" * 32) is not None
    with pytest.raises(ValueError, match=r"^x: JSON nested more than 32"):
        parse_json("[" * 33 + "]" * 33, "x")


def test_coco_invalid_json_names_line(tmp_path):
    with pytest.raises(ValueError, match=r"res.json:2: invalid JSON"):
        read_coco_results(write(tmp_path, "res.json", "[\n{oops}]"), ImageLookup({}))


def test_coco_gt_refuses_crowd(tmp_path):
    doc = {"images": [{"id": 1}], "annotations": [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1],
                                                    "iscrowd": 1}]}
    with pytest.raises(ValueError, match=r"annotations\[0\]: crowd annotations"):
        read_coco_gt(write(tmp_path, "gt.json", json.dumps(doc)))


# ---- JSON lines and format detection ---------------------------------------------------------------------


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


def test_image_lookup():
    lookup = ImageLookup({"ILSVRC2013_train/n01/n01_1": 1, "a/x": 2, "b/x": 3, "val_9": 9})
    assert lookup("ILSVRC2013_train/n01/n01_1") == 1  # exact name
    assert lookup("/data/Data/DET/train/ILSVRC2013_train/n01/n01_1.JPEG") == 1  # by key
    assert lookup("val_9.JPEG") == 9 and lookup("nope.jpg") == -1
    assert lookup("a/x") == 2
    with pytest.raises(ValueError, match="matches several imageset entries"):
        lookup("c/x.jpg")


def test_detect_and_read_any_predictions(tmp_path):
    assert detect_predictions_format(write(tmp_path, "a", "\n  [ ]")) == "coco"
    assert detect_predictions_format(write(tmp_path, "b", '{"image": "x", "error": "e"}\n')) == "jsonl"
    assert detect_predictions_format(write(tmp_path, "c", "1 1 0.5 0 0 1 1\n")) == "ilsvrc"
    assert detect_predictions_format(write(tmp_path, "d", "")) == "ilsvrc"
    p = read_predictions(write(tmp_path, "e", '{"image": "x", "error": "e"}\n'), {"x": 1})
    assert (p.format, len(p.detections), p.failed) == ("jsonl", 0, ["x"])
    with pytest.raises(ValueError, match="unknown predictions format"):
        read_predictions(write(tmp_path, "f", ""), {}, "xml")
