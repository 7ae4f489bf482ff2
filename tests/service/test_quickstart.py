"""`ircnn quickstart`'s plan and report (the full run takes minutes and is not part of the suite)."""

from service.cli import build_parser
from service.quickstart import QuickstartConfig, report, steps


def test_report_suggests_only_what_the_bundle_can_do(tmp_path):
    result = {"out": str(tmp_path), "seconds": {"data synth": 1.0, "detect": 2.0},
              "eval": {"map": 0.5, "classes": [{"name": "person", "ap": 0.5, "positives": 3, "detections": 9}]}}
    text = report(result)
    model = tmp_path / "model"
    assert f"ircnn detect YOUR_PHOTOS/ --model {model}" in text
    # the bundle is a det200 detector: the page detects, and classification is said to be unavailable
    assert f"ircnn serve --model {model}" in text and "detection only" in text
    assert "/v1/classify is not available" in text


def test_every_step_is_a_command_the_parser_takes(tmp_path):
    parser = build_parser()
    for _, argv in steps(tmp_path, QuickstartConfig()):
        parser.parse_args(argv)  # SystemExit (a test failure) on an unknown flag
