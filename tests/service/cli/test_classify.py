"""`ircnn classify` as a user runs it: classification of files and directories."""

import json

import numpy as np
import pytest
from PIL import Image

from detector.bundle.format import save_bundle
from service.cli import main


def json_lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


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


def test_classify_144_crops_with_three_members(tmp_path, run, tiny_bundle, image_dir):
    save_bundle(tmp_path / "b", tiny_bundle(members=3, width=0.125))
    code, out, err = run("classify", image_dir / "good.jpg", "--model", tmp_path / "b", "--crops", 144, "--backend", "torch",
                         "--top-k", 1000, "--json")
    assert code == 0, err
    (result,) = json_lines(out)
    assert result["crops"] == 144 and result["members"] == 3
    probs = [t["prob"] for t in result["top_k"]]
    assert len(probs) == 1000 and sum(probs) == pytest.approx(1.0, abs=1e-4) and min(probs) >= 0
    assert probs == sorted(probs, reverse=True)
    assert len({t["index"] for t in result["top_k"]}) == 1000


def test_classify_directory_with_broken_files(tmp_path, run, tiny_bundle, image_dir):
    save_bundle(tmp_path / "b", tiny_bundle(width=0.125))
    code, out, err = run("classify", image_dir, "--model", tmp_path / "b", "--json")
    assert code == 1  # some files failed
    results = {r["image"].rsplit("/", 1)[-1]: r for r in json_lines(out)}
    assert set(results) == {"good.jpg", "gray.png", "broken.jpg", "text.png"}
    assert len(results["good.jpg"]["top_k"]) == 5 and len(results["gray.png"]["top_k"]) == 5
    assert "truncated" in results["broken.jpg"]["error"]
    assert "not a supported image" in results["text.png"]["error"]
    code, out, err = run("classify", image_dir, "--model", tmp_path / "b")
    assert "good.jpg (1 crops x 1 members)" in out and "broken.jpg: error" in err


def test_classify_without_model_offline_says_what_to_do(tmp_path, run, monkeypatch, image_dir):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    code, _, err = run("classify", image_dir / "good.jpg")
    assert code == 2
    assert "googlenet-1378be20.pth" in err and str(tmp_path / "torch") in err and "--model" in err
    assert "https://download.pytorch.org/models/googlenet-1378be20.pth" in err  # to fetch on another machine
    # the route that works offline comes first
    assert err.index("ircnn model import-efficientnet-lite") < err.index("ircnn model import-torchvision")
    assert "ircnn quickstart" in err


def test_classify_rejects_bad_arguments(tmp_path, run, tiny_bundle, image_dir):
    code, _, err = run("classify", image_dir / "good.jpg", "--top-k", 0)
    assert code == 2 and "--top-k" in err
    with pytest.raises(SystemExit):
        main(["classify", str(image_dir / "good.jpg"), "--crops", "7"])
    (tmp_path / "empty").mkdir()
    code, _, err = run("classify", tmp_path / "empty")
    assert code == 2 and "no images found" in err
    save_bundle(tmp_path / "b", tiny_bundle(width=0.125))
    code, _, err = run("classify", tmp_path / "missing.jpg", "--model", tmp_path / "b")
    assert code == 2 and "no such file" in err  # a usage error, before the model loads
