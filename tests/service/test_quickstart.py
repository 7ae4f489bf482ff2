"""`ircnn quickstart`'s plan and report (the full run takes minutes and is not part of the suite)."""

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
