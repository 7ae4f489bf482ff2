"""The parser as a whole: light to build, help texts that stand alone, usage errors before any model loads."""


def test_parser_is_light_and_agrees_with_the_model(run):
    import subprocess
    import sys

    from detector.config import BACKENDS
    from detector.nets.efficientnet_lite import VARIANTS as LITE_VARIANTS
    from detector.nets.googlenet import VARIANTS
    from service.cli import common

    assert common.VARIANTS == VARIANTS and common.LITE_VARIANTS == LITE_VARIANTS
    assert common.backend_choices() == ("auto",) + BACKENDS
    code = "import sys, service.cli as c; c.build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"  # `ircnn data synth` and `ircnn eval` start without loading torch


def test_help_and_usage_errors_import_nothing_heavy(run):
    """`ircnn --help`, every `--help` and a usage error answer without torch, OpenCV, NumPy, FastAPI, Ray or ONNX
    (each costs seconds on a loaded machine); the literals that make this possible agree with the code."""
    import subprocess
    import sys

    from eval.classes import det200
    from eval.synth_config import MAX_IMAGES
    from eval.synth_photos import CLASSES
    from service.cli import data

    assert data.SYNTH_MAX_IMAGES == MAX_IMAGES and len(data.SYNTH_CLASSES) == len(CLASSES)
    for short, c in zip(data.SYNTH_CLASSES, CLASSES):
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


def test_missing_image_is_a_usage_error_before_the_model_loads(tmp_path, run, monkeypatch):
    """A missing path fails at once, naming it, before torch and the model: the model path below is wrong too,
    and the message is about the image."""
    import detector.bundle.importers

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the paths were checked")

    monkeypatch.setattr(detector.bundle.importers, "resolve_bundle", no_loading)
    (tmp_path / "here.jpg").write_bytes(b"")
    for command in ("classify", "detect", "proposals"):
        code, out, err = run(command, tmp_path / "here.jpg", tmp_path / "missing.jpg", "--model",
                             tmp_path / "no-model")
        assert code == 2 and out == "", (command, err)
        assert err.strip() == f"ircnn: error: no such file or directory: {tmp_path / 'missing.jpg'}; check the path"


def test_a_config_error_names_the_flag():
    from service.cli.common import flag_error

    e = ValueError("max_regions must be in 1..3000, got 0")
    assert str(flag_error(e, "nms_iou", "max_regions")) == "--max-regions must be in 1..3000, got 0"
    assert str(flag_error(e, "nms_iou")) == "max_regions must be in 1..3000, got 0"  # not a flag of this command


def test_the_provenance_line_stays_short():
    from service.cli.common import short_provenance

    long = {"source": "efficientnet-lite0", "det_ids": list(range(1, 201)), "trained": {"steps": 220, "lr": 0.001}}
    line = short_provenance(long)
    assert len(line) <= 100 and line.startswith('source "efficientnet-lite0", det_ids [1, 2,') and "--json" in line
    assert short_provenance({"seed": 0}) == "seed 0" and short_provenance({}) == "none"


def test_a_reader_that_goes_away_is_no_error(tmp_path, tiny_bundle):
    """`ircnn model info M | head -1`: no 'Broken pipe' error and no traceback when the reader stops reading."""
    import subprocess
    import sys

    from detector.bundle.format import save_bundle

    save_bundle(tmp_path / "m", tiny_bundle(width=0.125))
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "model", "info", str(tmp_path / "m")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the first line
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert "Broken pipe" not in err and "Traceback" not in err and "Exception ignored" not in err, err
