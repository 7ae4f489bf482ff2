import json
import os
import re
import xml.etree.ElementTree as ET

import cv2
import numpy as np
import pytest

from eval.classes import det200
from eval.synth import SynthConfig, write_synth_set
from eval.synth_photos import CLASSES
from service.cli import main


def read_tree(root) -> dict[str, bytes]:
    """relative path -> bytes of every file under root."""
    files = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, root)] = f.read()
    return files


def read_xml(path):
    root = ET.parse(path).getroot()
    size = root.find("size")
    boxes = [(o.findtext("name"), tuple(int(o.find("bndbox").findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax")))
             for o in root.findall("object")]
    return root.findtext("filename"), int(size.findtext("width")), int(size.findtext("height")), boxes


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "set"
    doc = write_synth_set(str(out), SynthConfig(images=12, seed=5, val_fraction=0.25, size=320))
    return out, doc


# ---- layout and files ------------------------------------------------------------------------------------


def test_layout_and_imagesets(small_set):
    out, doc = small_set
    files = set(read_tree(out))
    lines = {}
    for split in ("train", "val"):
        text = (out / "ImageSets" / "DET" / f"{split}.txt").read_text()
        lines[split] = text.splitlines()
        for index, line in enumerate(lines[split], 1):
            m = re.fullmatch(rf"({split}/ILSVRC2014_synth_\d{{8}}) (\d+)", line)
            assert m, line
            assert int(m.group(2)) == index  # 1-based within each file, as the devkit's val.txt
    assert len(lines["train"]) == 9 and len(lines["val"]) == 3  # the last 25% form val
    names = [line.split()[0] for split in ("train", "val") for line in lines[split]]
    assert names == [f"{'train' if i <= 9 else 'val'}/ILSVRC2014_synth_{i:08d}" for i in range(1, 13)]
    expected = {"synth.json", "ImageSets/DET/train.txt", "ImageSets/DET/val.txt"}
    for name in names:
        expected |= {f"Data/DET/{name}.JPEG", f"Annotations/DET/{name}.xml"}
    assert files == {os.path.normpath(p) for p in expected}
    assert doc["splits"]["train"]["images"] == 9 and doc["splits"]["val"]["images"] == 3
    assert json.loads((out / "synth.json").read_text()) == doc


def test_annotations_match_images_and_synth_json(small_set):
    out, doc = small_set
    counts = {c["wnid"]: {"train": 0, "val": 0} for c in doc["classes"]}
    objects = {"train": 0, "val": 0}
    for split in ("train", "val"):
        for line in (out / "ImageSets" / "DET" / f"{split}.txt").read_text().splitlines():
            name = line.split()[0]
            filename, width, height, boxes = read_xml(out / "Annotations" / "DET" / f"{name}.xml")
            assert filename == name.split("/")[1]
            image = cv2.imread(str(out / "Data" / "DET" / f"{name}.JPEG"))
            assert image.shape == (height, width, 3)
            assert max(width, height) == 320 and min(width, height) >= 0.6 * 320 - 1
            assert len(boxes) <= 6
            for wnid, (xmin, ymin, xmax, ymax) in boxes:
                assert 0 <= xmin <= xmax < width and 0 <= ymin <= ymax < height  # inclusive devkit pixels
                counts[wnid][split] += 1
                objects[split] += 1
    assert {c["wnid"]: c["objects"] for c in doc["classes"]} == counts
    assert {s: doc["splits"][s]["objects"] for s in objects} == objects
    assert sum(objects.values()) > 0


def test_classes_are_det_wnids_with_their_photos(small_set):
    _, doc = small_set
    vocab = det200()
    assert [c["wnid"] for c in doc["classes"]] == [c.wnid for c in CLASSES]
    for c in doc["classes"]:
        row = vocab.row_of_wnid[c["wnid"]]
        assert (c["det_id"], c["name"]) == (vocab.ids[row], vocab.names[row])
    by_name = {c["name"]: c["photos"] for c in doc["classes"]}
    assert by_name["domestic cat"] == ["skimage.data.chelsea"]
    assert by_name["horse"] == ["skimage.data.horse"]


def test_first_k_classes_only(tmp_path):
    doc = write_synth_set(str(tmp_path / "k2"), SynthConfig(images=10, seed=1, classes=2, size=200))
    assert [c["wnid"] for c in doc["classes"]] == ["n02121808", "n00007846"]
    found = set()
    for path in (tmp_path / "k2" / "Annotations" / "DET").rglob("*.xml"):
        found |= {wnid for wnid, _ in read_xml(path)[3]}
    assert found and found <= {"n02121808", "n00007846"}


# ---- determinism -----------------------------------------------------------------------------------------


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path, small_set):
    out, _ = small_set
    config = SynthConfig(images=12, seed=5, val_fraction=0.25, size=320)
    write_synth_set(str(tmp_path / "again"), config)
    assert read_tree(tmp_path / "again") == read_tree(out)
    write_synth_set(str(tmp_path / "other"), SynthConfig(images=12, seed=6, val_fraction=0.25, size=320))
    a, b = read_tree(out), read_tree(tmp_path / "other")
    jpegs = [p for p in a if p.endswith(".JPEG")]
    assert all(a[p] != b[p] for p in jpegs)
    assert [a[p] for p in a if p.endswith(".xml")] != [b[p] for p in a if p.endswith(".xml")]


def test_worker_processes_do_not_change_the_files(tmp_path):
    config = SynthConfig(images=130, seed=2, size=128, min_object=8)
    write_synth_set(str(tmp_path / "one"), config, workers=1)
    write_synth_set(str(tmp_path / "two"), config, workers=2)  # 130 images: really two processes
    assert read_tree(tmp_path / "one") == read_tree(tmp_path / "two")


# ---- config and CLI --------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, message", [(["--images", "0"], "--images"),
                                           (["--images", "3", "--classes", "9"], "--classes"),
                                           (["--images", "3", "--classes", "0"], "--classes")])
