"""A bundle's MultiBox (detector/bundle/multibox.py): its config, the GoogLeNet trunk, multibox.safetensors and
model.json's entry for it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from detector.bundle.format import BundleError, init_bundle, load_bundle, save_bundle
from detector.bundle.multibox import (
    MULTIBOX_FILE,
    GoogLeNetMultiBox,
    MultiBoxConfig,
    load_multibox,
    multibox_provenance,
    save_multibox,
)
from detector.nets.googlenet import GoogLeNetConfig

TINY = MultiBoxConfig(k=200, variant="paper", width=0.125, size=64)


def some_priors(n: int, seed: int) -> np.ndarray:
    """``n`` valid normalised boxes ``[n, 4]``, each in the top-left three quarters and at most half as big."""
    corner, side = np.random.default_rng(seed).uniform(0, 0.5, (2, n, 2))
    return np.concatenate([corner, corner + side], 1)


@pytest.fixture
def bundle_dir(tmp_path):
    """A tiny classifier bundle, the home a MultiBox needs."""
    out = tmp_path / "b"
    save_bundle(out, init_bundle(GoogLeNetConfig(width=0.125, num_classes=1000)))
    return out


def test_config_validation():
    with pytest.raises(ValueError, match="k must"):
        MultiBoxConfig(k=0)
    with pytest.raises(ValueError, match="variant"):
        MultiBoxConfig(variant="resnet")
    with pytest.raises(ValueError, match=r"priors must have shape \[3, 4\]"):
        GoogLeNetMultiBox(MultiBoxConfig(k=3, width=0.125), some_priors(4, 0))
    with pytest.raises(ValueError, match="normalised"):
        GoogLeNetMultiBox(MultiBoxConfig(k=1, width=0.125), [[0, 0, 2, 2]])
    assert MultiBoxConfig.from_dict(TINY.to_dict()) == TINY
    assert MultiBoxConfig().k == 200
    for bad in ({"size": 16}, {"grid": 0}, {"width": 0.0}, {"std": (0.2, 0.0, 0.2)}):
        with pytest.raises(ValueError):
            MultiBoxConfig(**bad)


def test_trunk_starts_from_a_classifier_without_its_heads(tiny_bundle):
    classifier = tiny_bundle(width=0.125, variant="torchvision").members[0]  # with auxiliary heads
    model = GoogLeNetMultiBox(MultiBoxConfig(k=4, variant="torchvision", width=0.125))
    model.load_trunk(classifier)
    theirs = classifier.state_dict()
    ours = model.trunk.state_dict()
    assert ours and all(torch.equal(v, theirs[k]) for k, v in ours.items())
    assert not any(k.startswith(("trunk.fc.", "trunk.aux")) for k in model.state_dict())
    with pytest.raises(ValueError, match="trunk is paper"):
        GoogLeNetMultiBox(MultiBoxConfig(k=4, variant="paper", width=0.125)).load_trunk(classifier)


def test_save_and_load_round_trip_leaves_the_members_alone(bundle_dir, spread):
    members_before = (bundle_dir / "member0.safetensors").read_bytes()
    manifest_before = json.loads((bundle_dir / "model.json").read_text())
    assert load_multibox(bundle_dir) is None
    assert multibox_provenance(bundle_dir) == {}
    config = MultiBoxConfig(k=16, variant="torchvision", width=0.125, size=48, grid=2, mean=(0.5, 0.5, 0.5),
                            std=(0.5, 0.5, 0.5))
    torch.manual_seed(0)
    model = spread(GoogLeNetMultiBox(config, some_priors(16, 5)), 7)
    save_multibox(bundle_dir, model, provenance={"note": "test"})
    doc = json.loads((bundle_dir / "model.json").read_text())
    assert doc["multibox"] == MULTIBOX_FILE
    assert (bundle_dir / "member0.safetensors").read_bytes() == members_before
    assert "priors" in load_file(bundle_dir / MULTIBOX_FILE)
    loaded = load_multibox(bundle_dir)
    assert loaded.config == config and not loaded.training
    image = np.random.default_rng(0).integers(0, 256, (60, 90, 3), dtype=np.uint8)
    for (b1, s1), (b2, s2) in zip(model.propose([image]), loaded.propose([image])):
        torch.testing.assert_close(b1, b2)
        torch.testing.assert_close(s1, s2)
    assert load_bundle(bundle_dir).multibox == MULTIBOX_FILE  # the bundle still loads, and names it
    assert multibox_provenance(bundle_dir) == {"note": "test"}

    # the file formats, byte for byte: model.json as save_bundle writes it with only "multibox" changed, and the
    # MultiBox config in the safetensors metadata as a flat JSON object in field order
    expected = json.dumps({**manifest_before, "multibox": MULTIBOX_FILE}, indent=2) + "\n"
    assert (bundle_dir / "model.json").read_text() == expected
    with safe_open(str(bundle_dir / MULTIBOX_FILE), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "1"
    assert meta["config"] == ('{"k": 16, "variant": "torchvision", "width": 0.125, "size": 48, "grid": 2, '
                              '"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}')
    assert set(load_file(bundle_dir / MULTIBOX_FILE)) == set(model.state_dict())
    assert not any(k.startswith("transform.") for k in model.state_dict())  # the normalisation is the config's


def test_save_refuses_a_directory_that_is_no_bundle(tmp_path):
    with pytest.raises(BundleError, match="ircnn model init"):
        save_multibox(tmp_path, GoogLeNetMultiBox(MultiBoxConfig(k=2, width=0.125)))
    assert not (tmp_path / MULTIBOX_FILE).exists()


def test_load_reports_a_missing_or_broken_file(tmp_path):
    save_bundle(tmp_path, init_bundle(GoogLeNetConfig(width=0.125)))
    doc = json.loads((tmp_path / "model.json").read_text())
    (tmp_path / "model.json").write_text(json.dumps({**doc, "multibox": MULTIBOX_FILE}))
    with pytest.raises(BundleError, match="missing"):
        load_multibox(tmp_path)
    (tmp_path / MULTIBOX_FILE).write_bytes(b"not safetensors")
    with pytest.raises(BundleError, match="not a usable MultiBox"):
        load_multibox(tmp_path)
    (tmp_path / "model.json").write_text(json.dumps({**doc, "multibox": "../elsewhere.safetensors"}))
    with pytest.raises(BundleError, match="plain"):
        load_multibox(tmp_path)
