import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as T
from PIL import Image

from detector.bundle.format import Bundle, Preprocess
from detector.bundle.importers import merge_bundles
from detector.image import ImageError
from detector.pipeline.classify import Classifier, crop_views
from detector.pipeline.ensemble import Ensemble, EnsembleConfig


@pytest.fixture
def photo():
    rng = np.random.default_rng(1)
    return rng.integers(0, 256, (300, 451, 3), dtype=np.uint8)


def test_one_and_ten_crops_match_torchvision_transforms(photo):
    img = torch.from_numpy(photo).permute(2, 0, 1)
    resized = T.Resize(256, antialias=True)(img)
    one = crop_views(photo, 1)
    assert one.shape == (1, 3, 224, 224) and one.dtype == torch.uint8
    assert torch.equal(one[0], T.CenterCrop(224)(resized))
    ten = crop_views(photo, 10)
    assert ten.shape == (10, 3, 224, 224)
    for i, want in enumerate(T.FiveCrop(224)(resized)):  # tl, tr, bl, br, centre
        assert torch.equal(ten[i], want)
        assert torch.equal(ten[5 + i], want.flip(-1))  # view i + 5 mirrors view i
    # the same ten views as torchvision's TenCrop (which orders the mirrors as crops of the flipped image)
    assert sorted(v.sum().item() for v in ten) == sorted(v.sum().item() for v in T.TenCrop(224)(resized))


@pytest.mark.parametrize("shape", [(300, 451, 3), (451, 300, 3), (256, 256, 3)])
def test_144_crops_follow_the_paper(shape):
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, shape, dtype=np.uint8)
    views = crop_views(image, 144)
    assert views.shape == (144, 3, 224, 224)
    assert torch.equal(views[72:], views[:72].flip(-1))  # the second half mirrors the first
    img = torch.from_numpy(image).permute(2, 0, 1)
    for scale_i, side in enumerate((256, 288, 320, 352)):
        resized = T.Resize(side, antialias=True)(img)
        h, w = resized.shape[-2:]
        assert min(h, w) == side
        # the first square of each scale is the left (or top) one; its 6 views come first
        first = resized[:, :side, :side]
        base = scale_i * 18
        assert torch.equal(views[base], first[:, :224, :224])  # top-left corner crop
        assert torch.equal(views[base + 4], T.CenterCrop(224)(first))
        assert torch.equal(views[base + 5], T.Resize([224, 224], antialias=True)(first))  # whole square
        last = resized[:, h - side:, w - side:]  # the right (or bottom) square
        assert torch.equal(views[base + 12 + 3], last[:, side - 224:, side - 224:])  # its bottom-right


def test_crops_reject_bad_values(photo):
    with pytest.raises(ValueError, match="crops must be one of"):
        crop_views(photo, 5)
    with pytest.raises(ImageError, match="aspect ratio"):
        crop_views(np.zeros((2, 1000, 3), np.uint8), 1)
    tiny = crop_views(np.zeros((1, 1, 3), np.uint8), 10)  # a single pixel is upsampled, not an error
    assert tiny.shape == (10, 3, 224, 224)


