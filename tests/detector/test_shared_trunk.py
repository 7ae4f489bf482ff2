"""Shared-trunk scoring: trunk + rest is the member itself, its scorer agrees with warped-region scoring where the
two must agree, inputs are checked, and with real EfficientNet-Lite0 weights the whole cat scores as a cat."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from detector.bundle.format import Preprocess, init_bundle
from detector.bundle.importers import import_efficientnet_lite, merge_bundles
from detector.config import DetectConfig
from detector.image import read_image
from detector.nets.googlenet import GoogLeNetConfig
from detector.pipeline.scoring import RegionScorer
from detector.pipeline.shared_trunk import (
    SharedTrunkConfig,
    SharedTrunkScorer,
    assign_scales,
    resize_factors,
    split_member,
)
from detector.pipeline.warp import dilate_boxes

REAL = Path(__file__).resolve().parents[2] / "data" / "real_photos" / "Data" / "DET" / "val"
NATIVE = SharedTrunkConfig(short_sides=(224,), max_side=224)  # a 224 x 224 image stays as it is
WHOLE = torch.tensor([[16.0, 16.0, 208.0, 208.0]])  # dilated by R-CNN's 16 px context: the whole 224 image


@pytest.fixture(scope="module")
def lite_bundle():
    return import_efficientnet_lite("lite0", task="det200-from-cls1000")


def googlenet(variant: str, spread, task: str = "cls1000"):
    bundle = init_bundle(GoogLeNetConfig(variant=variant, width=0.125), members=2, task=task)
    for i, m in enumerate(bundle.members):
        spread(m, i).eval()
    return bundle


@pytest.mark.parametrize("variant", ["paper", "torchvision"])
def test_googlenet_trunk_then_rest_is_the_member(spread, variant):
    member = googlenet(variant, spread).members[0]
    split = split_member(member)
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        features = split.trunk(x)
        assert features.shape[-2:] == (14, 14)
        assert torch.allclose(split.rest(features), member(x), atol=1e-5, rtol=1e-4)


def test_lite_trunk_then_rest_is_the_member(lite_bundle):
    member = lite_bundle.members[0]
    split = split_member(member)
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        features = split.trunk(x)
        assert features.shape[1:] == (112, 14, 14)  # Lite0's stride-16 stage
        assert torch.allclose(split.rest(features), member(x), atol=1e-4, rtol=1e-4)


def scorers(bundle, trunk=NATIVE):
    config = DetectConfig()
    return SharedTrunkScorer(bundle, config, trunk), RegionScorer(bundle, config)


def test_whole_image_box_scores_as_the_warped_region_googlenet(spread):
    bundle = googlenet("torchvision", spread)
    shared, warped = scorers(bundle)
    image = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    probs, seconds = shared.score_regions(image, WHOLE)
    reference = warped(image, WHOLE)  # the warp of WHOLE is the image itself
    assert probs.shape == (1, 201) and set(seconds) == {"warp", "networks", "trunk"}
    assert torch.allclose(probs, reference, atol=1e-5)
    assert torch.allclose(probs.sum(1), torch.ones(1), atol=1e-5)


def test_whole_image_box_scores_as_the_warped_region_lite(lite_bundle):
    shared, warped = scorers(lite_bundle)
    image = read_image(str(REAL / "chelsea.JPEG"))[:224, 90:314].copy()
    assert torch.allclose(shared(image, WHOLE), warped(image, WHOLE), atol=1e-4)


def test_members_are_averaged_and_det200_heads_pass_through(spread):
    bundle = init_bundle(GoogLeNetConfig(variant="paper", width=0.125, num_classes=4), members=2, task="det200",
                         det_ids=[59, 54, 124])
    for i, m in enumerate(bundle.members):
        spread(m, i).eval()
    shared = SharedTrunkScorer(bundle, DetectConfig(), NATIVE)
    image = np.random.default_rng(1).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    x = shared.normalize(torch.from_numpy(image).permute(2, 0, 1)[None])
    with torch.inference_mode():
        expected = sum(m(x).softmax(1) for m in bundle.members) / 2
    assert shared.det_ids.tolist() == [59, 54, 124]
    assert torch.allclose(shared(image, WHOLE), expected, atol=1e-5)


def test_any_image_size_and_boxes_outside_it(spread):
    shared = SharedTrunkScorer(googlenet("torchvision", spread), DetectConfig(), SharedTrunkConfig())
    image = np.random.default_rng(2).integers(0, 256, (37, 301, 3), dtype=np.uint8)
    boxes = torch.tensor([[0.0, 0.0, 301.0, 37.0], [-50.0, -20.0, 10.0, 5.0], [3.0, 3.0, 3.0, 3.0],
                          [250.0, 30.0, 400.0, 90.0]])
    probs, _ = shared.score_regions(image, boxes)
    frames = shared.score_frames(image, boxes)
    for p in (probs, frames):
        assert p.shape == (4, 201) and torch.isfinite(p).all()
        assert torch.allclose(p.sum(1), torch.ones(4), atol=1e-5)
    assert shared(image, torch.zeros(0, 4)).shape == (0, 201)
    # the cap makes every scale of a long thin image one
    assert resize_factors(37, 301, SharedTrunkConfig()) == pytest.approx([1000 / 301])
    assert resize_factors(375, 500, SharedTrunkConfig()) == pytest.approx([224 / 375, 320 / 375, 448 / 375, 640 / 375])


def test_each_box_is_pooled_at_the_scale_nearest_the_input_size():
    factors = [0.5, 1.0, 2.0]
    boxes = torch.tensor([[0.0, 0.0, 448.0, 448.0], [0.0, 0.0, 224.0, 224.0], [10.0, 10.0, 122.0, 122.0],
                          [0.0, 0.0, 20.0, 20.0], [0.0, 0.0, 900.0, 100.0]])  # the last: side 300
    assert assign_scales(boxes, factors, 224).tolist() == [0, 1, 2, 2, 1]


def test_multi_scale_equals_single_scale_for_boxes_of_that_scale(spread):
    bundle = googlenet("torchvision", spread)
    image = np.random.default_rng(4).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    boxes = torch.tensor([[10.0, 20.0, 200.0, 250.0], [50.0, 60.0, 90.0, 95.0], [0.0, 0.0, 400.0, 300.0]])
    pyramid = SharedTrunkScorer(bundle, DetectConfig(), SharedTrunkConfig())
    scale = assign_scales(dilate_boxes(boxes, 224, 16), resize_factors(300, 400, SharedTrunkConfig()), 224).tolist()
    assert len(set(scale)) == 3, scale  # one box per scale
    probs = pyramid(image, boxes)
    for i, k in enumerate(scale):
        single = SharedTrunkScorer(bundle, DetectConfig(), SharedTrunkConfig(short_sides=((224, 320, 448, 640)[k],)))
        assert torch.allclose(probs[i], single(image, boxes[i:i + 1])[0], atol=1e-5)


def test_warped_frames_are_the_region_scorers(spread):
    bundle = googlenet("paper", spread)
    shared = SharedTrunkScorer(bundle, DetectConfig(), SharedTrunkConfig(frames="warp"))
    image = np.random.default_rng(3).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    boxes = torch.tensor([[10.0, 20.0, 90.0, 100.0], [40.0, 5.0, 150.0, 60.0]])
    assert torch.equal(shared.score_frames(image, boxes), RegionScorer(bundle).score_frames(image, boxes))


def test_bad_inputs_are_refused(spread):
    bundle = googlenet("torchvision", spread)
    shared = SharedTrunkScorer(bundle, DetectConfig(max_regions=2), NATIVE)
    image = np.zeros((50, 60, 3), np.uint8)
    with pytest.raises(ValueError, match=r"\[R, 4\]"):
        shared.score_regions(image, torch.zeros(3, 5))
    with pytest.raises(ValueError, match="x2 < x1"):
        shared.score_regions(image, torch.tensor([[10.0, 0.0, 5.0, 5.0]]))
    with pytest.raises(ValueError, match="max_regions"):
        shared.score_regions(image, torch.zeros(3, 4))
    with pytest.raises(ValueError, match="uint8"):
        shared.score_regions(image.astype(np.float32), torch.zeros(1, 4))
    with pytest.raises(ValueError, match="NaN"):
        shared.score_frames(image, torch.tensor([[0.0, 0.0, float("nan"), 5.0]]))
    with pytest.raises(ValueError, match="cascade_top_k"):
        SharedTrunkScorer(bundle, DetectConfig(cascade_top_k=10))
    mixed = merge_bundles([bundle, init_bundle(GoogLeNetConfig(variant="torchvision", width=0.125),
                                               preprocess=Preprocess(size=96))])
    with pytest.raises(ValueError, match="members take 224, 224, 96 px: use warped scoring"):
        SharedTrunkScorer(mixed)
    for kwargs, field in (({"short_sides": (8,)}, "short_sides"), ({"max_side": 5000}, "max_side"),
                          ({"frames": "crop"}, "frames"), ({"short_sides": (600.0,)}, "short_sides"),
                          ({"short_sides": (448, 224)}, "short_sides"), ({"short_sides": 224}, "short_sides")):
        with pytest.raises(ValueError, match=field):
            SharedTrunkConfig(**kwargs)


def test_real_weights_score_the_whole_cat_as_a_domestic_cat(lite_bundle):
    shared = SharedTrunkScorer(lite_bundle)  # the default pyramid
    image = read_image(str(REAL / "chelsea.JPEG"))
    probs = shared(image, torch.tensor([[0.0, 0.0, 405.0, 300.0]]))  # the annotated cat, the whole photo
    best = int(probs[0, 1:].argmax())
    assert int(shared.det_ids[best]) == 59, probs[0].topk(3)  # domestic cat
    assert float(probs[0, 1 + best]) > 0.5


def test_onnxruntime_engine_scores_as_torch(lite_bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("IRCNN_CACHE_DIR", str(tmp_path))
    image = read_image(str(REAL / "motorcycle_left.JPEG"))
    boxes = torch.tensor([[92.0, 75.0, 686.0, 452.0], [42.0, 104.0, 283.0, 308.0], [300.0, 200.0, 360.0, 240.0]])
    reference = SharedTrunkScorer(lite_bundle)
    exported = SharedTrunkScorer(lite_bundle, DetectConfig(), SharedTrunkConfig(engine="onnxruntime"))
    assert len(list((tmp_path / "onnx").glob("*.onnx"))) == 2  # the trunk and the rest, cached
    for score in ("score_regions", "score_frames"):
        probs = getattr(exported, score)(image, boxes)
        probs = probs[0] if isinstance(probs, tuple) else probs
        expected = getattr(reference, score)(image, boxes)
        expected = expected[0] if isinstance(expected, tuple) else expected
        assert torch.allclose(probs, expected, atol=1e-4), score


def test_feature_maps_are_reused_only_for_the_same_pixels(spread):
    bundle = googlenet("torchvision", spread)
    shared = SharedTrunkScorer(bundle, DetectConfig(), NATIVE)
    image = np.random.default_rng(5).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    _, first = shared.score_regions(image, WHOLE)
    _, again = shared.score_regions(image.copy(), WHOLE)
    assert first["trunk"] > 0 and again["trunk"] == 0  # same pixels, another array: the maps are kept
    image[:112] = 255 - image[:112]  # changed in place: scored afresh
    fresh = SharedTrunkScorer(bundle, DetectConfig(), NATIVE)
    assert torch.allclose(shared(image, WHOLE), fresh(image, WHOLE), atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_the_gpu_scores_as_on_the_cpu(spread):
    bundle = googlenet("torchvision", spread)
    image = np.random.default_rng(6).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    boxes = torch.tensor([[10.0, 20.0, 200.0, 230.0], [150.0, 40.0, 300.0, 120.0]])
    cpu = SharedTrunkScorer(bundle)(image, boxes)
    for m in bundle.members:
        m.cuda()
    gpu = SharedTrunkScorer(bundle)
    assert gpu.device.type == "cuda"
    assert torch.allclose(gpu(image, boxes), cpu, atol=1e-3)
    assert torch.allclose(gpu(torch.from_numpy(image).permute(2, 0, 1).cuda(), boxes), cpu, atol=1e-3)
