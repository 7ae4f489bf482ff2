"""The CLI as a user runs it: model bundles, Table 1 summary, classification of files."""

import json

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from detector.bundle import save_bundle
from service.cli import main


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def json_lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_model_summary_json_gives_exact_counts_beside_table1(capsys):
    code, out, _ = run(capsys, "model", "summary", "--variant", "paper", "--json")
    assert code == 0
    doc = json.loads(out)
    row = next(r for r in doc["rows"] if r["name"] == "inception (3a)")
    assert (row["params"], row["macs"], row["table_params"], row["table_macs"]) == (163_328, 128_049_152, 159_000,
                                                                                     128_000_000)
    assert row["output"] == [28, 28, 256] and row["depth"] == 2
    code, out, _ = run(capsys, "model", "summary")
    assert "inception (5b)" in out and "6,990,272" in out


def test_import_torchvision_cli_gives_torchvision_logits(tmp_path, capsys, spread):
    torch.manual_seed(0)
    tv = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=True)
    spread(tv, 7)
    torch.save(tv.state_dict(), tmp_path / "googlenet.pth")
    code, out, _ = run(capsys, "model", "import-torchvision", tmp_path / "googlenet.pth", "--out", tmp_path / "b",
                       "--json")
    assert code == 0 and json.loads(out)["arch"]["variant"] == "torchvision"
    code, out, _ = run(capsys, "model", "info", tmp_path / "b", "--json")
    info = json.loads(out)
    assert info["members"] == 1 and info["task"] == "cls1000"
    from detector.bundle import load_bundle

    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        diff = (tv.eval()(x) - load_bundle(tmp_path / "b").members[0](x)).abs().max().item()
    assert diff < 1e-4


def test_model_init_and_info_text(tmp_path, capsys):
    code, out, _ = run(capsys, "model", "init", "--out", tmp_path / "b", "--members", 2, "--width", 0.125,
                       "--seed", 3)
    assert code == 0 and "2 x" in out
    code, out, _ = run(capsys, "model", "info", tmp_path / "b")
    assert code == 0 and "member_seeds" in out and "[3, 4]" in out
    code, _, err = run(capsys, "model", "info", tmp_path / "nothing")
    assert code == 2 and "no model.json" in err and "ircnn model init" in err
    assert f"{tmp_path / 'nothing'} does not exist; check the path" in err  # a typo, not a missing bundle
    (tmp_path / "empty").mkdir()
    code, _, err = run(capsys, "model", "info", tmp_path / "empty")
    assert code == 2 and "is not a model bundle (no model.json)" in err and "check the path" not in err
    code, _, err = run(capsys, "model", "init", "--out", tmp_path / "c", "--members", 0)
    assert code == 2 and "--members" in err


@pytest.fixture
def image_dir(tmp_path):
    rng = np.random.default_rng(0)
    d = tmp_path / "images"
    (d / "sub").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)).save(d / "good.jpg")
    Image.fromarray(rng.integers(0, 256, (90, 70), dtype=np.uint8)).save(d / "sub" / "gray.png")
    (d / "broken.jpg").write_bytes((d / "good.jpg").read_bytes()[:400])
    (d / "text.png").write_text("not an image")
    return d


def test_classify_144_crops_with_three_members(tmp_path, capsys, tiny_bundle, image_dir):
    save_bundle(tmp_path / "b", tiny_bundle(members=3, width=0.125))
    code, out, err = run(capsys, "classify", image_dir / "good.jpg", "--model", tmp_path / "b", "--crops", 144,
                         "--top-k", 1000, "--json")
    assert code == 0, err
    (result,) = json_lines(out)
    assert result["crops"] == 144 and result["members"] == 3
    probs = [t["prob"] for t in result["top_k"]]
    assert len(probs) == 1000 and sum(probs) == pytest.approx(1.0, abs=1e-4) and min(probs) >= 0
    assert probs == sorted(probs, reverse=True)
    assert len({t["index"] for t in result["top_k"]}) == 1000


def test_classify_directory_with_broken_files(tmp_path, capsys, tiny_bundle, image_dir):
    save_bundle(tmp_path / "b", tiny_bundle(width=0.125))
    code, out, err = run(capsys, "classify", image_dir, "--model", tmp_path / "b", "--json")
    assert code == 1  # some files failed
    results = {r["image"].rsplit("/", 1)[-1]: r for r in json_lines(out)}
    assert set(results) == {"good.jpg", "gray.png", "broken.jpg", "text.png"}
    assert len(results["good.jpg"]["top_k"]) == 5 and len(results["gray.png"]["top_k"]) == 5
    assert "truncated" in results["broken.jpg"]["error"]
    assert "not a supported image" in results["text.png"]["error"]
    code, out, err = run(capsys, "classify", image_dir, "--model", tmp_path / "b")
    assert "good.jpg (1 crops x 1 members)" in out and "broken.jpg: error" in err


def test_classify_without_model_offline_says_what_to_do(tmp_path, capsys, monkeypatch, image_dir):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    code, _, err = run(capsys, "classify", image_dir / "good.jpg")
    assert code == 2
    assert "googlenet-1378be20.pth" in err and str(tmp_path / "torch") in err and "--model" in err
    assert "https://download.pytorch.org/models/googlenet-1378be20.pth" in err  # to fetch on another machine


