"""Every reader of eval's files is bounded: a line longer than its format allows is refused at its file and line
without being read whole, a whole-file format (COCO JSON, annotation XML) larger than its bound is refused, and a
message quotes at most a short excerpt of the input. `ircnn eval det --predictions /dev/zero` grew to 18 GB and a
50 MB line went whole into the message."""

import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from eval import parsing, submission
from eval.annotations import (
    ImageLookup,
    read_annotation,
    read_blacklist,
    read_imageset,
    write_annotation,
    write_imageset,
)
from eval.classification import read_labels
from eval.classification import read_predictions as read_cls_predictions
from eval.coco import read_coco_gt, read_coco_results
from eval.parsing import excerpt, text_lines
from eval.predictions import read_predictions
from eval.records import read_jsonl_detections
from eval.submission import read_submission
from service.cli import main

REPO = Path(__file__).resolve().parents[2]
BOW = "n02879718"  # DET id 29, 'bow'
BIG_LINE = 5 << 20  # characters: over every line bound
MAX_MESSAGE = 1000


def tiny_det_set(tmp_path):
    """(annotations folder, imageset) of two images with one bow each."""
    ann_dir = tmp_path / "Annotations"
    for name in ("a", "b"):
        write_annotation(str(ann_dir / f"{name}.xml"), folder="val", filename=name, width=64, height=64,
                         objects=[(BOW, (1, 1, 40, 40))])
    write_imageset(str(tmp_path / "val.txt"), ["a", "b"])
    return str(ann_dir), str(tmp_path / "val.txt")


def ircnn(*argv, timeout=120):
    """`ircnn argv...` in a child process with 4 GiB of address space -> (exit code, stderr, seconds): a reader
    that lost its bound ends in MemoryError here, not in the kernel's OOM killer."""
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))

    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "service.cli", *map(str, argv)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout, preexec_fn=limit, check=False)
    return done.returncode, done.stderr, time.monotonic() - start


def refused(call, *match: str) -> str:
    """The message of the ValueError ``call()`` raises, checked short and holding each of ``match``."""
    with pytest.raises(ValueError) as info:
        call()
    message = str(info.value)
    assert len(message) < MAX_MESSAGE, message[:2000]
    for m in match:
        assert m in message, message
    return message


# ---- /dev/zero through the CLI ---------------------------------------------------------------------------


needs_dev_zero = pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero")


@needs_dev_zero
@pytest.mark.parametrize("flag, extra, expect", [
    ("--predictions", (), "line longer than"),  # detected as a submission (its first byte is no '[' or '{')
    ("--predictions", ("--predictions-format", "ilsvrc"), "line longer than"),
    ("--predictions", ("--predictions-format", "jsonl"), "line longer than"),
    ("--predictions", ("--predictions-format", "coco"), "NUL byte"),
    ("--imageset", (), "line longer than"),
    ("--blacklist", (), "line longer than"),
])
def test_eval_det_refuses_dev_zero_at_once(tmp_path, write, flag, extra, expect):
    ann_dir, imageset = tiny_det_set(tmp_path)
    args = {"--annotations": ann_dir, "--imageset": imageset, "--predictions": write("p.txt", "1 29 0.9 1 1 39 39\n")}
    args[flag] = "/dev/zero"
    argv = [part for item in args.items() for part in item] + list(extra)
    code, err, seconds = ircnn("eval", "det", *argv)
    assert code == 2, err[-2000:]
    assert len(err) < MAX_MESSAGE and "/dev/zero" in err and expect in err, err[:2000]
    assert seconds < 30


@needs_dev_zero
@pytest.mark.parametrize("flag, extra", [
    ("--labels", ()), ("--labels", ("--labels-format", "pairs")), ("--labels", ("--labels-format", "ilsvrc2012")),
    ("--predictions", ()),
])
def test_eval_cls_refuses_dev_zero_at_once(write, flag, extra):
    args = {"--labels": write("l.txt", "a.jpg 0\n"), "--predictions": write("p.txt", "a.jpg 0\n")}
    args[flag] = "/dev/zero"
    code, err, seconds = ircnn("eval", "cls", *[part for item in args.items() for part in item], *extra)
    assert code == 2, err[-2000:]
    assert len(err) < MAX_MESSAGE and "/dev/zero:1: line longer than" in err, err[:2000]
    assert seconds < 30


# ---- one 5 MB line -----------------------------------------------------------------------------------------


def long_line_file(tmp_path, name, first, long):
    """A file of line ``first``, then a ``BIG_LINE``-character line ``long`` (padded with 'x'), then ``first``."""
    path = tmp_path / name
    pad = BIG_LINE - len(long)
    path.write_text(first + "\n" + long.replace("PAD", "x" * pad) + "\n" + first + "\n", encoding="utf-8")
    return str(path)


SUBMISSION = "1 29 0.9 1 1 39 39"
RECORD = json.dumps({"image": "a", "detections": []})


