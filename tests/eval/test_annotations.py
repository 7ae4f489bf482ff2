"""eval.annotations: annotation XML, image sets, the blacklist and image name lookup."""

import pytest

from eval.annotations import (
    ImageLookup,
    read_annotation,
    read_annotations,
    read_blacklist,
    read_imageset,
    write_annotation,
    write_imageset,
)

BOW_TIE, BOW, ACCORDION = "n02883205", "n02879718", "n02672831"  # DET ids 28, 29, 1


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
def test_read_imageset_errors(text, match, write):
    with pytest.raises(ValueError, match=match):
        read_imageset(write("val.txt", text))


@pytest.mark.parametrize("body, match", [
    ("<annotation><size><width>5</width><height>5</height></size>", "not well-formed"),
    ("<foo/>", "expected <annotation>"),
    ("<annotation><size><width>5</width></size></annotation>", "missing <size/height>"),
    ("<annotation><size><width>5</width><height>5</height></size><object><name>n02883205</name>"
     "<bndbox><xmin>3</xmin><ymin>0</ymin><xmax>2</xmax><ymax>4</ymax></bndbox></object></annotation>",
     "object 1: box .* xmax < xmin"),
    ("<annotation><size><width>5</width><height>5</height></size><object><name>n02883205</name>"
     "<bndbox><xmin>a</xmin><ymin>0</ymin><xmax>2</xmax><ymax>4</ymax></bndbox></object></annotation>",
     "object 1: <bndbox/xmin> is 'a', not a number"),
    ("<annotation><size><width>5</width><height>5</height></size><object><name>n02883205</name>"
     "<bndbox><xmin>1.5</xmin><ymin>0</ymin><xmax>2</xmax><ymax>4</ymax></bndbox></object></annotation>",
     r"x.xml: object 1: <bndbox/xmin> is '1.5', not a whole number"),
    ("<annotation><size><width>nan</width><height>5</height></size></annotation>",
     r"x.xml: <size/width> is 'nan', not a whole number"),
    ("<annotation><size><width>5</width><height>5</height></size><object><name>n02883205</name>"
     "<bndbox><xmin>1e300</xmin><ymin>0</ymin><xmax>2</xmax><ymax>4</ymax></bndbox></object></annotation>",
     "object 1: box coordinate"),
    ("<annotation><size><width>1e30</width><height>5</height></size></annotation>", "image size .* is not within"),
])
def test_read_annotation_errors(body, match, write):
    path = write("x.xml", body)
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


def test_blacklist_accepts_wnids_and_det_ids(write):
    path = write("bl.txt", f"36 {BOW_TIE}\n\n36 29\n7 1\n")
    assert read_blacklist(path) == {(36, 28), (36, 29), (7, 1)}


@pytest.mark.parametrize("text, match", [
    ("36\n", r"bl.txt:1: expected '<image index> <wnid or DET id>'"),
    ("x n02883205\n", r"bl.txt:1: image index 'x'"),
    ("1 1\n2 n99999999\n", r"bl.txt:2: WNID 'n99999999' is not one of the 200"),
    ("1 201\n", r"bl.txt:1: DET id 201 out of range"),
    ("0 1\n", r"bl.txt:1: image index 0 must be >= 1"),
    ("4294967296 1\n", r"bl.txt:1: image index 4.29497e\+09 is more than 2147483647"),
])
def test_blacklist_errors(text, match, write):
    with pytest.raises(ValueError, match=match):
        read_blacklist(write("bl.txt", text))


def test_image_lookup():
    lookup = ImageLookup({"ILSVRC2013_train/n01/n01_1": 1, "a/x": 2, "b/x": 3, "val_9": 9})
    assert lookup("ILSVRC2013_train/n01/n01_1") == 1  # exact name
    assert lookup("/data/Data/DET/train/ILSVRC2013_train/n01/n01_1.JPEG") == 1  # by key
    assert lookup("val_9.JPEG") == 9 and lookup("nope.jpg") == -1
    assert lookup("a/x") == 2
    with pytest.raises(ValueError, match="matches several imageset entries"):
        lookup("c/x.jpg")
