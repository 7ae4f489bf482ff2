"""data/package_photos: the labelled dev and test splits are what labels.json says, in files the devkit reader and
`ircnn eval det` read, and the two splits share no photo."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from eval.annotations import read_annotations, read_blacklist, read_imageset
from eval.classes import det200
from service.cli import main

ROOT = Path(__file__).resolve().parents[2] / "data" / "package_photos"
LABELS = json.loads((ROOT / "labels.json").read_text())


@pytest.mark.parametrize("split, photos, objects", [("dev", 24, 45), ("test", 21, 34)])
def test_each_split_holds_its_labelled_photos(split, photos, objects):
    root = ROOT / split
    imageset = read_imageset(str(root / "ImageSets" / "DET" / "val.txt"))
    annotations = read_annotations(str(root / "Annotations" / "DET"), imageset)
    assert len(imageset) == photos and sum(len(a.det_ids) for a in annotations.values()) == objects
    names = det200().names
    blacklist = read_blacklist(str(root / "blacklist.txt"))
    for name, index in imageset.items():
        stem = Path(name).name
        label = LABELS[stem]
        assert label["split"] == split
        with Image.open(root / "Data" / "DET" / f"{name}.JPEG") as image:
            assert image.size == (annotations[index].width, annotations[index].height)
        assert sorted(names[d - 1] for d in annotations[index].det_ids) == sorted(c for c, _ in label["objects"])
        assert {names[d - 1] for i, d in blacklist if i == index} == set(label["blacklist"])


def test_the_splits_are_disjoint_and_cover_the_labels():
    dev, test = ({Path(n).name for n in read_imageset(str(ROOT / s / "ImageSets" / "DET" / "val.txt"))}
                 for s in ("dev", "test"))
    assert not dev & test and dev | test == set(LABELS)
    readme = (ROOT / "README.md").read_text()
    assert all(f"| {stem} |" in readme for stem in LABELS)


@pytest.mark.parametrize("split", ["dev", "test"])
def test_ground_truth_as_predictions_scores_one(split, tmp_path, capsys):
    root = ROOT / split
    imageset = read_imageset(str(root / "ImageSets" / "DET" / "val.txt"))
    annotations = read_annotations(str(root / "Annotations" / "DET"), imageset)
    lines = [f"{index} {det_id} 1.0 {x1:.0f} {y1:.0f} {x2 - 1:.0f} {y2 - 1:.0f}"
             for index, ann in annotations.items() for det_id, (x1, y1, x2, y2) in zip(ann.det_ids, ann.boxes)]
    (tmp_path / "gt.txt").write_text("\n".join(lines) + "\n")
    code = main(["eval", "det", "--annotations", str(root / "Annotations" / "DET"), "--imageset",
                 str(root / "ImageSets" / "DET" / "val.txt"), "--blacklist", str(root / "blacklist.txt"),
                 "--predictions", str(tmp_path / "gt.txt"), "--json"])
    assert code == 0 and json.loads(capsys.readouterr().out)["map"] == pytest.approx(1.0)