@pytest.mark.parametrize("name, first, long, read", [
    ("sub.txt", SUBMISSION, "1 29 0.9 1 1 39 PAD", read_submission),
    ("sub2.txt", SUBMISSION, "PAD", lambda p: read_predictions(p, {"a": 1})),
    ("det.jsonl", RECORD, '{"image": "PAD", "detections": []}', lambda p: read_jsonl_detections(p, ImageLookup({}))),
    ("det2.jsonl", RECORD, '{"image": "PAD", "detections": []}', lambda p: read_predictions(p, {"a": 1})),
    ("val.txt", "a 1", "PAD 2", read_imageset),
    ("blacklist.txt", "1 29", "1 PAD", read_blacklist),
    ("labels.txt", "a.jpg 0", "PAD 1", read_labels),
    ("labels2.txt", "a.jpg 0", "PAD 1", lambda p: read_labels(p, "pairs")),
    ("gt.txt", "1", "PAD", read_labels),
    ("gt2.txt", "1", "PAD", lambda p: read_labels(p, "ilsvrc2012")),
    ("pred.txt", "a.jpg 0", "PAD 1", lambda p: list(read_cls_predictions(p))),
    ("pred.jsonl", '{"image": "a.jpg", "top_k": []}', '{"image": "PAD", "top_k": []}',
     lambda p: list(read_cls_predictions(p))),
])
def test_a_5mb_line_is_refused_by_file_and_line_in_a_short_message(tmp_path, name, first, long, read):
    path = long_line_file(tmp_path, name, first, long)
    refused(lambda: read(path), f"{path}:2: line longer than ", " characters, the most a line of ")


def test_a_5mb_line_through_the_cli_is_a_short_message(tmp_path, capsys):
    ann_dir, imageset = tiny_det_set(tmp_path)
    pred = long_line_file(tmp_path, "sub.txt", SUBMISSION, "1 29 0.9 1 1 39 PAD")
    assert main(["eval", "det", "--annotations", ann_dir, "--imageset", imageset, "--predictions", pred]) == 2
    err = capsys.readouterr().err
    assert len(err) < MAX_MESSAGE and f"{pred}:2: line longer than 65,536 characters" in err, err[:2000]
    labels = long_line_file(tmp_path, "labels.txt", "a.jpg 0", "PAD 1")
    assert main(["eval", "cls", "--labels", labels, "--predictions", labels]) == 2
    err = capsys.readouterr().err
    assert len(err) < MAX_MESSAGE and f"{labels}:2: line longer than" in err, err[:2000]


def test_line_bound_is_exact_and_read_at_call_time(tmp_path, monkeypatch):
    monkeypatch.setattr(parsing, "MAX_TEXT_LINE_CHARS", 10)
    path = tmp_path / "t.txt"
    path.write_text("0123456789\n0123456789")  # 10 characters a line, the last without its newline
    assert [line for _, line in text_lines(str(path))] == ["0123456789\n", "0123456789"]
    path.write_text("0123456789\n01234567890\n")
    refused(lambda: list(text_lines(str(path))), f"{path}:2: line longer than 10 characters")
    path.write_text("01234567890")  # no newline at all
    refused(lambda: list(text_lines(str(path))), f"{path}:1: line longer than 10 characters")


# ---- long values within the line bound are quoted as an excerpt ------------------------------------------


def test_long_values_are_quoted_as_excerpts(tmp_path, write):
    token = "y" * 60_000
    refused(lambda: read_submission(write("s.txt", f"1 29 {token} 1 1 39 39\n")),
            "s.txt:1: ", "is not a number", "... (60,000 characters)")
    refused(lambda: read_submission(write("s2.txt", f"1 29 0.9 1 1 39 39 {token}\n")), "s2.txt:1: expected 7 fields")
    refused(lambda: read_labels(write("l.txt", f"a.jpg {token}\n")), "l.txt:1: ", "(60,000 characters)")
    record = {"image": "a", "detections": [{"box": list(range(100_000)), "det_id": 29, "score": 1}]}
    refused(lambda: read_jsonl_detections(write("d.jsonl", json.dumps(record) + "\n"), ImageLookup({})),
            "d.jsonl:1: detection 0: 'box' must be", " characters)")
    coco = [{"image_id": 1, "category_id": 29, "bbox": [0, 0, 1, 1], "score": 1}, ["z" * 100_000]]
    refused(lambda: read_coco_results(write("r.json", json.dumps(coco)), ImageLookup({})),
            "r.json: entry 1: expected an object, got ")
    refused(lambda: read_coco_results(write("r2.json", json.dumps([dict(coco[0], bbox=[0, 0, 1, 10 ** 300])])),
                                      ImageLookup({})), "r2.json: entry 0: bbox box coordinate 1000")


def test_excerpt():
    assert excerpt("abc") == "'abc'" and excerpt(12) == "12" and excerpt([1, 2]) == "[1, 2]"
    assert excerpt("x" * 80) == repr("x" * 80)
    assert excerpt("x" * 5_000_000) == repr("x" * 80)[:80] + "... (5,000,000 characters)"
    assert len(excerpt("\x00" * 1000)) < 120 and len(excerpt(list(range(10 ** 5)))) < 120


