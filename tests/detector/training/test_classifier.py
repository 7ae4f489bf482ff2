"""Classifier training (detector/training/classifier.py, `ircnn train classifier`) on tiny generated image folders."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from detector.bundle.format import Preprocess, load_bundle
from detector.training.checkpoint import load_checkpoint
from detector.training.classifier import (
    ClassifierTrainConfig,
    Folder,
    RandomInterpolationResizedCrop,
    eval_transform,
    resolve_classes,
    top1,
    train_transform,
)
from service.cli import main

COLOURS = {"circle": (200, 40, 40), "square": (40, 180, 40), "triangle": (40, 60, 210)}


def small(batch_size: int = 12, workers: int = 0, seed: int = 0) -> list[str]:
    """A narrow paper-variant GoogLeNet on 64x64 inputs; 6 steps of 12 images make an epoch of the shapes."""
    return ["--size", "64", "--width", "0.125", "--batch-size", str(batch_size), "--workers", str(workers),
            "--seed", str(seed)]


def make_folder(root: Path, per_class: int = 24, seed: int = 0) -> Path:
    """Three clearly separable classes: a tinted noisy background with a shape of the class colour."""
    rng = np.random.default_rng(seed)
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(np.array(colour) * 0.6 + rng.normal(0, 25, (72, 72, 3)), 0, 255).astype(np.uint8)
            img = Image.fromarray(pixels)
            draw = ImageDraw.Draw(img)
            x, y = (int(v) for v in rng.integers(10, 30, 2))
            s = int(rng.integers(25, 40))
            if name == "circle":
                draw.ellipse([x, y, x + s, y + s], fill=colour)
            elif name == "square":
                draw.rectangle([x, y, x + s, y + s], fill=colour)
            else:
                draw.polygon([(x, y + s), (x + s, y + s), (x + s // 2, y)], fill=colour)
            img.save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("shapes") / "train")


def run_cli(capsys, *args: str) -> tuple[int, list[dict], str]:
    """``ircnn train classifier ... --json``: exit code, the JSON epoch records, stderr."""
    capsys.readouterr()
    code = main(["train", "classifier", *args, "--json"])
    out, err = capsys.readouterr()
    docs = [json.loads(line) for line in out.splitlines() if line.strip()]
    return code, [d for d in docs if "train_loss" in d], err


def test_training_lowers_the_loss_and_saves_the_averaged_weights(shapes, tmp_path, capsys):
    out = tmp_path / "bundle"
    code, records, err = run_cli(capsys, "--data", str(shapes), "--val", str(shapes), "--out", str(out),
                                 "--epochs", "10", *small())
    assert code == 0, err
    assert [r["epoch"] for r in records] == list(range(1, 11))
    losses = [r["train_loss"] for r in records]
    assert losses[-1] < 0.7 * losses[0], losses
    # learning rate -4% after 8 epochs, stepped per epoch
    assert [r["lr"] for r in records] == pytest.approx([0.01] * 8 + [0.0096] * 2)
    assert records[-1]["val_top1"] >= 0.9

    bundle = load_bundle(out)
    assert bundle.task == "classes" and bundle.arch.num_classes == 3
    assert bundle.provenance["classes"] == ["circle", "square", "triangle"]
    assert bundle.preprocess.size == 64
    # The bundle holds the Polyak average, not the live weights: same scores as the val pass, same tensors
    # as the checkpoint's EMA, different from its model.
    val = DataLoader(Folder(shapes, {c: i for i, c in enumerate(COLOURS)}, eval_transform(bundle.preprocess)),
                     batch_size=32)
    assert top1(bundle.members[0], val, torch.device("cpu")) == pytest.approx(records[-1]["val_top1"])
    ckpt = load_checkpoint(out / ".checkpoint", "classifier", {})
    saved = load_file(out / "member0.safetensors")
    assert all(torch.equal(saved[k], ckpt.tensors[f"ema.{k}"]) for k in saved)
    assert not torch.equal(saved["fc.weight"], ckpt.tensors["model.fc.weight"])
    # the schedule steps once per step (6 an epoch), giving the rates of a per-epoch StepLR
    scheduler = ckpt.state["scheduler"]
    assert ckpt.state["epoch"] == 10 and ckpt.state["step"] == 60 and scheduler["last_epoch"] == 60
    assert scheduler["_last_lr"] == pytest.approx([0.0096, 0.0096])


def test_resume_repeats_the_uninterrupted_run(shapes, tmp_path, capsys):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    code, whole, err = run_cli(capsys, "--data", str(shapes), "--out", str(straight), "--epochs", "2", *small())
    assert code == 0, err

    code, first, err = run_cli(capsys, "--data", str(shapes), "--out", str(resumed), "--epochs", "1", *small())
    assert code == 0 and [r["epoch"] for r in first] == [1], err
    # stop in the middle of epoch 2, then finish it (with loader processes, which must not change a thing)
    code, part, err = run_cli(capsys, "--data", str(shapes), "--out", str(resumed), "--epochs", "2", "--resume",
                              "--max-steps", "8", *small())
    assert code == 0, err
    assert [(r["epoch"], r["step"], r["complete"]) for r in part] == [(2, 8, False)]  # continued, not restarted
    code, rest, err = run_cli(capsys, "--data", str(shapes), "--out", str(resumed), "--epochs", "2", "--resume",
                              *small(workers=2))
    assert code == 0, err
    assert [(r["epoch"], r["step"]) for r in rest] == [(2, 12)]
    # the epoch means carry the loss of the steps before the interruption
    assert [first[0]["train_loss"], rest[0]["train_loss"]] == pytest.approx([r["train_loss"] for r in whole])

    a, b = load_file(straight / "member0.safetensors"), load_file(resumed / "member0.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)


def test_two_members_have_their_own_seeds(shapes, tmp_path, capsys):
    out = tmp_path / "pair"
    code, records, err = run_cli(capsys, "--data", str(shapes), "--out", str(out), "--epochs", "1",
                                 "--members", "2", "--max-steps", "2", *small(seed=5))
    assert code == 0, err
    assert [(r["member"], r["step"]) for r in records] == [(0, 2), (1, 2)]
    bundle = load_bundle(out)
    assert len(bundle.members) == 2 and bundle.provenance["member_seeds"] == [5, 6]
    w0, w1 = (m.state_dict()["conv1.conv.weight"] for m in bundle.members)
    assert not torch.allclose(w0, w1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes(shapes, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "IRCNN_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "-m", "service.cli", "train", "classifier", "--data", str(shapes), "--out", str(out), "--epochs", "1",
           "--max-steps", "3", "--device", "cpu", "--json", "--size", "64", "--width", "0.125", "--batch-size", "6",
           "--workers", "0"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    records = [r for r in lines if "train_loss" in r]
    assert [(r["epoch"], r["step"]) for r in records] == [(1, 3)]  # rank 0 only reports
    assert np.isfinite(records[0]["train_loss"])
    bundle = load_bundle(out)
    assert bundle.provenance["world_size"] == 2 and bundle.arch.num_classes == 3


def test_missing_data_dir(tmp_path, capsys):
    code = main(["train", "classifier", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "b")])
    assert code == 2
    assert "does not exist" in capsys.readouterr().err


def test_one_class_is_not_enough(tmp_path, capsys):
    root = tmp_path / "one"
    (root / "cats").mkdir(parents=True)
    Image.new("RGB", (40, 40)).save(root / "cats" / "a.png")
    code = main(["train", "classifier", "--data", str(root), "--out", str(tmp_path / "b")])
    assert code == 2
    err = capsys.readouterr().err
    assert "1 class folder" in err and "at least 2" in err


def test_existing_checkpoint_needs_resume(shapes, tmp_path, capsys):
    out = tmp_path / "b"
    code, _, err = run_cli(capsys, "--data", str(shapes), "--out", str(out), "--epochs", "1", "--max-steps", "1",
                           *small())
    assert code == 0, err
    code, _, err = run_cli(capsys, "--data", str(shapes), "--out", str(out), "--epochs", "1", *small())
    assert code == 2 and "--resume" in err
    code, _, err = run_cli(capsys, "--data", str(shapes), "--out", str(out), "--epochs", "1", "--resume",
                           *small(batch_size=6))
    assert code == 2 and "batch_size" in err


def test_init_fixes_the_architecture(shapes, tmp_path, capsys):
    code = main(["train", "classifier", "--data", str(shapes), "--out", str(tmp_path / "b"),
                 "--init", str(tmp_path), "--width", "0.5"])
    assert code == 2 and "--init" in capsys.readouterr().err


def test_ilsvrc_wnid_folders_keep_their_cls1000_index(tmp_path):
    for wnid in ("n02123045", "n01440764"):  # tabby (281), tench (0)
        (tmp_path / wnid).mkdir()
    classes = resolve_classes(tmp_path)
    assert classes.task == "cls1000" and len(classes.names) == 1000
    assert classes.folders == {"n01440764": 0, "n02123045": 281}
    (tmp_path / "my_cats").mkdir()
    mixed = resolve_classes(tmp_path)
    assert mixed.task == "classes" and mixed.names == ("my_cats", "n01440764", "n02123045")
    assert mixed.folders == {"my_cats": 0, "n01440764": 1, "n02123045": 2}


def test_random_interpolation_uses_all_four_modes():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (37, 37, 3), dtype=np.uint8))
    crop = RandomInterpolationResizedCrop(16, scale=(1.0, 1.0), ratio=(1.0, 1.0))  # whole image: only the mode varies
    outputs = set()
    for seed in range(40):
        torch.manual_seed(seed)
        outputs.add(np.asarray(crop(img)).tobytes())
    assert len(outputs) == 4


def test_folder_augmentation_depends_on_seed_epoch_and_index_only(shapes):
    cfg = ClassifierTrainConfig(data=str(shapes), out="unused", size=64)
    folder = Folder(shapes, {c: i for i, c in enumerate(COLOURS)}, train_transform(cfg, Preprocess(size=64)), seed=3)
    a = folder[5][0]
    torch.manual_seed(123)  # the global generator does not matter
    assert torch.equal(folder[5][0], a)
    folder.epoch = 1
    assert not torch.equal(folder[5][0], a)
