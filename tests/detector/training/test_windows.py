"""R-CNN's training windows (detector/training/windows.py): labels by IoU, mini-batches of foreground and
background windows, warped and flipped batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from detector.image import read_image
from detector.pipeline.warp import warp_regions
from detector.training.windows import WindowBatches, Windows, WindowSampler, label_windows, read_detection_split


def test_labels_follow_rcnn_iou_rule():
    gt = np.array([[0, 0, 10, 10], [100, 100, 120, 120]], np.float32)
    proposals = np.array([[0, 0, 10, 10],  # IoU 1 with object 0
                          [0, 0, 10, 5],  # IoU 0.5 exactly: foreground
                          [0, 0, 10, 4.9],  # IoU 0.49: background
                          [50, 50, 60, 60],  # IoU 0
                          [100, 100, 120, 110]], np.float32)  # IoU 0.5 with object 1
    boxes, label, iou = label_windows(proposals, gt, np.array([2, 1]))
    assert boxes.shape == (7, 4) and np.array_equal(boxes[5:], gt)  # ground truth appended as positives
    assert label.tolist() == [2, 2, 0, 0, 1, 2, 1]
    np.testing.assert_allclose(iou, [1.0, 0.5, 0.49, 0.0, 0.5, 1.0, 1.0], atol=1e-6)


def test_a_window_takes_the_class_of_the_object_it_overlaps_most():
    gt = np.array([[0, 0, 10, 10], [2, 0, 12, 10]], np.float32)  # two overlapping objects
    boxes, label, _ = label_windows(np.array([[3, 0, 12, 10], [0, 0, 9, 10]], np.float32), gt, np.array([1, 2]))
    assert label[:2].tolist() == [2, 1]


def test_an_image_without_objects_gives_background_only():
    boxes, label, iou = label_windows(np.array([[0, 0, 5, 5]], np.float32), np.zeros((0, 4)), np.zeros(0))
    assert boxes.shape == (1, 4) and label.tolist() == [0] and iou.tolist() == [0.0]


def _windows(n_fg: int = 40, n_bg: int = 400, seed: int = 0) -> Windows:
    rng = np.random.default_rng(seed)
    label = np.concatenate([rng.integers(1, 4, n_fg), np.zeros(n_bg, np.int64)])
    iou = np.concatenate([rng.uniform(0.5, 1, n_fg), rng.uniform(0, 0.5, n_bg)]).astype(np.float32)
    return Windows(np.zeros(len(label), np.int32), np.tile([[0, 0, 10, 10]], (len(label), 1)).astype(np.float32),
                   label, iou, np.zeros(len(label), bool))


def test_batches_have_the_foreground_share_and_cover_every_foreground_window_once_per_epoch():
    w = _windows()
    s = WindowSampler(w, batch_size=128, fg_per_batch=32, bg_iou=(0.1, 0.5), seed=7)
    assert s.steps_per_epoch == 2  # 40 foreground windows, 32 per batch
    s = WindowSampler(w, batch_size=40, fg_per_batch=10, bg_iou=(0.1, 0.5), seed=7)
    seen = []
    for step in range(s.steps_per_epoch):
        index, flips = s.batch(0, step)
        assert len(index) == 40 and flips.shape == (40,)
        assert (w.label[index[:10]] > 0).all() and (w.label[index[10:]] == 0).all()
        assert (w.iou[index[10:]] >= 0.1).all() and (w.iou[index[10:]] < 0.5).all()
        seen += index[:10].tolist()
    assert sorted(seen) == np.flatnonzero(w.label > 0).tolist()
    a, b = s.batch(1, 0)[0], s.batch(1, 0)[0]
    assert np.array_equal(a, b)  # a function of (seed, epoch, step)
    assert not np.array_equal(a, s.batch(2, 0)[0])
    other = WindowSampler(w, batch_size=40, fg_per_batch=10, bg_iou=(0.1, 0.5), seed=8)
    assert not np.array_equal(a, other.batch(1, 0)[0])


def test_ranks_take_different_foreground_windows():
    w = _windows()
    s = WindowSampler(w, batch_size=20, fg_per_batch=5, bg_iou=(0.0, 0.5), seed=0, world=2)
    assert s.steps_per_epoch == 4
    fg = [s.batch(0, step, rank)[0][:5] for step in range(4) for rank in range(2)]
    assert sorted(np.concatenate(fg).tolist()) == np.flatnonzero(w.label > 0).tolist()


def test_sampler_refuses_a_set_without_foreground():
    w = _windows(n_fg=0)
    with pytest.raises(ValueError, match="no foreground"):
        WindowSampler(w, 16, 4, (0.0, 0.5), 0)


def test_batches_are_warped_windows_with_flips(synth):
    images = read_detection_split(synth, "ImageSets/DET/train.txt")[:2]
    pixels = read_image(images[1].path)
    boxes = np.array([[5, 5, 60, 40], [20, 30, 100, 90], [0, 0, 50, 50]], np.float32)
    w = Windows(np.array([1, 1, 1], np.int32), boxes, np.array([1, 0, 0]), np.array([0.7, 0.2, 0.1], np.float32),
                np.zeros(3, bool))
    sampler = WindowSampler(w, batch_size=3, fg_per_batch=1, bg_iou=(0.0, 0.5), seed=0)
    for flip in (0.0, 1.0):
        data = WindowBatches(images, w, sampler, size=48, context=3, flip=flip, fill=(124, 116, 104))
        x, y = data[0]
        index, _ = sampler.batch(0, 0)
        want = warp_regions(pixels, torch.from_numpy(boxes[index]), 48, 3, (124, 116, 104))
        assert x.dtype == torch.uint8 and x.shape == (3, 3, 48, 48)
        assert torch.equal(x, want.flip(-1) if flip else want)
        assert y.tolist() == w.label[index].tolist()