# ---- total bounds: whole-file formats, line files ---------------------------------------------------------


def coco_results(n):
    return json.dumps([{"image_id": 1, "category_id": 29, "bbox": [0, 0, 1, 1], "score": 1}] * n)


def test_coco_json_over_the_file_bound_is_refused_unread(tmp_path, write, monkeypatch):
    small, big = write("small.json", coco_results(2)), write("big.json", coco_results(100))
    monkeypatch.setattr(parsing, "MAX_JSON_FILE_BYTES", 1000)
    assert len(read_coco_results(small, ImageLookup({}))) == 2
    message = refused(lambda: read_coco_results(big, ImageLookup({})),
                      f"{big}: over 1,000 bytes, the most a COCO results file may be", "JSON lines")
    assert "image_id" not in message
    refused(lambda: read_coco_gt(write("gt.json", json.dumps({"images": [], "annotations": [], "x": "y" * 2000}))),
            "gt.json: over 1,000 bytes, the most a COCO ground-truth file may be")
    refused(lambda: read_predictions(big, {"a": 1}), f"{big}: over 1,000 bytes")


def feed_fifo(path, data: bytes):
    """A FIFO at ``path`` that a thread fills with ``data`` once a reader opens it (a non-regular file: its size is
    not known before it is read)."""
    os.mkfifo(path)

    def writer():
        try:
            with open(path, "wb") as f:
                f.write(data)
        except BrokenPipeError:  # the reader stopped at its bound
            pass

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    return thread


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs")
def test_a_pipe_is_refused_once_the_bound_is_read(tmp_path, monkeypatch):
    monkeypatch.setattr(parsing, "MAX_JSON_FILE_BYTES", 1000)
    fifo = str(tmp_path / "results.json")
    thread = feed_fifo(fifo, coco_results(100).encode())
    refused(lambda: read_coco_results(fifo, ImageLookup({})), f"{fifo}: over 1,000 bytes")
    thread.join(10)
    monkeypatch.setattr(parsing, "MAX_LINES_FILE_BYTES", 100)
    fifo = str(tmp_path / "sub.txt")
    thread = feed_fifo(fifo, (SUBMISSION + "\n").encode() * 20)
    refused(lambda: read_submission(fifo), f"{fifo}: over 100 bytes, the most a devkit submission may be")
    thread.join(10)


def test_line_files_over_the_file_bound_are_refused(tmp_path, write, monkeypatch):
    monkeypatch.setattr(parsing, "MAX_LINES_FILE_BYTES", 100)
    assert len(read_submission(write("ok.txt", (SUBMISSION + "\n") * 5))) == 5
    big = write("big.txt", (SUBMISSION + "\n") * 20)
    refused(lambda: read_submission(big), f"{big}: over 100 bytes, the most a devkit submission may be")
    refused(lambda: read_labels(write("l.txt", "a.jpg 0\n" * 20)), "l.txt: over 100 bytes, the most a labels file")


def test_oversized_xml_by_the_bound(tmp_path, monkeypatch):
    write_annotation(str(tmp_path / "a.xml"), folder="val", filename="a", width=64, height=64,
                     objects=[(BOW, (1, 1, 40, 40))] * 20)
    assert len(read_annotation(str(tmp_path / "a.xml")).det_ids) == 20
    monkeypatch.setattr("eval.annotations.MAX_XML_BYTES", 1000)
    refused(lambda: read_annotation(str(tmp_path / "a.xml")),
            "a.xml: over 1,000 bytes, the most an annotation may be; an ILSVRC annotation is a few KB")


# ---- normal files still read -----------------------------------------------------------------------------


def test_submission_read_in_batches_matches_and_names_the_line(write, monkeypatch):
    lines = [f"{i % 7 + 1} {i % 200 + 1} {i / 1000!r} {i % 50} 2 {i % 50 + 9} 30" for i in range(500)]
    path = write("s.txt", "\n".join(lines[:250]) + "\n\n" + "\n".join(lines[250:]) + "\n")
    whole = read_submission(path)
    monkeypatch.setattr(submission, "_BATCH_CHARS", 100)  # about 4 lines a batch
    batched = read_submission(path)
    assert len(whole) == len(batched) == 500
    for field in ("image", "det_id", "score", "boxes"):
        assert (getattr(whole, field) == getattr(batched, field)).all()
    bad = write("bad.txt", "\n".join(lines[:300] + ["1 1 nan 0 0 1 1"] + lines[300:]) + "\n")
    refused(lambda: read_submission(bad), "bad.txt:301: score nan is not a finite number")


def test_ilsvrc2012_ground_truth_streams_with_trailing_blank_lines(write):
    labels = read_labels(write("gt.txt", "1\n2\n\n\n"), "ilsvrc2012")
    assert sorted(labels) == ["ILSVRC2012_val_00000001", "ILSVRC2012_val_00000002"]
    refused(lambda: read_labels(write("gt2.txt", "1\n\n\n2\n"), "ilsvrc2012"), "gt2.txt:2: empty line")
