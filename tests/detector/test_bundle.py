import json
import os

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from detector.bundle.format import BundleError, Preprocess, init_bundle, load_bundle, save_bundle
from detector.bundle.importers import default_bundle, import_torchvision, merge_bundles
from detector.nets.googlenet import GoogLeNetConfig


def test_save_load_round_trip_gives_identical_outputs(tmp_path, tiny_bundle):
    bundle = tiny_bundle(members=2)
    save_bundle(tmp_path / "b", bundle)
    doc = json.loads((tmp_path / "b" / "model.json").read_text())
    assert doc["format"] == 1 and doc["members"] == ["member0.safetensors", "member1.safetensors"]
    assert doc["task"] == "cls1000" and doc["multibox"] is None
    loaded = load_bundle(tmp_path / "b")
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        for a, b in zip(bundle.members, loaded.members):
            assert torch.equal(a(x), b(x))
    assert not loaded.members[0].training
    # members differ: each got its own seed
    with torch.no_grad():
        assert not torch.equal(loaded.members[0](x), loaded.members[1](x))


def test_init_is_deterministic_per_seed():
    a = init_bundle(GoogLeNetConfig(width=0.125), members=1, seed=5)
    b = init_bundle(GoogLeNetConfig(width=0.125), members=1, seed=5)
    assert all(torch.equal(x, y) for x, y in zip(a.members[0].state_dict().values(), b.members[0].state_dict().values()))


def test_import_torchvision_matches_torchvision_logits(tmp_path, spread):
    torch.manual_seed(0)
    tv = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=True)
    spread(tv, 3)
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    bundle = import_torchvision(tmp_path / "tv.pth")
    assert bundle.arch.variant == "torchvision" and bundle.arch.aux_logits
    assert bundle.provenance["input_range"] == "imagenet"  # not torchvision's published file
    save_bundle(tmp_path / "b", bundle)
    ours = load_bundle(tmp_path / "b").members[0]
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert (tv.eval()(x) - ours(x)).abs().max().item() < 1e-4


def test_import_rejects_what_is_not_a_googlenet(tmp_path):
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(BundleError, match="not a GoogLeNet state_dict"):
        import_torchvision(tmp_path / "other.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(BundleError, match="not a loadable PyTorch checkpoint"):
        import_torchvision(tmp_path / "garbage.pth")
    with pytest.raises(BundleError, match="does not exist"):
        import_torchvision(tmp_path / "missing.pth")


def test_import_refuses_pickled_objects(tmp_path):
    """weights_only=True: a checkpoint that needs arbitrary unpickling is refused, not executed."""

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"fc.weight": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(BundleError, match="weights_only"):
        import_torchvision(tmp_path / "evil.pth")


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(format=99), "unsupported bundle format"),
    (lambda d: d.update(task="segmentation"), "unknown task"),
    (lambda d: d.update(members=["../member0.safetensors"]), "plain"),
    (lambda d: d.update(members=[]), "1..64"),
    (lambda d: d.update(members=["member9.safetensors"]), "missing"),
    (lambda d: d["arch"].update(width=0.5), "do not match"),
    (lambda d: d["arch"].update(layers=3), "unknown arch field"),
    (lambda d: d.pop("preprocess"), "missing field"),
    (lambda d: d["preprocess"].update(std=[0, 1, 1]), r"std must be 3 numbers in \[0.001, 1\]"),
    (lambda d: d["preprocess"].update(mean=[1e308, 0.5, 0.5]), r"mean must be 3 numbers in \[0, 1\]"),
    (lambda d: d["preprocess"].update(mean=[1e38, 0.5, 0.5]), r"mean must be 3 numbers in \[0, 1\]"),
    (lambda d: d["preprocess"].update(std=[1e-300, 0.2, 0.2]), r"std must be 3 numbers in \[0.001, 1\]"),
    (lambda d: d["preprocess"].update(mean=[-0.1, 0.5, 0.5]), r"mean must be 3 numbers in \[0, 1\]"),
    (lambda d: d["preprocess"].update(size=True), "size must be a whole number"),
    (lambda d: d["preprocess"].update(size=2 ** 40), "size must be a whole number in 32..1024"),
])
def test_load_rejects_broken_bundles_with_clear_messages(tmp_path, tiny_bundle, edit, message):
    save_bundle(tmp_path, tiny_bundle())
    doc = json.loads((tmp_path / "model.json").read_text())
    edit(doc)
    (tmp_path / "model.json").write_text(json.dumps(doc))
    with pytest.raises(BundleError, match=message):
        load_bundle(tmp_path)


def test_load_names_a_member_that_is_no_regular_file(tmp_path, tiny_bundle):
    """A member that is a FIFO or a link to a device is no weights file: said so, not called missing (and never
    read: reading a FIFO would block, /dev/urandom never ends)."""
    save_bundle(tmp_path, tiny_bundle())
    member = tmp_path / "member0.safetensors"
    member.unlink()
    os.mkfifo(member)
    with pytest.raises(BundleError, match="member0.safetensors is not a regular file"):
        load_bundle(tmp_path)
    member.unlink()
    member.symlink_to("/dev/urandom")
    with pytest.raises(BundleError, match="member0.safetensors is not a regular file"):
        load_bundle(tmp_path)