def test_ensemble_averages_member_softmax(tiny_bundle):
    bundle = tiny_bundle(members=3)
    views = torch.randint(0, 256, (5, 3, 224, 224), dtype=torch.uint8)
    probs = Ensemble.from_bundle(bundle, EnsembleConfig(batch_size=2))(views)
    mean, std = torch.tensor(bundle.preprocess.mean), torch.tensor(bundle.preprocess.std)
    x = (views.float() / 255 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    with torch.no_grad():
        each = [m(x).softmax(1) for m in bundle.members]
    assert max((e - each[0]).abs().max() for e in each[1:]) > 1e-3  # the members really differ
    assert torch.allclose(probs, torch.stack(each).mean(0), atol=1e-5)
    assert torch.allclose(probs.sum(1), torch.ones(5), atol=1e-5)


def test_classifier_averages_over_crops(tiny_bundle, photo):
    bundle = tiny_bundle(members=2)
    clf = Classifier(bundle)
    probs = clf.probabilities([photo, photo[:200, :100]], crops=10)
    assert probs.shape == (2, 1000)
    per_crop = clf.ensemble(crop_views(photo, 10))
    assert torch.allclose(probs[0], per_crop.mean(0), atol=1e-5)
    assert not torch.allclose(probs[0], probs[1], atol=1e-4)
    out = clf.classify([photo], crops=10, top_k=3)[0]
    assert out["crops"] == 10 and out["members"] == 2 and len(out["top_k"]) == 3
    first = out["top_k"][0]
    assert first["prob"] == pytest.approx(probs[0].max().item(), abs=1e-6)
    assert first["wnid"].startswith("n") and first["index"] == int(probs[0].argmax())


def test_classifier_runs_each_member_on_crops_of_its_own_size(tiny_bundle, photo):
    parts = [tiny_bundle(width=0.125, size=64), tiny_bundle(width=0.125, size=96, seed=1)]
    images = [photo, photo[:200, :100]]
    probs = Classifier(merge_bundles(parts)).probabilities(images, crops=10)
    each = [Classifier(b).probabilities(images, crops=10) for b in parts]
    assert torch.allclose(probs, (each[0] + each[1]) / 2, atol=1e-6)
    at_64 = Classifier(Bundle("cls1000", parts[1].members, Preprocess(size=64))).probabilities(images, crops=10)
    assert (at_64 - each[1]).abs().max() > 1e-3  # the second member's answer depends on its input size


def test_bfloat16_stays_close_to_fp32(tiny_bundle, photo):
    bundle = tiny_bundle()
    fp32 = Classifier(bundle).probabilities([photo], crops=1)
    bf16 = Classifier(bundle, EnsembleConfig(precision="bf16")).probabilities([photo], crops=1)
    assert (fp32 - bf16).abs().max().item() < 0.02
    assert fp32.argmax() == bf16.argmax()


def test_classifier_refuses_detection_bundles(tiny_bundle):
    with pytest.raises(ValueError, match="cannot classify"):
        Classifier(tiny_bundle(num_classes=201, task="det200"))


def test_classifier_names_a_trained_bundles_own_classes(tiny_bundle, photo):
    bundle = tiny_bundle(num_classes=3, task="classes")
    with pytest.raises(ValueError, match="cannot classify"):
        Classifier(bundle)  # no class names recorded
    bundle.provenance["classes"] = ["red", "green", "blue"]
    out = Classifier(bundle).classify([photo], top_k=5)[0]["top_k"]
    assert sorted(t["name"] for t in out) == ["blue", "green", "red"]


def test_classify_paths_keeps_order_and_reports_bad_files(tiny_bundle, tmp_path, photo):
    Image.fromarray(photo).save(tmp_path / "a.jpg")
    (tmp_path / "b.jpg").write_bytes(b"not an image")
    Image.fromarray(photo[:50, :60]).save(tmp_path / "c.png")
    clf = Classifier(tiny_bundle())
    paths = [tmp_path / n for n in ("a.jpg", "b.jpg", "c.png", "missing.jpg")]
    results = list(clf.classify_paths(paths, crops=1, top_k=2, images_per_batch=2))
    assert [r["image"] for r in results] == [str(p) for p in paths]
    assert "top_k" in results[0] and "top_k" in results[2]
    assert results[2]["width"] == 60 and results[2]["height"] == 50
    assert "not a supported image" in results[1]["error"]
    assert "no such file" in results[3]["error"]
    alone = clf.classify([np.asarray(Image.open(tmp_path / "c.png"))], crops=1, top_k=2)[0]
    assert alone["top_k"] == results[2]["top_k"]  # batching with other images changes nothing