def test_classify_rejects_bad_arguments(tmp_path, capsys, tiny_bundle, image_dir):
    code, _, err = run(capsys, "classify", image_dir / "good.jpg", "--top-k", 0)
    assert code == 2 and "--top-k" in err
    with pytest.raises(SystemExit):
        main(["classify", str(image_dir / "good.jpg"), "--crops", "7"])
    (tmp_path / "empty").mkdir()
    code, _, err = run(capsys, "classify", tmp_path / "empty")
    assert code == 2 and "no images found" in err
    save_bundle(tmp_path / "b", tiny_bundle(width=0.125))
    code, _, err = run(capsys, "classify", tmp_path / "missing.jpg", "--model", tmp_path / "b")
    assert code == 2 and "no such file" in err  # a usage error, before the model loads


def test_parser_is_light_and_agrees_with_the_model():
    import subprocess
    import sys

    from detector.efficientnet_lite import VARIANTS as LITE_VARIANTS
    from detector.googlenet import VARIANTS
    from service import cli

    assert cli.VARIANTS == VARIANTS and cli.LITE_VARIANTS == LITE_VARIANTS
    code = "import sys, service.cli as c; c.build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"  # `ircnn data synth` and `ircnn eval` start without loading torch


def test_help_and_usage_errors_import_nothing_heavy():
    """`ircnn --help`, every `--help` and a usage error answer without torch, OpenCV, NumPy, FastAPI, Ray or ONNX
    (each costs seconds on a loaded machine); the literals that make this possible agree with the code."""
    import subprocess
    import sys

    from eval.classes import det200
    from eval.synth import MAX_IMAGES
    from eval.synth_photos import CLASSES
    from service import cli

    assert cli.SYNTH_MAX_IMAGES == MAX_IMAGES and len(cli.SYNTH_CLASSES) == len(CLASSES)
    for short, c in zip(cli.SYNTH_CLASSES, CLASSES):
        assert short in det200().names[det200().row_of_wnid[c.wnid]], (short, c.wnid)
    heavy = ("torch", "cv2", "numpy", "fastapi", "ray", "onnx", "onnxruntime", "openvino", "PIL")
    probe = ("import sys, service.cli as c\n"
             "try:\n    c.main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
             f"print([m for m in {heavy!r} if m in sys.modules])")
    for argv in ([], ["--help"], ["detect", "--help"], ["eval", "det", "--help"], ["serve", "--help"],
                 ["detect", "x.jpg", "--score-threshold", "2"], ["classify"], ["bogus"]):
        got = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True)
        assert got.stdout.strip().splitlines()[-1] == "[]", (argv, got.stdout, got.stderr)


def test_help_texts_stand_alone():
    """No help text sends a user to a file that ships only to developers, or promises what is already there."""
    import argparse

    from service.cli import build_parser

    def helps(parser):
        yield parser.format_help()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield from helps(sub)

    texts = list(helps(build_parser()))
    assert len(texts) >= 20  # every command and subcommand
    for text in texts:
        assert "DESIGN" not in text and "shared/" not in text and "settings.py" not in text, text
        assert "later" not in text, text


def test_missing_image_is_a_usage_error_before_the_model_loads(tmp_path, capsys, monkeypatch):
    """A missing path fails at once, naming it, before torch and the model: the model path below is wrong too,
    and the message is about the image."""
    import detector.bundle

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the paths were checked")

    monkeypatch.setattr(detector.bundle, "resolve_bundle", no_loading)
    (tmp_path / "here.jpg").write_bytes(b"")
    for command in ("classify", "detect", "proposals"):
        code, out, err = run(capsys, command, tmp_path / "here.jpg", tmp_path / "missing.jpg", "--model",
                             tmp_path / "no-model")
        assert code == 2 and out == "", (command, err)
        assert err.strip() == f"ircnn: error: no such file or directory: {tmp_path / 'missing.jpg'}; check the path"


def test_model_info_backends_says_what_auto_chose_and_why(tmp_path, capsys, tiny_bundle, monkeypatch):
    """One measurement per member architecture (two identical members: one block), every candidate's images/s,
    the choice marked; the second call reads the cache."""
    from detector import autobackend

    monkeypatch.setenv("IRCNN_CACHE_DIR", str(tmp_path / "cache"))
    speed = {"torch fp32": 5.0, "torch fp32 channels_last": 7.5, "onnxruntime fp32": 21.4, "openvino fp32": 12.3}
    probs = torch.softmax(torch.randn(8, 1000), 1)
    monkeypatch.setattr(autobackend, "build_runner", lambda c, *args: c)
    monkeypatch.setattr(autobackend, "measure", lambda c, pixels: (probs, speed[c.name]))
    monkeypatch.setattr(autobackend, "time_batch", lambda c, pixels: pixels.shape[0] / speed[c.name])
    monkeypatch.setattr(autobackend, "installed", lambda backend: True)
    save_bundle(tmp_path / "b", tiny_bundle(members=2, width=0.125))
    code, out, err = run(capsys, "model", "info", tmp_path / "b", "--backends")
    assert code == 0, err
    assert "members     2 x GoogLeNet (paper, width 0.125)" in out
    assert out.count("backend auto, GoogLeNet (paper, width 0.125): onnxruntime fp32\n") == 1
    assert "* onnxruntime fp32" in out and "21.4 images/s" in out and "4.28x torch fp32" in out
    code, out, err = run(capsys, "model", "info", tmp_path / "b", "--backends", "--json")
    assert code == 0, err
    (doc,) = json.loads(out)["backends"]
    assert doc["backend"] == "onnxruntime" and doc["cached"] and len(doc["measurements"]) == 4