def test_load_rejects_missing_manifest_and_bad_weights(tmp_path, tiny_bundle):
    with pytest.raises(BundleError, match="no model.json"):
        load_bundle(tmp_path)
    save_bundle(tmp_path, tiny_bundle())
    save_file({"x": torch.zeros(1)}, str(tmp_path / "member0.safetensors"))
    with pytest.raises(BundleError, match="do not match"):
        load_bundle(tmp_path)
    (tmp_path / "member0.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(BundleError, match="member0.safetensors"):
        load_bundle(tmp_path)


def test_default_bundle_offline_says_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(BundleError) as e:
        default_bundle()
    msg = str(e.value)
    assert str(tmp_path / "hub" / "checkpoints" / "googlenet-1378be20.pth") in msg
    assert "--model" in msg


def test_default_bundle_uses_torchvision_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    target = tmp_path / "hub" / "checkpoints"
    target.mkdir(parents=True)
    tv = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=True)
    torch.save(tv.state_dict(), target / "googlenet-1378be20.pth")
    bundle = default_bundle()
    assert bundle.provenance["file"] == "googlenet-1378be20.pth"
    assert bundle.task == "cls1000" and len(bundle.members) == 1 and not bundle.arch.aux_logits


def test_a_huge_model_json_is_refused_before_it_is_read(tmp_path, tiny_bundle, monkeypatch):
    from detector.bundle import format as bundle_format

    save_bundle(tmp_path, tiny_bundle())
    monkeypatch.setattr(bundle_format, "MAX_MANIFEST_BYTES", 100)
    with pytest.raises(BundleError, match="model.json is larger than 100 bytes"):
        load_bundle(tmp_path)


def mixed_sizes(tiny_bundle):
    """Three narrow members merged from bundles of 64, 96 and 64 px inputs."""
    return merge_bundles([tiny_bundle(width=0.125, size=64), tiny_bundle(width=0.125, size=96, seed=1),
                          tiny_bundle(width=0.125, size=64, seed=2)])


def test_merge_of_different_input_sizes_round_trips(tmp_path, tiny_bundle):
    merged = mixed_sizes(tiny_bundle)
    assert merged.member_sizes == [64, 96, 64] and merged.preprocess.size == 64
    save_bundle(tmp_path / "b", merged)
    doc = json.loads((tmp_path / "b" / "model.json").read_text())
    assert doc["member_sizes"] == [64, 96, 64] and doc["preprocess"]["size"] == 64
    loaded = load_bundle(tmp_path / "b")
    assert [loaded.member_size(i) for i in range(3)] == loaded.input_sizes == [64, 96, 64]
    assert loaded.describe()["member_sizes"] == [64, 96, 64]
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        assert all(torch.equal(a(x), b(x)) for a, b in zip(merged.members, loaded.members))
    save_bundle(tmp_path / "again", loaded)
    assert (tmp_path / "again" / "model.json").read_bytes() == (tmp_path / "b" / "model.json").read_bytes()
    # merging a mixed bundle again keeps each member's size
    assert merge_bundles([loaded, tiny_bundle(width=0.125, size=128)]).member_sizes == [64, 96, 64, 128]


def test_single_size_bundles_are_written_as_before(tmp_path, tiny_bundle):
    """model.json of a bundle whose members share their input size, byte for byte as before member_sizes."""
    bundle = init_bundle(GoogLeNetConfig(width=0.125, num_classes=4), members=2, task="det200", det_ids=[1, 2, 3],
                         preprocess=Preprocess(size=64))
    save_bundle(tmp_path / "b", bundle)
    expected = {"format": 1, "arch": {"variant": "paper", "num_classes": 4, "aux_logits": True, "width": 0.125,
                                      "dropout": None, "aux_dropout": 0.7},
                "task": "det200", "members": ["member0.safetensors", "member1.safetensors"],
                "preprocess": {"size": 64, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
                "multibox": None,
                "provenance": {"source": "random-init", "seed": 0, "member_seeds": [0, 1], "det_ids": [1, 2, 3]}}
    assert (tmp_path / "b" / "model.json").read_text() == json.dumps(expected, indent=2) + "\n"
    loaded = load_bundle(tmp_path / "b")
    assert loaded.member_sizes is None and loaded.input_sizes == [64, 64]
    save_bundle(tmp_path / "again", loaded)
    for name in ("model.json", "member0.safetensors", "member1.safetensors"):
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    merged = merge_bundles([tiny_bundle(width=0.125, size=64), tiny_bundle(width=0.125, size=64, seed=1)])
    assert merged.member_sizes is None
    save_bundle(tmp_path / "merged", merged)
    assert "member_sizes" not in json.loads((tmp_path / "merged" / "model.json").read_text())


@pytest.mark.parametrize("sizes, message", [
    ("64,96,64", "member_sizes must be a list of 3 whole numbers in 32..1024"),
    ([64, 96], "member_sizes must be a list of 3 whole numbers"),
    ([64, 96, True], "member_sizes must be a list of 3 whole numbers"),
    ([64, 96.0, 64], "member_sizes must be a list of 3 whole numbers"),
    ([64, 2048, 64], r"member_sizes must be a list of 3 whole numbers in 32\.\.1024"),
    ([64, 16, 64], r"member_sizes must be a list of 3 whole numbers in 32\.\.1024"),
    ([96, 64, 64], "member_sizes starts with 96, preprocess size is 64"),
])
def test_bad_member_sizes_are_refused_clearly(tmp_path, tiny_bundle, sizes, message):
    save_bundle(tmp_path, mixed_sizes(tiny_bundle))
    doc = json.loads((tmp_path / "model.json").read_text())
    doc["member_sizes"] = sizes
    (tmp_path / "model.json").write_text(json.dumps(doc))
    with pytest.raises(BundleError, match=f"model.json: {message}"):
        load_bundle(tmp_path)
    bundle = mixed_sizes(tiny_bundle)
    bundle.member_sizes = sizes  # nor is such a bundle written
    with pytest.raises(BundleError, match=message):
        save_bundle(tmp_path / "out", bundle)
    assert not (tmp_path / "out").exists()
