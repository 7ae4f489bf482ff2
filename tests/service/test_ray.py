"""`ircnn detect --engine ray` on a local Ray instance: the same records as the local engine, coco files in the
same order, and a resumed run that neither loses nor repeats an image."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detector.bundle.format import Preprocess, save_bundle
from service import batch
from service.cli import main
from service.ray_engine import RayConfig, RayEngine

ray = pytest.importorskip("ray", reason="the Ray engine needs the [ray] extra (part of [dev]): pip install -e '.[dev]'")
pytest.importorskip("ray.data")
# Ray Data's own DataContext copies warn about its renamed settings; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")


@pytest.fixture
def local_ray():
    """A small local instance, started here so that the engine joins it (and leaves it up) instead of starting its
    own; it lives in the test's process group, and goes at the end."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=200 * 2**20)
    yield
    ray.shutdown()


def make_images(root):
    """Four small smooth colour fields (two in a subfolder) and a truncated JPEG."""
    (root / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(60, 80), (72, 96), (80, 64), (50, 100)]):
        cells = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
        Image.fromarray(cells).resize((w, h), Image.BILINEAR).save(root / ("sub" if i % 2 else "") / f"im{i}.png")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not the rest of a JPEG")


def read_jsonl(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def assert_same_record(got, want):
    assert got.keys() == want.keys(), got["image"]
    if "error" in want:
        assert got == want
        return
    assert (got["image"], got["width"], got["height"]) == (want["image"], want["width"], want["height"])
    assert len(got["detections"]) == len(want["detections"]), got["image"]
    for g, w in zip(got["detections"], want["detections"]):
        assert (g["det_id"], g["wnid"], g["name"]) == (w["det_id"], w["wnid"], w["name"]), got["image"]
        np.testing.assert_allclose(g["box"], w["box"], atol=1e-5)
        assert g["score"] == pytest.approx(w["score"], abs=1e-5)


def assert_same_records(got, want):
    """Same images, each once, with the same records (any order: Ray's is the order its workers finished)."""
    got_by_image = {r["image"]: r for r in got}
    assert len(got_by_image) == len(got), "an image recorded twice"
    assert got_by_image.keys() == {r["image"] for r in want}
    for r in want:
        assert_same_record(got_by_image[r["image"]], r)


def test_ray_engine_detects_as_the_local_engine_and_resumes(tiny_bundle, tmp_path, monkeypatch, local_ray):
    monkeypatch.chdir(tmp_path)  # relative paths, as a user types them: the workers must resolve them the same way
    make_images(tmp_path / "imgs")
    bundle = tiny_bundle(task="det200-from-cls1000")
    bundle.preprocess = Preprocess(size=64)  # a few ms per region on a CPU
    save_bundle(tmp_path / "model", bundle)
    common = ["detect", "imgs", "--model", "model", "--json"]

    assert main(common + ["--out", "local.jsonl"]) == 1  # exit 1: broken.jpg failed
    local = read_jsonl("local.jsonl")
    assert [r["image"] for r in local] == ["imgs/broken.jpg", "imgs/im0.png", "imgs/im2.png", "imgs/sub/im1.png",
                                           "imgs/sub/im3.png"]
    assert "error" in local[0] and all(r.get("detections") for r in local[1:])
    # The coco file the local engine writes from these records: a copy of its journal finished with --resume (all
    # images done, so nothing is detected again).
    shutil.copy("local.jsonl", "local.json.partial.jsonl")
    assert main(common + ["--format", "coco", "--out", "local.json", "--resume"]) == 1

    def no_local_engine(*args):
        raise AssertionError("--engine ray ran the local engine")

    monkeypatch.setattr(batch, "local_engine", no_local_engine)

    # coco through Ray: its journal holds the local engine's records, its file the same rows in the same order.
    assert main(common + ["--engine", "ray", "--ray-workers", "2", "--format", "coco", "--out", "ray.json"]) == 1
    assert_same_records(read_jsonl("ray.json.partial.jsonl"), local)
    got, want = json.load(open("ray.json")), json.load(open("local.json"))
    assert len(got) == len(want) == sum(len(r["detections"]) for r in local[1:])
    for g, w in zip(got, want):  # the same order: input order, whichever order the workers finished in
        assert (g["image_id"], g["category_id"]) == (w["image_id"], w["category_id"])
        np.testing.assert_allclose(g["bbox"], w["bbox"], atol=1e-5)
        assert g["score"] == pytest.approx(w["score"], abs=1e-5)
    assert json.load(open("ray.json.images.json")) == json.load(open("local.json.images.json"))

    # An interrupted jsonl run: two records, then a line cut off mid-write. --resume redoes the cut image and the
    # two never started, once each, and keeps the first two lines as they were.
    with open("ray.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in local[:2])
        f.write(json.dumps(local[2])[:40])
    assert main(common + ["--engine", "ray", "--out", "ray.jsonl", "--resume"]) == 1
    resumed = read_jsonl("ray.jsonl")
    assert resumed[:2] == local[:2]
    assert_same_records(resumed, local)


@pytest.mark.parametrize("argv, message", [
    (["--ray-workers", "2"], "are for --engine ray"),
    (["--engine", "ray", "--device", "cuda"], "needs --ray-gpus-per-worker > 0"),
    (["--engine", "ray", "--device", "cuda:1"], "is cpu or cuda"),
    (["--engine", "ray", "--ray-workers", "0"], "Ray workers must be in 1..100000"),
    (["--engine", "ray", "--ray-gpus-per-worker", "-1"], "GPUs per Ray worker must be in 0..64"),
])
def test_ray_options_are_checked_before_any_work(argv, message, tmp_path, capsys):
    assert main(["detect", str(tmp_path), "--model", str(tmp_path / "none")] + argv) == 2
    assert message in capsys.readouterr().err


def test_workers_and_blocks_follow_the_cluster_and_the_work():
    class Cluster:
        @staticmethod
        def cluster_resources():
            return {"CPU": 16.0, "GPU": 2.0}

    def layout(images, **config):
        return RayEngine(batch.DetectorSpec(None, None), RayConfig(**config))._layout(Cluster, images)

    assert layout(10_000) == (16, 8)  # a worker per CPU, full blocks
    assert layout(3) == (3, 1)  # no idle workers
    assert layout(100) == (16, 2)  # several blocks per worker, so that none waits on another's last block
    assert layout(10_000, gpus_per_worker=0.5) == (4, 8)
    assert layout(10_000, workers=5, images_per_block=32) == (5, 32)
    with pytest.raises(RuntimeError, match="has 2 GPUs, fewer than --ray-gpus-per-worker 4"):
        layout(10, gpus_per_worker=4)


def test_coco_and_ilsvrc_files_are_in_input_order_whatever_the_journal_order(tmp_path):
    """Ray journals records as its workers finish them; the files it writes at the end are the local engine's."""
    def record(name, score):
        return {"image": name, "width": 80, "height": 60, "detections": [
            {"box": [1.5, 2.0, 30.25, 40.0], "det_id": 59, "wnid": "n02121808", "name": "domestic cat",
             "score": score}]}

    records = [record("a.jpg", 0.5), {"image": "b.jpg", "error": "image data is truncated"}, record("c.jpg", 0.25),
               record("d.jpg", 0.75)]
    ids = batch.position_ids([Path(r["image"]) for r in records], {r["image"]: r["image"] for r in records})
    for fmt in ("coco", "ilsvrc"):
        written = {}
        for name, order in (("in_order", [0, 1, 2, 3]), ("as_finished", [2, 0, 3, 1])):
            out = tmp_path / f"{name}.{fmt}"
            with batch.DetectOutput(out, fmt) as output:
                for i in order:
                    output.write(records[i])
            output.finish(ids)
            written[name] = (out.read_text(), (tmp_path / f"{name}.{fmt}.images.json").read_text())
        assert written["as_finished"] == written["in_order"]
    assert [r["image_id"] for r in json.loads((tmp_path / "as_finished.coco").read_text())] == [1, 3, 4]
