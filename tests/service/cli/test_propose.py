"""`ircnn proposals` as a user runs it: per-image proposals and the coverage tool."""

import json

import numpy as np
import pytest
from PIL import Image

from eval.synth import SynthConfig, write_synth_set


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "set"
    write_synth_set(str(out), SynthConfig(images=4, seed=3, val_fraction=0.5, size=200))
    return out


def test_proposals_for_images_json_and_errors(tmp_path, run):
    rng = np.random.default_rng(0)
    image = np.zeros((120, 160, 3), np.uint8)
    image[20:70, 30:90] = (200, 30, 30)
    image[60:110, 90:150] = rng.integers(0, 255, (50, 60, 3))
    Image.fromarray(image).save(tmp_path / "a.png")
    (tmp_path / "b.jpg").write_bytes(b"nope")
    code, out, err = run("proposals", tmp_path / "a.png", tmp_path / "b.jpg", "--multibox", 0, "--json")
    assert code == 1
    first, second = [json.loads(line) for line in out.splitlines()]
    assert (first["width"], first["height"]) == (160, 120) and first["seconds"] > 0
    assert first["proposals"] and {p["source"] for p in first["proposals"]} == {"selective_search"}
    boxes = np.array([p["box"] for p in first["proposals"]])
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= 160).all() and (boxes[:, 3] <= 120).all()
    assert any(abs(b[0] - 30) <= 2 and abs(b[1] - 20) <= 2 and abs(b[2] - 90) <= 2 and abs(b[3] - 70) <= 2
               for b in boxes)  # the red rectangle is proposed
    assert "not a supported image" in second["error"]


def test_proposals_argument_errors(tmp_path, run):
    code, _, err = run("proposals", tmp_path / "x.png", "--multibox", 200)
    assert code == 2 and "no MultiBox network" in err
    code, _, err = run("proposals", tmp_path / "x.png", "--selective-search", "off", "--multibox", 0)
    assert code == 2 and "nothing to propose" in err
    code, _, err = run("proposals", "--eval", "--multibox", 0)
    assert code == 2 and "--annotations" in err
    code, _, err = run("proposals", "--multibox", 0)
    assert code == 2 and "give images" in err


def test_coverage_tool_on_a_synthetic_set(small_set, tmp_path, run):
    code, out, err = run("proposals", "--eval", "--annotations", small_set / "Annotations" / "DET",
                         "--imageset", small_set / "ImageSets" / "DET" / "val.txt", "--multibox", 0, "--json",
                         "--plots", tmp_path / "plots")
    assert code == 0, err
    doc = json.loads(out)
    rows = {r["mode"]: r for r in doc["modes"]}
    assert set(rows) == {"SS 1x", "SS 2x"} and doc["images"] == 2
    for r in rows.values():
        assert 0 <= r["coverage"] <= 1 and r["recall_0.7"] <= r["coverage"] and 0 <= r["abo"] <= 1
        assert r["objects"] == rows["SS 1x"]["objects"] and r["seconds_per_image"] > 0
    assert rows["SS 2x"]["proposals_per_image"] < rows["SS 1x"]["proposals_per_image"]
    assert (tmp_path / "plots" / "recall_vs_proposals.png").stat().st_size > 1000
