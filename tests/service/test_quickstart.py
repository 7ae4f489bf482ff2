"""`ircnn quickstart`: its plan, its report, and one whole run as small as it goes (the full-size run takes minutes
and is not part of the suite)."""

from service.cli import build_parser
from service.quickstart import QuickstartConfig, report, steps


def test_report_suggests_only_what_the_bundle_can_do(tmp_path):
    result = {"out": str(tmp_path), "seconds": {"data synth": 1.0, "detect": 2.0},
              "eval": {"map": 0.5, "classes": [{"name": "person", "ap": 0.5, "positives": 3, "detections": 9}]},
              "vis": {"dir": str(tmp_path / "vis"), "pictures": 40, "boxes": 475, "threshold": 0.3}}
    text = report(result)
    assert "475 boxes at score >= 0.3 on 40 pictures" in text
    model = tmp_path / "model"
    assert f"ircnn detect YOUR_PHOTOS/ --model {model}" in text
    # the bundle is a det200 detector: the page detects, and classification is said to be unavailable
    assert f"ircnn serve --model {model}" in text and "detection only" in text
    assert "/v1/classify is not available" in text


def test_every_step_is_a_command_the_parser_takes(tmp_path):
    parser = build_parser()
    for _, argv in steps(tmp_path, QuickstartConfig()):
        parser.parse_args(argv)  # SystemExit (a test failure) on an unknown flag


def test_quickstart_fine_tunes_real_weights_for_a_fixed_number_of_steps(tmp_path):
    plan = dict((argv[0] + " " + argv[1], argv) for _, argv in steps(tmp_path, QuickstartConfig(detector_steps=77)))
    train = plan["train detector"]
    assert train[train.index("--iterations") + 1] == "77" and "--max-minutes" not in train  # steps, not minutes
    imported = plan["model import-efficientnet-lite"]
    assert train[train.index("--from") + 1] == imported[imported.index("--out") + 1]  # R-CNN: pretrained start


def test_a_model_that_has_not_learnt_is_named(tmp_path):
    from service.quickstart import not_learnt

    dets = tmp_path / "d.txt"
    dets.write_text("1 59 0.2007 0 0 10 10\n2 59 0.2007 5 5 20 20\n")
    problems = not_learnt({"map": 0.0}, dets, 0.3)
    assert any("under 0.3" in p for p in problems) and any("one class" in p or "same for every region" in p
                                                          for p in problems)
    dets.write_text("1 59 0.9 0 0 10 10\n2 124 0.4 5 5 20 20\n")
    assert not_learnt({"map": 0.6}, dets, 0.3) == []
    dets.write_text("")
    assert "detected nothing" in not_learnt({"map": 0.0}, dets, 0.3)[-1]


def test_a_tiny_quickstart_runs_every_step_from_real_weights_and_says_it_has_not_learnt(tmp_path, capsys,
                                                                                       monkeypatch):
    """The whole quickstart, as small as it goes (20 images, 2 fine-tuning steps, about 45 s on 2 cores): every
    step runs as the ircnn command it prints, the detector is fine-tuned from the EfficientNet-Lite0 ImageNet
    weights for exactly the steps asked, long steps print plain progress lines where output is no terminal, and a
    model that has not learnt ends with exit code 1 saying so."""
    from detector import progress
    from detector.bundle.format import load_bundle
    from service.cli import main

    monkeypatch.setattr(progress, "INTERVAL_S", 0.0)  # a line at every update: the log's 30 s, compressed
    out = tmp_path / "q"
    code = main(["quickstart", "--out", str(out), "--images", "20", "--classes", "1", "--size", "32", "--steps", "2",
                 "--multibox-epochs", "1"])
    stdout, stderr = capsys.readouterr()
    assert code == 1 and "THE MODEL HAS NOT LEARNT" in stderr
    assert all(f"[{i}/6]" in stdout for i in range(1, 7))
    assert "proposals: 16/16 img" in stderr and "member 0 epoch 1: 2/" in stderr  # plain progress lines
    provenance = load_bundle(out / "model").provenance
    assert provenance["init"] == str(out / "imagenet-lite0") and "step 2/2" in stdout
    assert load_bundle(out / "imagenet-lite0").provenance["source"] == "import-efficientnet-lite"
    assert (out / "detections.txt").exists() and (out / "eval.json").exists()
