import json

import numpy as np
import pytest

from eval.annotations import image_key
from eval.classification import (
    ClassificationEvaluator,
    Prediction,
    detect_labels_format,
    evaluate_files,
    read_labels,
    read_predictions,
    top_k_error,
)
from service.cli import main

# cls1000 indices of a few WNIDs, checked against eval/data/cls1000.tsv
TENCH, GOLDFISH, WHITE_SHARK, TIGER_SHARK = "n01440764", "n01443537", "n01484850", "n01491361"
KIT_FOX, SEA_SNAKE, ALP, SHELTIE = 278, 65, 970, 230


# Four images, true labels 0..3. a: top-1 hit; b: hit at rank 2; c: hit at rank 5; d: hit only at rank 6,
# which top-5 must not count. top-1 error 3/4, top-5 error 1/4.
HAND_LABELS = "a.jpg 0\nb.jpg 1\nc.jpg 2\nd.jpg 3\n"
HAND_PREDICTIONS = "a.jpg 0 5 6 7 8\nb.jpg 5 1 6 7 8\nc.jpg 5 6 7 8 2\nd.jpg 5 6 7 8 9 3\n"


# ---- pure functions --------------------------------------------------------------------------------------


def test_top_k_error_hand_computed():
    labels = np.array([0, 1, 2, 3])
    ranked = np.array([[0, 9, -1], [9, 1, -1], [9, 9, 9], [3, -1, -1]])
    assert top_k_error(labels, ranked, 1) == pytest.approx(0.5)
    assert top_k_error(labels, ranked, 2) == pytest.approx(0.25)
    assert top_k_error(labels, ranked, 5) == pytest.approx(0.25)


def test_top_k_error_empty_raises():
    with pytest.raises(ValueError, match="no images"):
        top_k_error(np.zeros(0, dtype=int), np.zeros((0, 5), dtype=int), 5)


def test_image_key_drops_directories_and_extension():
    assert image_key("val/n01440764/ILSVRC2012_val_00000293.JPEG") == "ILSVRC2012_val_00000293"
    assert image_key("ILSVRC2012_val_00000293") == "ILSVRC2012_val_00000293"
    assert image_key(r"C:\data\val\x.y.png") == "x.y"


# ---- labels ----------------------------------------------------------------------------------------------


def test_pairs_labels_accept_wnid_and_index(write):
    path = write("labels.txt", f"dir/a.JPEG {TENCH}\n\nb.png 281\nname with spaces.jpg {GOLDFISH}\n")
    assert detect_labels_format(path) == "pairs"
    assert read_labels(path) == {"a": 0, "b": 281, "name with spaces": 1}


def test_ilsvrc2012_ground_truth_maps_devkit_ids_through_wnids(write):
    # devkit numbering differs from cls1000: devkit 1 = kit fox = index 278; the real first three val labels
    # 490, 361, 171 are sea snake, alp, Shetland sheepdog
    path = write("ILSVRC2012_validation_ground_truth.txt", "490\n361\n171\n1\n\n")
    assert detect_labels_format(path) == "ilsvrc2012"
    assert read_labels(path) == {
        "ILSVRC2012_val_00000001": SEA_SNAKE,
        "ILSVRC2012_val_00000002": ALP,
        "ILSVRC2012_val_00000003": SHELTIE,
        "ILSVRC2012_val_00000004": KIT_FOX,
    }


def test_imagefolder_labels(tmp_path):
    root = tmp_path / "val"
    for rel in [f"{TENCH}/x1.JPEG", f"{TENCH}/sub/x2.jpg", f"{GOLDFISH}/x3.png", f"{GOLDFISH}/notes.txt",
                ".cache/x4.jpg", "stray.jpg"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"")
    assert detect_labels_format(str(root)) == "imagefolder"
    assert read_labels(str(root)) == {"x1": 0, "x2": 0, "x3": 1}


def test_imagefolder_rejects_folder_that_is_not_a_wnid(tmp_path):
    (tmp_path / TENCH).mkdir()
    (tmp_path / TENCH / "a.jpg").write_bytes(b"")
    (tmp_path / "cats").mkdir()
    with pytest.raises(ValueError, match="'cats' is not a WNID"):
        read_labels(str(tmp_path))


def test_imagefolder_without_images_raises(tmp_path):
    (tmp_path / TENCH).mkdir()
    with pytest.raises(ValueError, match="no images"):
        read_labels(str(tmp_path))


def test_forced_format(tmp_path, write):
    path = write("gt.txt", "490\n361\n")
    with pytest.raises(ValueError, match=r"gt.txt:1: expected '<image> <wnid or class index>'"):
        read_labels(path, "pairs")
    with pytest.raises(ValueError, match="needs a directory"):
        read_labels(path, "imagefolder")
    with pytest.raises(ValueError, match="needs a file"):
        read_labels(str(tmp_path), "ilsvrc2012")


