"""`ircnn model ...` as a user runs it: bundles, Table 1 summary, what --backend auto chose."""

import json

import torch
import torchvision

from detector.bundle.format import save_bundle


def test_model_summary_json_gives_exact_counts_beside_table1(run):
    code, out, _ = run("model", "summary", "--variant", "paper", "--json")
    assert code == 0
    doc = json.loads(out)
    row = next(r for r in doc["rows"] if r["name"] == "inception (3a)")
    assert (row["params"], row["macs"], row["table_params"], row["table_macs"]) == (163_328, 128_049_152, 159_000,
                                                                                     128_000_000)
    assert row["output"] == [28, 28, 256] and row["depth"] == 2
    code, out, _ = run("model", "summary")
    assert "inception (5b)" in out and "6,990,272" in out


def test_import_torchvision_cli_gives_torchvision_logits(tmp_path, run, spread):
    torch.manual_seed(0)
    tv = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=True)
    spread(tv, 7)
    torch.save(tv.state_dict(), tmp_path / "googlenet.pth")
    code, out, _ = run("model", "import-torchvision", tmp_path / "googlenet.pth", "--out", tmp_path / "b",
                       "--json")
    assert code == 0 and json.loads(out)["arch"]["variant"] == "torchvision"
    code, out, _ = run("model", "info", tmp_path / "b", "--json")
    info = json.loads(out)
    assert info["members"] == 1 and info["task"] == "cls1000"
    from detector.bundle.format import load_bundle

    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        diff = (tv.eval()(x) - load_bundle(tmp_path / "b").members[0](x)).abs().max().item()
    assert diff < 1e-4


def test_model_init_and_info_text(tmp_path, run):
    code, out, _ = run("model", "init", "--out", tmp_path / "b", "--members", 2, "--width", 0.125,
                       "--seed", 3)
    assert code == 0 and "2 x" in out
    code, out, _ = run("model", "info", tmp_path / "b")
    assert code == 0 and "member_seeds" in out and "[3, 4]" in out
    code, _, err = run("model", "info", tmp_path / "nothing")
    assert code == 2 and "a directory with model.json" in err and "ircnn model import-efficientnet-lite" in err
    assert f"{tmp_path / 'nothing'} does not exist; check the path" in err  # a typo, not a missing bundle
    (tmp_path / "empty").mkdir()
    code, _, err = run("model", "info", tmp_path / "empty")
    assert code == 2 and "is not a model bundle (no model.json)" in err and "check the path" not in err
    code, _, err = run("model", "init", "--out", tmp_path / "c", "--members", 0)
    assert code == 2 and "--members" in err


def test_model_info_backends_says_what_auto_chose_and_why(tmp_path, run, tiny_bundle, monkeypatch):
    """One measurement per member architecture (two identical members: one block), every candidate's images/s,
    the choice marked; the second call reads the cache."""
    from detector.runtimes import auto as autobackend

    monkeypatch.setenv("IRCNN_CACHE_DIR", str(tmp_path / "cache"))
    speed = {"torch fp32": 5.0, "torch fp32 channels_last": 7.5, "onnxruntime fp32": 21.4, "openvino fp32": 12.3}
    probs = torch.softmax(torch.randn(8, 1000), 1)
    monkeypatch.setattr(autobackend, "build_runner", lambda c, *args: c)
    monkeypatch.setattr(autobackend, "measure", lambda c, pixels: (probs, speed[c.name]))
    monkeypatch.setattr(autobackend, "time_batch", lambda c, pixels: pixels.shape[0] / speed[c.name])
    monkeypatch.setattr(autobackend, "installed", lambda backend: True)
    save_bundle(tmp_path / "b", tiny_bundle(members=2, width=0.125))
    code, out, err = run("model", "info", tmp_path / "b", "--backends")
    assert code == 0, err
    assert "members     2 x GoogLeNet (paper, width 0.125)" in out
    assert out.count("backend auto, GoogLeNet (paper, width 0.125): onnxruntime fp32\n") == 1
    assert "* onnxruntime fp32" in out and "21.4 images/s" in out and "4.28x torch fp32" in out
    code, out, err = run("model", "info", tmp_path / "b", "--backends", "--json")
    assert code == 0, err
    (doc,) = json.loads(out)["backends"]
    assert doc["backend"] == "onnxruntime" and doc["cached"] and len(doc["measurements"]) == 4


def test_merge_of_different_input_sizes_and_its_info(tmp_path, run, tiny_bundle):
    save_bundle(tmp_path / "a", tiny_bundle(width=0.125, size=64))
    save_bundle(tmp_path / "b", tiny_bundle(width=0.125, size=96, seed=1))
    code, out, err = run("model", "merge", tmp_path / "a", tmp_path / "b", "--out", tmp_path / "ab")
    assert code == 0, err
    code, out, err = run("model", "info", tmp_path / "ab")
    assert code == 0, err
    assert "member 0    GoogLeNet (paper, width 0.125), 550,066 parameters, 64 px input" in out
    assert "member 1    GoogLeNet (paper, width 0.125), 550,066 parameters, 96 px input" in out
    assert "preprocess  64/96 px (each member's own), mean" in out
    code, out, err = run("model", "info", tmp_path / "ab", "--json")
    assert json.loads(out)["member_sizes"] == [64, 96]


def test_quantize_refuses_a_region_count_it_cannot_calibrate_on_at_once(tmp_path, run):
    from detector.runtimes.calibrate import CALIBRATION_BATCH, MAX_REGIONS, MIN_REGIONS
    from service.cli.model import QUANTIZE_REGIONS

    assert QUANTIZE_REGIONS == (MIN_REGIONS, MAX_REGIONS) and MIN_REGIONS >= CALIBRATION_BATCH
    (tmp_path / "img").mkdir()
    for regions in (16, 19, 5001):
        code, _, err = run("model", "quantize", tmp_path / "no-bundle-needed", "--images", tmp_path / "img",
                           "--regions", regions)
        assert code == 2 and f"--regions must be in 20..5000 (calibration runs in batches of 20), got {regions}" in err
