"""`ircnn detect` as a user runs it, end to end (tiny random networks, real selective search): output formats,
resume after a crash, drawn copies, the flags that reach the detector."""

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from eval.annotations import ImageLookup
from eval.boxes import to_devkit_ints
from eval.coco import read_coco_gt, read_coco_results
from eval.predictions import read_predictions
from eval.records import read_jsonl_detections
from eval.submission import read_submission
from service import batch
from service.journal import repair_journal


def read_lines(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def scene(rng, h, w):
    """A few flat rectangles on a flat background: real images for selective search, few proposals."""
    img = np.empty((h, w, 3), np.uint8)
    img[:] = rng.integers(0, 256, 3)
    for _ in range(3):
        x, y = rng.integers(0, w - 20), rng.integers(0, h - 20)
        img[y:y + rng.integers(15, h // 2), x:x + rng.integers(15, w // 2)] = rng.integers(0, 256, 3)
    return img


@pytest.fixture
def image_dir(tmp_path):
    """JPEG, PNG, grayscale PNG, RGBA PNG (nested) and a truncated JPEG."""
    rng = np.random.default_rng(0)
    d = tmp_path / "images"
    (d / "sub" / "deeper").mkdir(parents=True)
    Image.fromarray(scene(rng, 120, 160)).save(d / "a.jpg", quality=92)
    Image.fromarray(scene(rng, 100, 140)).save(d / "b.png")
    Image.fromarray(scene(rng, 90, 120)[..., 0]).save(d / "sub" / "gray.png")
    rgba = np.dstack([scene(rng, 110, 100), np.full((110, 100), 200, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(d / "sub" / "deeper" / "rgba.png")
    (d / "broken.jpg").write_bytes((d / "a.jpg").read_bytes()[:300])
    return d


ORDER = ["a.jpg", "b.png", "broken.jpg", "sub/deeper/rgba.png", "sub/gray.png"]  # list_images: sorted, recursive
GOOD = [name for name in ORDER if name != "broken.jpg"]


@pytest.fixture
def model(tmp_path, tiny_bundle):
    """A random det200-from-cls1000 bundle of one narrow member on 64 px regions (fast; the pooling adapts)."""
    from detector.bundle.format import Preprocess, save_bundle

    bundle = tiny_bundle(width=0.125, task="det200-from-cls1000")
    bundle.preprocess = Preprocess(size=64, mean=bundle.preprocess.mean, std=bundle.preprocess.std)
    save_bundle(tmp_path / "model", bundle)
    return tmp_path / "model"


def names_of(records, root):
    return [os.path.relpath(r["image"], root) for r in records]


def test_parser_literals_agree_with_the_code():
    from detector.config import DetectConfig
    from service.cli import detect

    assert detect.DETECT_FORMATS == batch.FORMATS
    assert {k: getattr(DetectConfig(), k) for k in detect.DETECT_DEFAULTS} == detect.DETECT_DEFAULTS


def test_detect_directory_jsonl_with_an_error_line_and_exit_code_1(tmp_path, run, model, image_dir):
    out_file = tmp_path / "out.jsonl"
    code, out, err = run("detect", image_dir, "--model", model, "--max-detections", 5, "--out", out_file)
    assert code == 1, err
    assert "detected 5 images" in out and "1 failed" in out and f"wrote {out_file} (jsonl)" in out
    assert "broken.jpg: error: image data is truncated" in err
    records = read_lines(out_file)
    assert names_of(records, image_dir) == ORDER  # input order, nested folders found
    assert set(records[2]) == {"image", "error"}
    sizes = {"a.jpg": (160, 120), "b.png": (140, 100), "sub/gray.png": (120, 90), "sub/deeper/rgba.png": (100, 110)}
    for r in records[:2] + records[3:]:
        assert (r["width"], r["height"]) == sizes[os.path.relpath(r["image"], image_dir)]
        assert 1 <= len(r["detections"]) <= 5
        for d in r["detections"]:
            x1, y1, x2, y2 = d["box"]
            assert 0 <= x1 < x2 <= r["width"] and 0 <= y1 < y2 <= r["height"] and 0.01 <= d["score"] <= 1
    dets, failed = read_jsonl_detections(str(out_file), ImageLookup({}))  # eval's reader accepts it
    assert len(failed) == 1 and len(dets) == sum(len(r.get("detections", ())) for r in records)

    # the per-image function a Ray actor calls gives the same records
    from detector.bundle.format import load_bundle
    from detector.config import DetectConfig
    from detector.pipeline.detector import Detector

    with Detector.from_bundle(load_bundle(model), DetectConfig(max_detections=5)) as detector:
        assert batch.detect_one(detector, records[3]["image"]) == records[3]
        assert batch.detect_one(detector, records[2]["image"]) == records[2]
        assert batch.detect_one(detector, image_dir / "missing.jpg")["error"].startswith("no such file")


def interrupt_after(monkeypatch, n):
    """Make the run stop with Ctrl-C as the networks start on image n + 1."""
    from detector.pipeline.detector import Detector

    calls = []
    real = Detector._finish

    def finish(detector, result, proposals):
        calls.append(1)
        if len(calls) > n:
            raise KeyboardInterrupt
        return real(detector, result, proposals)

    monkeypatch.setattr(Detector, "_finish", finish)


def test_resume_after_interruption_gives_the_uninterrupted_output(tmp_path, run, model, image_dir, monkeypatch):
    common = ["detect", image_dir, "--model", model, "--max-detections", 5]
    full, part = tmp_path / "full.json", tmp_path / "part.json"
    code, _, err = run(*common, "--format", "coco", "--out", full)
    assert code == 1, err
    results = read_coco_results(str(full), ImageLookup({}))
    imageset, _ = read_coco_gt(str(full) + ".images.json")
    assert imageset == {name: ORDER.index(name) + 1 for name in GOOD}  # ids: positions in the input list
    assert sorted(set(results.image.tolist())) == [1, 2, 4, 5] and 4 <= len(results) <= 20

    # coco: Ctrl-C after 2 images, then --resume
    with monkeypatch.context() as patch:
        interrupt_after(patch, 2)
        code, _, err = run(*common, "--format", "coco", "--out", part)
    assert code == 130 and "--resume" in err and not part.exists()
    assert len(read_lines(str(part) + ".partial.jsonl")) == 2
    code, out, err = run(*common, "--format", "coco", "--out", part, "--resume", "--json")
    assert code == 1 and json.loads(out)["skipped"] == 2 and json.loads(out)["detected"] == 3
    assert json.loads(part.read_text()) == json.loads(full.read_text())
    assert read_lines(str(part) + ".partial.jsonl") == read_lines(str(full) + ".partial.jsonl")

    # jsonl: a crash mid-line (the file cut inside its 4th line), then --resume
    lines = (tmp_path / "full.json.partial.jsonl").read_text().splitlines(keepends=True)
    cut = tmp_path / "cut.jsonl"
    cut.write_text("".join(lines[:3]) + lines[3][: len(lines[3]) // 2])
    code, out, err = run(*common, "--out", cut, "--resume")
    assert code == 1 and "skipped 3 images" in out and "(1 of them failed)" in out
    assert cut.read_text() == "".join(lines)
    code, out, _ = run(*common, "--out", cut, "--resume")  # nothing left to do
    assert code == 1 and "detected 0 images" in out and cut.read_text() == "".join(lines)


def test_ilsvrc_submission_scores_with_eval_det(tmp_path, run, model):
    from eval.synth import SynthConfig, write_synth_set

    root = tmp_path / "synth"
    write_synth_set(str(root), SynthConfig(images=3, val_fraction=1.0, size=128))
    val = root / "ImageSets" / "DET" / "val.txt"
    sub = tmp_path / "sub.txt"
    code, _, err = run("detect", root / "Data" / "DET" / "val", "--model", model, "--format", "ilsvrc",
                       "--imageset", val, "--out", sub, "--max-detections", 10)
    assert code == 0, err
    code, out, err = run("eval", "det", "--annotations", root / "Annotations" / "DET", "--imageset", val,
                         "--predictions", sub, "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["images"] == 3 and doc["predictions_format"] == "ilsvrc" and 0 <= doc["map"] <= 1
    # image indices and devkit integers agree with the journal as `ircnn eval det` reads JSON lines
    submitted = read_submission(str(sub))
    journal = read_predictions(str(sub) + ".partial.jsonl", {n: i for i, n in
                                                            enumerate(["val/ILSVRC2014_synth_00000001",
                                                                       "val/ILSVRC2014_synth_00000002",
                                                                       "val/ILSVRC2014_synth_00000003"], 1)})
    assert 3 <= len(submitted) <= 30 and submitted.image.tolist() == journal.detections.image.tolist()
    assert submitted.det_id.tolist() == journal.detections.det_id.tolist()
    assert np.array_equal(to_devkit_ints(submitted.boxes), to_devkit_ints(journal.detections.boxes))
    # an image outside the imageset is refused before any work
    shutil.copy(root / "Data" / "DET" / "val" / "ILSVRC2014_synth_00000001.JPEG", tmp_path / "extra.jpg")
    code, _, err = run("detect", root / "Data" / "DET" / "val", tmp_path / "extra.jpg", "--model", model,
                       "--format", "ilsvrc", "--imageset", val, "--out", sub)
    assert code == 2 and "1 of 4 images are not in --imageset" in err


def test_save_vis_draws_boxes_on_copies_of_the_inputs(tmp_path, run, model, image_dir):
    from detector.image import read_image
    from service.vis import colour_of

    vis = tmp_path / "vis"
    code, out, err = run("detect", image_dir, "--model", model, "--max-detections", 3, "--save-vis", vis,
                         "--vis-threshold", 0, "--json")
    assert code == 1, err
    records = {os.path.relpath(r["image"], image_dir): r for r in map(json.loads, out.splitlines())}
    assert sorted(str(p.relative_to(vis)) for p in vis.rglob("*") if p.is_file()) == sorted(GOOD)
    for name in GOOD:
        copy = Image.open(vis / name)
        assert copy.format == ("JPEG" if name.endswith(".jpg") else "PNG") and copy.mode == "RGB"
        r = records[name]
        assert copy.size == (r["width"], r["height"])
        drawn, original = np.asarray(copy).astype(int), read_image(image_dir / name).astype(int)
        top = max(r["detections"], key=lambda d: d["score"])  # drawn last, on top
        x1, y1, x2, y2 = (int(round(v)) for v in top["box"])
        edge = drawn[(y1 + y2) // 2, max(x1, 0)]
        if name.endswith(".png"):
            assert edge.tolist() == list(colour_of(top["det_id"]))
        assert np.abs(drawn - original).max() > 40  # JPEG copies: boxes, not compression noise
    assert (image_dir / "a.jpg").read_bytes()[:300] == (image_dir / "broken.jpg").read_bytes()  # inputs untouched
    code, _, err = run("detect", image_dir, "--model", model, "--save-vis", image_dir)
    assert code == 2 and "files inside the --save-vis folder are left out" in err


def test_backend_and_cascade_flags_reach_the_detector(tmp_path, run, tiny_bundle, image_dir, monkeypatch):
    """`--backend onnxruntime` gives torch's detections (fp32, within 1e-4); `--cascade K` with one member changes
    nothing and with two members scores with member 0 outside each image's top K."""
    from detector.bundle.format import Preprocess, save_bundle

    monkeypatch.setenv("IRCNN_CACHE_DIR", str(tmp_path / "cache"))
    bundle = tiny_bundle(members=2, width=0.125, task="det200-from-cls1000")
    bundle.preprocess = Preprocess(size=64, mean=bundle.preprocess.mean, std=bundle.preprocess.std)
    model = save_bundle(tmp_path / "model", bundle)
    image = image_dir / "a.jpg"

    def detect(*flags):
        code, out, err = run("detect", image, "--model", model, "--score-threshold", 0, *flags)
        assert code == 0, err
        return json.loads(out)["detections"]

    reference = detect("--backend", "torch")  # (the default, auto, may export and measure)
    assert not (tmp_path / "cache").exists()
    onnx = detect("--backend", "onnxruntime")
    assert len(list((tmp_path / "cache").rglob("*.onnx"))) == 2  # both members exported: the flag took effect
    for got in (onnx, detect("--cascade", 3000)):
        assert [d["det_id"] for d in got] == [d["det_id"] for d in reference]
        np.testing.assert_allclose([d["score"] for d in got], [d["score"] for d in reference], atol=1e-4)
        np.testing.assert_allclose([d["box"] for d in got], [d["box"] for d in reference], atol=1e-3)
    cascaded = detect("--cascade", 1)  # only the best region gets member 1's opinion
    assert [d["score"] for d in cascaded] != [d["score"] for d in reference]
    code, _, err = run("detect", image, "--model", model, "--backend", "onnxruntime", "--precision", "bf16")
    assert code == 2 and "onnxruntime runs fp32 or int8" in err


def test_missing_path_is_a_usage_error_without_a_summary(tmp_path, run, model, image_dir):
    code, out, err = run("detect", image_dir / "a.jpg", tmp_path / "missing.jpg", "--model", model,
                         "--out", tmp_path / "o.jsonl")
    assert code == 2 and out == "" and "detected" not in err
    assert err.strip() == f"ircnn: error: no such file or directory: {tmp_path / 'missing.jpg'}; check the path"
    assert not (tmp_path / "o.jsonl").exists()  # no work, no output
    with pytest.raises(ValueError, match="no such file or directory"):  # the library says the same
        batch.run_batch(None, [str(tmp_path / "missing.jpg")], batch.BatchConfig())


def test_save_vis_says_how_many_boxes_it_drew_and_warns_when_none(tmp_path, run, model, image_dir):
    vis = tmp_path / "vis"
    common = ["detect", image_dir / "a.jpg", image_dir / "b.png", "--model", model, "--save-vis", vis]
    code, out, err = run(*common, "--vis-threshold", 1, "--out", tmp_path / "o.jsonl")
    assert code == 0, err
    assert f"drew 0 boxes (score >= 1) on 2 pictures in {vis}" in out
    assert "ircnn: warning: no box drawn" in err and "lower --vis-threshold" in err
    code, out, err = run(*common, "--vis-threshold", 0, "--out", tmp_path / "o.jsonl", "--json")
    doc = json.loads(out)["vis"]
    assert code == 0 and doc["pictures"] == 2 and doc["boxes"] == json.loads(out)["detections"] > 0
    assert "warning" not in err


def test_resume_knows_an_image_by_its_absolute_path(tmp_path, run, model, image_dir, monkeypatch):
    """A run over relative paths resumed with absolute ones (or the other way) skips what it did, writes no
    duplicates, and keeps the paths of the records as they were given."""
    monkeypatch.chdir(tmp_path)
    relative = [os.path.join("images", n) for n in ("a.jpg", "b.png")]
    absolute = [str(image_dir / n) for n in ("a.jpg", "b.png")]
    for fmt, out in (("jsonl", "o.jsonl"), ("coco", "o.json")):
        code, _, err = run("detect", *relative, "--model", model, "--format", fmt, "--out", out)
        assert code == 0, err
        before = open(out).read()
        code, text, err = run("detect", *absolute, "--model", model, "--format", fmt, "--out", out,
                              "--resume")
        assert code == 0 and "detected 0 images" in text and "skipped 2 images" in text, (fmt, text, err)
        assert open(out).read() == before  # coco: the journal's records matched the absolute inputs
    assert [r["image"] for r in read_lines("o.jsonl")] == relative


def test_retry_errors_detects_failed_images_again(tmp_path, run, model, image_dir):
    out = tmp_path / "o.jsonl"
    common = ["detect", image_dir, "--model", model, "--out", out]
    code, _, err = run(*common)
    assert code == 1 and "broken.jpg: error" in err
    shutil.copy(image_dir / "a.jpg", image_dir / "broken.jpg")  # the file is whole now
    code, text, err = run(*common, "--resume")
    assert code == 1 and "skipped 5 images" in text and "(1 of them failed)" in text  # errors kept by default
    code, text, err = run(*common, "--resume", "--retry-errors")
    assert code == 0, err
    assert "detected 1 image " in text and "retried 1 image that had failed before" in text
    records = read_lines(out)
    assert len(records) == 5 and not any("error" in r for r in records)
    assert records[-1]["image"] == str(image_dir / "broken.jpg") and records[-1]["detections"]
    code, _, err = run(*common, "--retry-errors")
    assert code == 2 and "add --resume" in err


def test_resume_refuses_a_deeply_nested_journal_line_cleanly(tmp_path, run, model, image_dir):
    out = tmp_path / "o.jsonl"
    out.write_text('{"image": "x.jpg", "detections": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    with pytest.raises(ValueError, match=r"o.jsonl:1: JSON nested more than 32 levels"):
        repair_journal(out)
    code, _, err = run("detect", image_dir / "a.jpg", "--model", model, "--out", out, "--resume")
    assert code == 2 and "JSON nested more than" in err and "Traceback" not in err


def test_backend_auto_is_the_default_and_torch_still_forces_torch(tmp_path, run, model, image_dir, monkeypatch):
    """`ircnn detect` and `ircnn classify` resolve their members with auto unless told otherwise; `--backend torch`
    never measures; `--max-regions N` caps the regions the networks score."""
    from detector.pipeline import ensemble
    from detector.runtimes.auto import Choice
    from service.cli import build_parser
    from service.settings import Settings

    parser = build_parser()
    assert parser.parse_args(["detect", "x.jpg"]).backend == "auto"
    assert parser.parse_args(["classify", "x.jpg"]).backend == "auto"
    assert parser.parse_args(["detect", "x.jpg"]).max_regions == 3000
    assert Settings().backend == "auto"
    asked = []

    def fake_choice(member, mean, std, size, precision, batch):
        asked.append((size, precision))
        return Choice("torch", channels_last=False, reason="fake")

    monkeypatch.setattr(ensemble, "choose_backend", fake_choice)
    image = image_dir / "a.jpg"
    code, out, err = run("detect", image, "--model", model, "--out", tmp_path / "a.jsonl", "--json")
    assert code == 0, err
    assert asked == [(64, "fp32")]  # the bundle's input size, fp32 unless bf16 is allowed
    full = json.loads(out)["regions_per_image"]
    asked.clear()
    code, out, err = run("detect", image, "--model", model, "--backend", "torch", "--max-regions", 5,
                         "--out", tmp_path / "b.jsonl", "--json")
    assert code == 0, err
    assert asked == []
    assert json.loads(out)["regions_per_image"] <= 5 < full
    code, _, err = run("detect", image, "--model", model, "--max-regions", 0)
    assert code == 2 and "--max-regions must be in 1..3000, got 0" in err
    code, _, err = run("classify", image, "--model", model, "--precision", "bf16")
    assert code == 0, err
    assert asked == [(64, "bf16")]


def test_scoring_shared_trunk_detects_what_the_shared_trunk_scorer_finds(tmp_path, run, tiny_bundle, image_dir):
    """`--scoring shared-trunk` reaches the detector: its detections are those of a Detector built on
    SharedTrunkScorer over the same proposals, and differ from warped scoring's; with --cascade it is refused."""
    from detector.bundle.format import Preprocess, load_bundle, save_bundle
    from detector.config import DetectConfig, EnsembleConfig, SharedTrunkConfig
    from detector.image import read_image
    from detector.pipeline.detector import Detector

    bundle = tiny_bundle(members=1, width=0.125, task="det200-from-cls1000")
    bundle.preprocess = Preprocess(size=64, mean=bundle.preprocess.mean, std=bundle.preprocess.std)
    model = save_bundle(tmp_path / "model", bundle)
    image = image_dir / "a.jpg"

    def detect(*flags):
        code, out, err = run("detect", image, "--model", model, "--score-threshold", 0, "--backend", "torch",
                             *flags)
        assert code == 0, err
        return json.loads(out)["detections"]

    shared, warped = detect("--scoring", "shared-trunk"), detect()
    config = DetectConfig(score_threshold=0.0, scoring="shared-trunk", shared_trunk=SharedTrunkConfig(engine="torch"),
                          ensemble=EnsembleConfig(backend="torch"))
    with Detector.from_bundle(load_bundle(model), config) as detector:
        assert type(detector.scorer).__name__ == "SharedTrunkScorer"
        expected = detector.detect(read_image(str(image))).to_json()
    assert [d["det_id"] for d in shared] == [d["det_id"] for d in expected]
    np.testing.assert_allclose([d["score"] for d in shared], [d["score"] for d in expected], atol=1e-5)
    assert [d["score"] for d in shared] != [d["score"] for d in warped]
    code, _, err = run("detect", image, "--model", model, "--scoring", "shared-trunk", "--cascade", 5)
    assert code == 2 and "cascade does not apply to shared-trunk" in err


@pytest.mark.parametrize("fmt", ["coco", "ilsvrc", "jsonl"])
def test_out_that_is_an_input_is_refused_and_the_input_kept(tmp_path, run, model, image_dir, fmt):
    """An --out naming an input (directly, through '..', through a symbolic or a hard link), or naming a file
    the run reads (the imageset, the bundle), is a usage error before any work; no byte of the input changes."""
    photo = image_dir / "a.jpg"
    before = photo.read_bytes()
    (tmp_path / "link.jpg").symlink_to(photo)
    os.link(photo, tmp_path / "hard.jpg")
    imageset = tmp_path / "set.txt"
    imageset.write_text("".join(f"{n.rsplit('.', 1)[0]} {i}\n" for i, n in enumerate(ORDER, 1)))
    extra = ["--imageset", imageset] if fmt != "jsonl" else []
    outs = [photo, image_dir / "sub" / ".." / "a.jpg", tmp_path / "link.jpg", tmp_path / "hard.jpg",
            model / "model.json"] + ([imageset] if fmt != "jsonl" else [])
    for out in outs:
        saved = out.read_bytes()
        code, stdout, err = run("detect", image_dir, "--model", model, "--format", fmt, "--out", out, *extra)
        assert code == 2 and "detected" not in stdout + err, (out, err)
        assert "--out" in err and ("is an input" in err or "is read by this run" in err), err
        assert out.read_bytes() == saved
    assert photo.read_bytes() == before
    # the files written beside a coco / ilsvrc output count too: OUT.images.json may not be the imageset
    if fmt != "jsonl":
        named = tmp_path / "o.images.json"
        named.write_text(imageset.read_text())
        code, _, err = run("detect", image_dir, "--model", model, "--format", fmt, "--imageset", named,
                           "--out", tmp_path / "o")
        assert code == 2 and "o.images.json" in err and "is read by this run" in err, err
        assert named.read_text() == imageset.read_text() and not (tmp_path / "o").exists()


def test_resume_refuses_arguments_that_change_the_records(tmp_path, run, model, image_dir):
    """--resume continues a run only with the arguments that made its records: another threshold, another model
    or another proposal setting is refused before any work, naming what differs; the same ones continue."""
    out = tmp_path / "o.jsonl"
    common = ["detect", image_dir / "a.jpg", "--model", model, "--out", out]
    code, _, err = run(*common, "--max-detections", 5)
    assert code == 0, err
    before = out.read_bytes()
    other = tmp_path / "other-model"
    shutil.copytree(model, other)
    doc = json.loads((other / "model.json").read_text())
    doc["provenance"]["note"] = "another bundle"
    (other / "model.json").write_text(json.dumps(doc))
    for flags, named in [(["--max-detections", 5, "--score-threshold", 0.5], "score_threshold"),
                         (["--max-detections", 7], "max_detections"),
                         (["--max-detections", 5, "--coarsen", 3], "coarsen"),
                         (["--max-detections", 5, "--model", other], "model")]:
        argv = [*common, *flags] if "--model" not in flags else [
            "detect", image_dir / "a.jpg", "--out", out, *flags]
        code, _, err = run(*argv, "--resume")
        assert code == 2 and "--resume" in err and named in err and "leave out --resume" in err, (flags, err)
        assert out.read_bytes() == before
    code, _, err = run("detect", image_dir / "a.jpg", image_dir / "b.png", "--model", model, "--out", out,
                       "--max-detections", 5, "--resume")
    assert code == 0, err
    assert [r["image"] for r in read_lines(out)] == [str(image_dir / "a.jpg"), str(image_dir / "b.png")]


def test_resume_reads_no_unbounded_line_and_out_is_a_regular_file(tmp_path, run, model, image_dir):
    out = tmp_path / "o.jsonl"
    out.write_text('{"image": "' + "x" * (5 << 20) + '"}\n')
    code, _, err = run("detect", image_dir / "a.jpg", "--model", model, "--out", out, "--resume")
    assert code == 2 and len(err) < 1000 and f"{out}:1: line longer than" in err and "--resume" in err
    code, _, err = run("detect", image_dir / "a.jpg", "--model", model, "--out", "/dev/zero", "--resume")
    assert code == 2 and "--out /dev/zero is not a regular file" in err


def test_the_summary_says_what_ran_per_member(tmp_path, run, model, image_dir):
    out = tmp_path / "o.jsonl"
    code, stdout, err = run("detect", image_dir / "a.jpg", "--model", model, "--out", out, "--backend", "torch")
    assert code == 0 and "networks: member 0 torch fp32 channels_last" in stdout, stdout + err
    code, stdout, err = run("detect", image_dir / "a.jpg", "--model", model, "--out", tmp_path / "t.jsonl",
                            "--backend", "torch", "--scoring", "shared-trunk", "--json")
    assert code == 0 and json.loads(stdout)["networks"] == ["shared trunk, torch fp32 channels_last"], stdout + err