@pytest.mark.parametrize("text, labels_format, message", [
    ("", None, "no labels in"),
    ("\n  \n", None, "no labels in"),
    (f"a.jpg {TENCH}\nb.jpg n99999999\n", None, r"labels.txt:2: unknown WNID 'n99999999'"),
    (f"a.jpg {TENCH}\n\nb.jpg 1000\n", None, r"labels.txt:3: class index 1000 out of range 0..999"),
    ("a.jpg -1\n", None, r"labels.txt:1: class index -1 out of range"),
    ("a.jpg tabby\n", None, r"labels.txt:1: 'tabby' is neither a WNID nor a class index"),
    (f"a.jpg {TENCH}\nb.jpg\n", None, r"labels.txt:2: expected '<image> <wnid or class index>'"),
    ("1\n1001\n", None, r"labels.txt:2: devkit class id 1001 out of range 1..1000"),
    ("0\n", None, r"labels.txt:1: devkit class id 0 out of range 1..1000"),
    ("1\n\n2\n", "ilsvrc2012", r"labels.txt:2: empty line"),
    ("1\nkit_fox\n", "ilsvrc2012", r"labels.txt:2: expected one devkit class id"),
])
def test_malformed_labels_name_file_and_line(text, labels_format, message, write):
    path = write("labels.txt", text)
    with pytest.raises(ValueError, match=message):
        read_labels(path, labels_format)


def test_labels_sharing_a_key_name_both(write):
    path = write("labels.txt", "x/a.jpg 0\ny/a.png 1\n")
    with pytest.raises(ValueError, match=r"'x/a.jpg' at .*labels.txt:1 and 'y/a.png' at .*labels.txt:2"):
        read_labels(path)


# ---- predictions -----------------------------------------------------------------------------------------


def test_text_predictions(write):
    path = write("p.txt", f"a.jpg 3 {TENCH} 999\n\nb.jpg 7\n")
    preds = list(read_predictions(path))
    assert [(p.image, p.ranked, p.error) for p in preds] == [("a.jpg", (3, 0, 999), None), ("b.jpg", (7,), None)]
    assert preds[1].where.endswith("p.txt:3")


def test_json_predictions_as_written_by_classify(write):
    lines = [
        {"image": "val/a.JPEG", "crops": 144, "members": 6,
         "top_k": [{"index": 281, "wnid": "n02123045", "name": "tabby", "prob": 0.61},
                   {"index": 0, "wnid": TENCH, "name": "tench", "prob": 0.2}]},
        {"image": "val/b.JPEG", "error": "cannot identify image file"},
        {"image": "val/c.JPEG", "top_k": [{"wnid": GOLDFISH}]},
    ]
    path = write("p.jsonl", "".join(json.dumps(d) + "\n" for d in lines))
    preds = list(read_predictions(path))
    assert [(p.image, p.ranked, p.error) for p in preds] == [
        ("val/a.JPEG", (281, 0), None),
        ("val/b.JPEG", (), "cannot identify image file"),
        ("val/c.JPEG", (1,), None),
    ]


@pytest.mark.parametrize("line, message", [
    ("a.jpg", r"p.txt:2: expected '<image> <label1> .. <label5>'"),
    ("a.jpg 0 n99999999", r"p.txt:2: unknown WNID 'n99999999'"),
    ("a.jpg 0 1000", r"p.txt:2: class index 1000 out of range"),
    ('{"image": "a.jpg", "top_k": [', r"p.txt:2: invalid JSON"),
    ('{"top_k": []}', r"p.txt:2: .*string field 'image'"),
    ('{"image": "a.jpg"}', r"p.txt:2: .*list 'top_k'"),
    ('{"image": "a.jpg", "top_k": [{"prob": 0.5}]}', r"p.txt:2: top_k entry 1 needs an 'index' or a 'wnid'"),
    ('{"image": "a.jpg", "top_k": [{"index": 0}, {"index": 1000}]}', r"p.txt:2: class index 1000 out of range"),
    ('{"image": "a.jpg", "top_k": [{"index": "0"}]}', r"p.txt:2: top_k entry 1: 'index' must be an integer"),
    ('{"image": "a.jpg", "top_k": [{"index": 1, "wnid": "n01440764"}]}',
     r"p.txt:2: top_k entry 1: index 1 is n01443537, not n01440764"),
    ('{"image": "a.jpg", "top_k": ' + "[" * 100_000 + "]" * 100_000 + "}",
     r"^[^\n]*p.txt:2: JSON nested more than 32 levels deep"),  # was RecursionError
    ('{"image": "a.jpg", "top_k": [{"index": 10000000000000000000000}]}', r"p.txt:2: class index 1\d+ out of range"),
])
def test_malformed_predictions_name_file_and_line(line, message, write):
    path = write("p.txt", f"ok.jpg 0\n{line}\n")
    with pytest.raises(ValueError, match=message):
        list(read_predictions(path))


# ---- accumulator and files -------------------------------------------------------------------------------