def test_cli_errors(tmp_path, capsys, argv, message):
    code = main(["data", "synth", "--out", str(tmp_path / "x"), *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.startswith("ircnn: error:")
    assert not (tmp_path / "x").exists()


def test_cli_refuses_a_foreign_directory_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(["data", "synth", "--out", str(out), "--images", "2", "--size", "160"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["data", "synth", "--out", str(out), "--images", "2", "--size", "160", "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "keep me"


def test_cli_replaces_an_earlier_set(tmp_path, capsys):
    out = tmp_path / "set"
    assert main(["data", "synth", "--out", str(out), "--images", "6", "--size", "160"]) == 0
    capsys.readouterr()
    assert main(["data", "synth", "--out", str(out), "--images", "3", "--size", "160", "--seed", "4",
                 "--val-fraction", "0", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["seed"] == 4 and doc["splits"]["train"]["images"] == 3 and doc["splits"]["val"]["images"] == 0
    assert len(list((out / "Data" / "DET").rglob("*.JPEG"))) == 3  # no stale images from the first set
    assert (out / "ImageSets" / "DET" / "val.txt").read_text() == ""


def test_eval_det_scores_the_set_against_itself(small_set, tmp_path, capsys):
    """End to end with the devkit scorer: its own ground truth scores 1.0; boxes moved by half their width
    (IoU 1/3 with their own object) find nothing but, rarely, a same-class neighbour."""
    import json

    from eval.annotations import read_annotations, read_imageset
    from eval.detections import DetectionTable
    from eval.submission import write_submission
    from service.cli import main

    out, _ = small_set
    imageset = out / "ImageSets" / "DET" / "train.txt"
    ann = read_annotations(str(out / "Annotations" / "DET"), read_imageset(str(imageset)))
    for shift, expected in ((0.0, 1.0), (0.5, 0.0)):
        parts = []
        for index, a in ann.items():
            boxes = a.boxes.copy()
            boxes[:, [0, 2]] += shift * (boxes[:, 2] - boxes[:, 0])[:, None]
            parts.append(DetectionTable(np.full(len(boxes), index), a.det_ids.copy(), np.ones(len(boxes)), boxes))
        write_submission(str(tmp_path / "sub.txt"), DetectionTable.concat(parts))
        code = main(["eval", "det", "--annotations", str(out / "Annotations" / "DET"), "--imageset", str(imageset),
                     "--predictions", str(tmp_path / "sub.txt"), "--json"])
        assert code == 0
        assert json.loads(capsys.readouterr().out)["map"] == pytest.approx(expected, abs=1e-9)
