"""The batch runner behind `ircnn detect`: output formats, resume after a crash, image ids, drawn copies."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from eval.annotations import ImageLookup
from eval.coco import read_coco_gt, read_coco_results, write_coco_results
from eval.detections import DetectionTable
from eval.submission import read_submission, write_submission
from service import batch
from service.batch import DetectOutput, imageset_ids, input_files, relative_names
from service.journal import repair_journal
from service.vis import VisWriter, draw_detections, vis_name

CAT, PERSON = (59, "n02121808", "domestic cat"), (124, "n00007846", "person")


def record(image, dets=(), width=80, height=60):
    return {"image": image, "width": width, "height": height,
            "detections": [{"box": list(b), "det_id": c[0], "wnid": c[1], "name": c[2], "score": s}
                           for b, c, s in dets]}


RECORDS = [
    record("d/a.jpg", [((1.4, 2.5, 30.6, 40.49), CAT, 0.9), ((0.0, 0.0, 80.0, 60.0), PERSON, 0.25)]),
    {"image": "d/broken.jpg", "error": "image data is truncated"},
    record("d/sub/b.png"),  # no detections
    record("d/sub/c.png", [((10.5, 10.5, 20.5, 21.0), PERSON, 0.5)]),
]


def read_lines(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


# ---- the journal and resume ------------------------------------------------------------------------------


def test_jsonl_resume_drops_a_cut_line_and_skips_recorded_images(tmp_path):
    out = tmp_path / "dets.jsonl"
    with DetectOutput(out) as o:
        for r in RECORDS[:3]:
            o.write(r)
    assert read_lines(out) == RECORDS[:3]
    with open(out, "a") as f:  # a crash while writing the 4th line
        f.write(json.dumps(RECORDS[3])[:25])
    with DetectOutput(out, resume=True) as o:
        assert o.done == {"d/a.jpg", "d/broken.jpg", "d/sub/b.png"} and o.failed_before == {"d/broken.jpg"}
        o.write(RECORDS[3])
    assert read_lines(out) == RECORDS
    with DetectOutput(out) as o:  # without --resume: start over
        assert o.done == set()
    assert out.read_text() == ""


def test_repair_journal_drops_repeated_images_and_refuses_foreign_lines(tmp_path):
    path = tmp_path / "j.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS + RECORDS[:2]) + '{"image": "d/x.jpg", "det')
    images, failed = repair_journal(path)
    assert images == {r["image"] for r in RECORDS} and failed == {"d/broken.jpg"}
    assert read_lines(path) == RECORDS
    path.write_text(json.dumps(RECORDS[0]) + "\n" + '{"score": 1}\n')
    with pytest.raises(ValueError, match=r"j.jsonl:2: not an `ircnn detect` record"):
        repair_journal(path)
    path.write_text("1 62 0.5 1 2 3 4\n")
    with pytest.raises(ValueError, match=r"j.jsonl:1: invalid JSON"):
        DetectOutput(path, resume=True)


def test_output_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="needs --out"):
        DetectOutput(None, "coco")
    with pytest.raises(ValueError, match="needs --out"):
        DetectOutput(None, resume=True)
    with pytest.raises(ValueError, match="is a directory"):
        DetectOutput(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        DetectOutput(tmp_path / "no" / "x.jsonl")
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(ValueError, match="journal .* is gone"):
        DetectOutput(tmp_path / "x.txt", "ilsvrc", resume=True)


def flat(records, ids):
    """Records -> eval.detections.DetectionTable, the way an independent writer would see them."""
    rows = [(ids[r["image"]], d["det_id"], d["score"], d["box"]) for r in records if "error" not in r
            for d in r["detections"]]
    image, det_id, score, boxes = zip(*rows)
    return DetectionTable(np.array(image), np.array(det_id), np.array(score), np.array(boxes, dtype=np.float64))


# RECORDS as `ircnn detect --format coco | ilsvrc` has always written them (position ids 1..4).
FILES = {
    "coco": '[{"image_id": 1, "category_id": 59, "bbox": [1.4, 2.5, 29.200000000000003, 37.99], "score": 0.9},'
            '{"image_id": 1, "category_id": 124, "bbox": [0.0, 0.0, 80.0, 60.0], "score": 0.25},'
            '{"image_id": 4, "category_id": 124, "bbox": [10.5, 10.5, 10.0, 10.5], "score": 0.5}]\n',
    "ilsvrc": "1 59 0.9 1 3 30 39\n1 124 0.25 0 0 79 59\n4 124 0.5 11 11 20 20\n",
}


def test_coco_and_ilsvrc_files_equal_eval_writers_byte_for_byte(tmp_path):
    files = [batch.Path(r["image"]) for r in RECORDS]
    ids = batch.position_ids(files, relative_names(["d"], files))
    number = {k: v.id for k, v in ids.items()}
    for fmt, writer in (("coco", write_coco_results), ("ilsvrc", write_submission)):
        out = tmp_path / f"dets.{fmt}"
        with DetectOutput(out, fmt) as o:
            for r in RECORDS:
                o.write(r)
        assert not out.exists()  # only the journal until the run ends
        info = o.finish(ids)
        assert info["rows"] == 3 and info["journal_records_not_in_inputs"] == 0
        writer(str(tmp_path / f"reference.{fmt}"), flat(RECORDS, number))
        assert out.read_text() == (tmp_path / f"reference.{fmt}").read_text() == FILES[fmt]
        if fmt == "coco":
            assert json.loads(out.read_text()) == json.loads((tmp_path / "reference.coco").read_text())
        else:  # the devkit integers xmin = round(x1), xmax = round(x2) - 1
            assert read_submission(str(out)).boxes[0].tolist() == [1, 3, 31, 40]
        assert read_lines(str(out) + ".partial.jsonl") == RECORDS
        imageset, gt = read_coco_gt(str(out) + ".images.json")  # a COCO ground-truth skeleton
        assert imageset == {"d/a.jpg": 1, "d/sub/b.png": 3, "d/sub/c.png": 4} and gt[1].width == 80
        doc = json.loads((tmp_path / f"dets.{fmt}.images.json").read_text())
        assert doc["failed"] == [{"id": 2, "file_name": "d/broken.jpg", "path": "d/broken.jpg",
                                  "error": "image data is truncated"}]


def test_a_journal_record_with_a_bad_detection_is_refused_naming_the_journal(tmp_path):
    files = [batch.Path("d/a.jpg")]
    ids = batch.position_ids(files, relative_names(["d"], files))
    out = tmp_path / "dets.txt"
    bad = record("d/a.jpg", [((0.0, 0.0, 5.0, 5.0), CAT, 0.9)])
    bad["detections"][0]["box"] = [0, 0, 5]
    with DetectOutput(out, "ilsvrc") as o:
        o.write(bad)
    with pytest.raises(ValueError, match=r"dets.txt.partial.jsonl \(byte 0\): detection 0: 'box' must be"):
        o.finish(ids)
    assert not out.exists()


def test_coco_resume_after_interruption_has_no_duplicates(tmp_path):
    files = [batch.Path(r["image"]) for r in RECORDS]
    ids = batch.position_ids(files, relative_names(["d"], files))
    out = tmp_path / "dets.json"
    with DetectOutput(out, "coco") as o:
        o.write(RECORDS[0])
        o.write(RECORDS[1])  # ... interrupted: no finish()
    with open(str(out) + ".partial.jsonl", "a") as f:
        f.write('{"image": "d/sub/b.png", "wid')
    with DetectOutput(out, "coco", resume=True) as o:
        assert o.done == {"d/a.jpg", "d/broken.jpg"}
        for r in RECORDS[2:]:
            o.write(r)
    o.finish(ids)
    results = read_coco_results(str(out), ImageLookup({}))
    assert len(results) == 3 and sorted(results.image.tolist()) == [1, 1, 4]
    # a journal record of an image outside this run's inputs is left out of the file, and counted
    with DetectOutput(out, "coco", resume=True) as o:
        o.write(record("elsewhere.jpg", [((0, 0, 5, 5), CAT, 0.7)]))
    assert o.finish(ids)["journal_records_not_in_inputs"] == 1
    assert len(read_coco_results(str(out), ImageLookup({}))) == 3


# ---- inputs and image ids --------------------------------------------------------------------------------


def test_inputs_are_listed_once_and_named_relative_to_their_common_folder(tmp_path):
    (tmp_path / "p" / "s").mkdir(parents=True)
    (tmp_path / "q").mkdir()
    for name in ("p/a.jpg", "p/s/b.png", "q/c.png"):
        (tmp_path / name).write_bytes(b"")
    p, q = str(tmp_path / "p"), str(tmp_path / "q")
    files = input_files([p, os.path.join(p, "s", "b.png"), p + "/"])
    assert [f.name for f in files] == ["a.jpg", "b.png"]
    assert list(relative_names([p], files).values()) == ["a.jpg", "s/b.png"]
    files = input_files([p, q])
    assert list(relative_names([p, q], files).values()) == ["p/a.jpg", "p/s/b.png", "q/c.png"]
    assert list(relative_names([str(tmp_path / "q" / "c.png")], files[2:]).values()) == ["c.png"]


def test_imageset_ids_match_trailing_path_then_file_name(tmp_path):
    imageset = tmp_path / "val.txt"
    imageset.write_text("val/x_1 7\nval/x_2 3\nother/x_3 5\n")
    files = [batch.Path(p) for p in ("/data/Data/DET/val/x_2.JPEG", "/data/Data/DET/val/x_1.JPEG",
                                     "/elsewhere/x_3.png")]
    ids = imageset_ids(files, str(imageset))
    assert [(ids[str(f)].id, ids[str(f)].file_name) for f in files] == [(3, "val/x_2"), (7, "val/x_1"),
                                                                        (5, "other/x_3")]
    with pytest.raises(ValueError, match=r"1 of 2 images are not in --imageset .*x_9"):
        imageset_ids([files[0], batch.Path("/d/x_9.jpg")], str(imageset))
    with pytest.raises(ValueError, match="are both image 'val/x_1'"):
        imageset_ids([files[1], batch.Path("/e/val/x_1.png")], str(imageset))


# ---- drawn copies ----------------------------------------------------------------------------------------


def test_draw_detections_marks_boxes_and_labels_only():
    image = np.full((120, 160, 3), 90, np.uint8)
    before = image.copy()
    dets = record("x", [((20, 40, 100, 110), CAT, 0.87), ((5, 5, 15, 15), PERSON, 0.1)])["detections"]
    drawn = np.asarray(draw_detections(image, dets, min_score=0.3))
    assert np.array_equal(image, before)  # input not mutated
    assert drawn.shape == image.shape
    changed = (drawn != image).any(axis=2)
    assert changed[40:110, 20].all() and changed[40:110, 99].all() and changed[109, 20:100].all()  # the box
    assert changed[:40, 20:100].any()  # its label, above it
    assert not changed[60:100, 30:90].any()  # the inside of the box
    assert not changed[5:15, 5:15].any()  # the detection below min_score is not drawn
    assert not changed[45:, 110:].any()  # far from both
    edge = draw_detections(image, record("x", [((-10, -10, 500, 500), CAT, 0.9)])["detections"])
    assert np.asarray(edge).shape == image.shape  # boxes beyond the image are clipped
    with pytest.raises(ValueError, match="uint8 RGB"):
        draw_detections(image[..., 0], dets)


def test_vis_writer_mirrors_paths_and_never_overwrites_inputs(tmp_path):
    assert [vis_name(n) for n in ("a/b.JPG", "c.png", "d.webp", "e.tif")] == ["a/b.JPG", "c.png", "d.webp.png",
                                                                                "e.tif.png"]
    src = tmp_path / "in"
    (src / "s").mkdir(parents=True)
    files = [src / "a.jpg", src / "s" / "b.bmp"]
    for f in files:
        f.write_bytes(b"")
    names = relative_names([str(src)], files)
    writer = VisWriter(tmp_path / "vis", names, files)
    image = np.zeros((30, 40, 3), np.uint8)
    for f in files:
        writer.write(record(str(f), [((2, 2, 20, 20), CAT, 0.9)]), image)
    assert Image.open(tmp_path / "vis" / "a.jpg").format == "JPEG"
    drawn = Image.open(tmp_path / "vis" / "s" / "b.bmp.png")
    assert drawn.format == "PNG" and drawn.size == (40, 30) and np.asarray(drawn).any()
    with pytest.raises(ValueError, match="would overwrite the input"):
        VisWriter(src, names, files)
    (src / "s" / "b.bmp.png").write_bytes(b"")
    files.append(src / "s" / "b.bmp.png")
    with pytest.raises(ValueError, match="would both be drawn to"):
        VisWriter(tmp_path / "vis2", relative_names([str(src)], files), files)


def test_vis_writer_counts_the_boxes_it_draws(tmp_path):
    files = [batch.Path(tmp_path / "a.jpg"), batch.Path(tmp_path / "b.png")]
    writer = VisWriter(tmp_path / "vis", relative_names([str(tmp_path)], files), files, min_score=0.3)
    image = np.zeros((30, 40, 3), np.uint8)
    writer.write(record(str(files[0]), [((2, 2, 20, 20), CAT, 0.9), ((3, 3, 9, 9), PERSON, 0.1)]), image)
    writer.write(record(str(files[1])), image)
    assert writer.summary() == {"dir": str(tmp_path / "vis"), "pictures": 2, "boxes": 1, "threshold": 0.3,
                                "best_score": 0.9}


def test_journal_outputs_can_retry_their_error_records(tmp_path):
    out = tmp_path / "dets.jsonl"
    with DetectOutput(out) as o:
        for r in RECORDS:
            o.write(r)
    with DetectOutput(out, resume=True, retry_errors=True) as o:
        assert o.done == {"d/a.jpg", "d/sub/b.png", "d/sub/c.png"} and o.retried == {"d/broken.jpg"}
        assert o.failed_before == set()
    assert read_lines(out) == [RECORDS[0]] + RECORDS[2:]  # the error record is gone, the rest as they were
    with DetectOutput(out, resume=True) as o:  # without retry_errors nothing changes
        assert o.retried == set()
    assert read_lines(out) == [RECORDS[0]] + RECORDS[2:]