def test_hand_computed_errors(write):
    result = evaluate_files(write("l.txt", HAND_LABELS), write("p.txt", HAND_PREDICTIONS))
    assert result.images == 4
    assert result.top1_error == pytest.approx(0.75)
    assert result.top5_error == pytest.approx(0.25)
    assert (result.missing, result.unmatched, result.errors) == (0, 0, 0)


def test_missing_unmatched_and_error_lines_count(write):
    labels = write("l.txt", HAND_LABELS)
    preds = write("p.jsonl", "\n".join(json.dumps(d) for d in [
        {"image": "/data/a.jpg", "top_k": [{"index": 0}]},  # hit
        {"image": "/data/b.jpg", "error": "truncated file"},  # error: miss
        {"image": "/data/z.jpg", "top_k": [{"index": 0}]},  # no label: unmatched, not scored
        {"image": "/data/y.jpg", "error": "bad"},  # no label: unmatched, not an error of a scored image
    ]))  # c, d: missing, counted as misses
    result = evaluate_files(labels, preds)
    assert result.to_json() == {"images": 4, "top1_error": 0.75, "top5_error": 0.75,
                                "missing": 2, "unmatched": 2, "errors": 1}


def test_fewer_than_five_labels_use_what_is_given(write):
    labels = write("l.txt", "a.jpg 0\nb.jpg 1\n")
    preds = write("p.txt", "a.jpg 9 0\nb.jpg 9\n")
    result = evaluate_files(labels, preds)
    assert (result.top1_error, result.top5_error) == (1.0, 0.5)


def test_devkit_labels_score_predictions_by_file_name(write):
    labels = write("gt.txt", "490\n361\n171\n")
    preds = write("p.txt", "\n".join([
        "val/n01751748/ILSVRC2012_val_00000001.JPEG n01751748",
        "val/n09193705/ILSVRC2012_val_00000002.JPEG 0 1 2 3 970",
        "ILSVRC2012_val_00000003.JPEG 278",
    ]))
    result = evaluate_files(labels, preds)
    assert result.top1_error == pytest.approx(2 / 3)
    assert result.top5_error == pytest.approx(1 / 3)


def test_second_prediction_for_an_image_raises(write):
    labels = write("l.txt", HAND_LABELS)
    preds = write("p.txt", "x/a.jpg 0\ny/a.png 1\n")
    with pytest.raises(ValueError, match=r"p.txt:2: second prediction for image 'a' \(first at .*p.txt:1\)"):
        evaluate_files(labels, preds)


def test_evaluator_accumulates_across_calls_and_resets():
    evaluator = ClassificationEvaluator({"a": 0, "b": 1})
    evaluator.process([Prediction("a.jpg", (0,))])
    evaluator.process([Prediction("b.jpg", (0, 1))])
    first = evaluator.evaluate()
    assert (first.top1_error, first.top5_error, first.missing) == (0.5, 0.0, 0)
    assert evaluator.evaluate() == first  # evaluate does not consume state
    evaluator.reset()
    assert evaluator.evaluate().missing == 2
    assert evaluator.evaluate().top5_error == 1.0


def test_evaluator_rejects_empty_labels():
    with pytest.raises(ValueError, match="no labelled images"):
        ClassificationEvaluator({})


# ---- CLI -------------------------------------------------------------------------------------------------


def test_cli_text(capsys, write):
    code = main(["eval", "cls", "--labels", write("l.txt", HAND_LABELS),
                 "--predictions", write("p.txt", HAND_PREDICTIONS)])
    out = capsys.readouterr().out
    assert code == 0
    assert "images       4\n" in out
    assert "top-1 error  75.00%\n" in out
    assert "top-5 error  25.00%\n" in out
    assert "missing      0" in out and "unmatched    0" in out and "errors       0" in out


def test_cli_json_with_imagefolder(tmp_path, capsys, write):
    for rel in [f"{TENCH}/a.JPEG", f"{GOLDFISH}/b.JPEG", f"{WHITE_SHARK}/c.JPEG"]:
        (tmp_path / "val" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "val" / rel).write_bytes(b"")
    preds = write("p.txt", f"a.JPEG {TENCH}\nb.JPEG {TIGER_SHARK} {GOLDFISH}\n")
    code = main(["eval", "cls", "--labels", str(tmp_path / "val"), "--labels-format", "imagefolder",
                 "--predictions", preds, "--json"])
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc == {"images": 3, "top1_error": pytest.approx(2 / 3), "top5_error": pytest.approx(1 / 3),
                   "missing": 1, "unmatched": 0, "errors": 0}


def test_cli_malformed_file_is_a_user_error(capsys, write):
    labels = write("l.txt", "a.jpg 0\nb.jpg n99999999\n")
    code = main(["eval", "cls", "--labels", labels, "--predictions", write("p.txt", "a.jpg 0\n")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("ircnn: error: ") and "l.txt:2: unknown WNID 'n99999999'" in err
