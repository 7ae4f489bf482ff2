"""MultiBox the network (proposals/multibox.py): proposals, priors, matching and loss."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from detector.bundle.multibox import GoogLeNetMultiBox, MultiBoxConfig
from proposals.multibox import HeadConfig, MultiBox, kmeans_priors, match, multibox_loss, resize_image

TINY = MultiBoxConfig(k=200, variant="paper", width=0.125, size=64)


def random_boxes(n: int, seed: int) -> np.ndarray:
    """``n`` valid normalised boxes ``[n, 4]``."""
    xy = np.random.default_rng(seed).uniform(0, 1, (n, 2, 2))
    return np.concatenate([xy.min(1), xy.max(1)], 1)


# ---- inference -------------------------------------------------------------------------------------------


def test_propose_gives_exactly_k_sorted_boxes_inside_each_image(spread):
    torch.manual_seed(0)
    model = GoogLeNetMultiBox(TINY, random_boxes(200, 0))
    spread(model, 1)  # offsets far from zero: boxes cross the border and must be clipped
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((120, 200), (300, 40), (1, 1), (1, 500))]
    copies = [im.copy() for im in images]
    out = model.propose(images, batch_size=3)
    assert len(out) == len(images)
    clipped = 0
    for image, (boxes, scores) in zip(images, out):
        h, w = image.shape[:2]
        assert boxes.shape == (200, 4) and scores.shape == (200,)
        assert boxes.dtype == torch.float32 and scores.dtype == torch.float32
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
        assert (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
        assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()
        assert ((scores >= 0) & (scores <= 1)).all()
        assert (scores[:-1] >= scores[1:]).all()
        assert scores.unique().numel() > 100  # really computed, not a constant
        clipped += int(((boxes == 0) | (boxes == torch.tensor([w, h, w, h]))).any(1).sum())
    assert clipped > 0
    assert all(np.array_equal(a, b) for a, b in zip(images, copies))
    assert model.training  # propose restores the mode it found
    assert model.propose([]) == []


def test_an_untrained_network_proposes_its_priors_in_pixels():
    """The box head starts at zero, so each image's boxes are the priors scaled to it (a check of the mapping)."""
    priors = random_boxes(200, 1)
    model = GoogLeNetMultiBox(TINY, priors).eval()
    (boxes, scores), = model.propose([np.zeros((50, 80, 3), np.uint8)])
    expected = torch.tensor(priors, dtype=torch.float32) * torch.tensor([80, 50, 80, 50])
    order = lambda b: b[np.lexsort(b.numpy().T[::-1])]  # noqa: E731
    torch.testing.assert_close(order(boxes), order(expected))
    # confidences start at 1 / (1 + K): a few objects per image among K predictions
    torch.testing.assert_close(scores, torch.full((200,), 1 / 201), atol=2e-3, rtol=0)


def test_propose_matches_forward_and_batches_do_not_matter(spread):
    torch.manual_seed(0)
    model = spread(GoogLeNetMultiBox(TINY, random_boxes(200, 2)), 3).eval()
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (90, 70, 3), dtype=np.uint8) for _ in range(3)]
    together = model.propose(images)
    alone = [model.propose([im])[0] for im in images]
    for (b1, s1), (b2, s2) in zip(together, alone):
        torch.testing.assert_close(b1, b2, atol=1e-3, rtol=1e-4)
        torch.testing.assert_close(s1, s2, atol=1e-5, rtol=1e-4)
    # by hand: the same resize, then (x / 255 - mean) / std, forward, sigmoid, best first, scaled to pixels
    x = resize_image(images[0], 64)[None].float() / 255
    x = (x - torch.tensor(TINY.mean).view(1, 3, 1, 1)) / torch.tensor(TINY.std).view(1, 3, 1, 1)
    with torch.no_grad():
        boxes, logits = model(x)
    order = logits[0].argsort(descending=True)
    torch.testing.assert_close(together[0][1], torch.sigmoid(logits[0, order]), atol=1e-5, rtol=1e-4)
    expected = boxes[0, order].clamp(0, 1) * torch.tensor([70, 90, 70, 90])
    expected = torch.cat([torch.minimum(expected[:, :2], expected[:, 2:]), torch.maximum(expected[:, :2],
                                                                                      expected[:, 2:])], 1)
    torch.testing.assert_close(together[0][0], expected, atol=1e-3, rtol=1e-4)


def test_propose_refuses_what_is_not_an_rgb_image():
    model = GoogLeNetMultiBox(MultiBoxConfig(k=4, width=0.125, size=32))
    for bad in (np.zeros((10, 10), np.uint8), np.zeros((10, 10, 4), np.uint8), np.zeros((10, 10, 3), np.float32),
                np.zeros((0, 10, 3), np.uint8)):
        with pytest.raises(ValueError, match=r"images\[0\]"):
            model.propose([bad])


def test_any_trunk_and_transform_make_a_multibox():
    """The network around a trunk it is given: a 2-layer convolution here, with its own input transform."""

    class Halve(torch.nn.Module):
        def forward(self, images):
            return images.float() / 2

    torch.manual_seed(0)
    trunk = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, stride=2), torch.nn.ReLU(), torch.nn.Conv2d(6, 5, 3))
    model = MultiBox(trunk, 5, Halve(), HeadConfig(k=7, size=32, grid=2), random_boxes(7, 3))
    assert sorted(model.state_dict()) == ["box_head.bias", "box_head.weight", "conf_head.bias", "conf_head.weight",
                                          "priors", "trunk.0.bias", "trunk.0.weight", "trunk.2.bias",
                                          "trunk.2.weight"]
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    torch.testing.assert_close(model.normalize(images), images.float() / 2)
    boxes, logits = model(model.normalize(images))
    assert boxes.shape == (2, 7, 4) and logits.shape == (2, 7)
    torch.testing.assert_close(boxes, torch.tensor(random_boxes(7, 3), dtype=torch.float32).expand(2, 7, 4))
    (pixels, scores), = model.propose([np.zeros((40, 30, 3), np.uint8)])
    assert pixels.shape == (7, 4) and scores.shape == (7,)
    with pytest.raises(ValueError, match="k must"):
        HeadConfig(k=0)


# ---- priors ----------------------------------------------------------------------------------------------


def test_kmeans_priors_find_clusters_and_are_deterministic():
    rng = np.random.default_rng(0)
    centres = np.array([[0.1, 0.1, 0.3, 0.4], [0.5, 0.2, 0.9, 0.6], [0.0, 0.0, 1.0, 1.0]])
    boxes = np.clip(np.repeat(centres, 50, 0) + rng.normal(0, 0.01, (150, 4)), 0, 1)
    priors = kmeans_priors(boxes, 3, seed=0)
    assert priors.dtype == np.float32 and priors.shape == (3, 4)
    # sorted by area, largest first: the whole-image cluster, then the two others
    np.testing.assert_allclose(priors, centres[[2, 1, 0]], atol=0.01)
    again = kmeans_priors(boxes[rng.permutation(150)], 3, seed=0)  # input order does not matter
    np.testing.assert_array_equal(priors, again)

    many = kmeans_priors(random_boxes(2000, 1), 50, seed=3)
    np.testing.assert_array_equal(many, kmeans_priors(random_boxes(2000, 1), 50, seed=3))
    assert many.shape == (50, 4) and len(np.unique(many, axis=0)) == 50
    assert (many[:, 2:] >= many[:, :2]).all() and many.min() >= 0 and many.max() <= 1
    # k-means beats k random boxes of the data at covering it (mean squared distance to the nearest centre)
    data = random_boxes(2000, 1)
    d = lambda c: ((data[:, None] - c[None]) ** 2).sum(-1).min(1).mean()  # noqa: E731
    assert d(many) < 0.7 * d(data[:50])


def test_kmeans_priors_with_fewer_boxes_than_k_repeat_them_jittered():
    boxes = np.array([[0.1, 0.1, 0.5, 0.5], [0.4, 0.3, 0.9, 0.8], [0.1, 0.1, 0.5, 0.5]])  # 2 distinct
    priors = kmeans_priors(boxes, 10, seed=0)
    assert priors.shape == (10, 4) and len(np.unique(priors, axis=0)) == 10
    assert (priors[:, 2:] >= priors[:, :2]).all() and priors.min() >= 0 and priors.max() <= 1
    for b in boxes[:2]:  # every distinct box is a prior
        assert np.abs(priors - b).max(1).min() < 1e-6
    nearest = np.abs(priors[:, None] - boxes[None, :2]).max(-1).min(1)  # the others are near one of them
    assert nearest.max() < 0.1
    np.testing.assert_array_equal(priors, kmeans_priors(boxes, 10, seed=0))
    with pytest.raises(ValueError, match="at least one"):
        kmeans_priors(np.zeros((0, 4)), 5)
    with pytest.raises(ValueError, match="normalised"):
        kmeans_priors(np.array([[0, 0, 10, 10]]), 5)


# ---- loss ------------------------------------------------------------------------------------------------


def test_loss_by_hand_two_predictions_one_box():
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]]])
    gt = [torch.tensor([[0.4, 0.4, 1.0, 1.0]])]
    # location costs 0.15 * ||l - g||^2: prediction 0: 0.15 * 0.82 = 0.123, prediction 1: 0.15 * 0.02 = 0.003
    logits = torch.tensor([[0.0, 1.0]])
    loss, stats = multibox_loss(boxes, logits, gt, alpha=0.3)
    # match prediction 1 (cost 0.003 - 1 < 0.123 - 0): location 0.003, confidence BCE(0 -> 0) + BCE(1 -> 1)
    expected_conf = math.log(2) + math.log(1 + math.exp(-1))
    assert stats["location"] == pytest.approx(0.003)
    assert stats["confidence"] == pytest.approx(expected_conf)
    assert float(loss) == pytest.approx(0.003 + expected_conf)
    assert stats["matched"] == 1

    # a confident far prediction wins the matching (cost 0.123 - 5 < 0.003 + 5): matching weighs confidence
    logits = torch.tensor([[5.0, -5.0]])
    loss, stats = multibox_loss(boxes, logits, gt, alpha=0.3)
    assert stats["location"] == pytest.approx(0.123)
    assert stats["confidence"] == pytest.approx(math.log(1 + math.exp(-5)) * 2, rel=1e-5)
    # matching to the priors uses location alone: prediction 1, whatever the confidences
    loss, stats = multibox_loss(boxes, logits, gt, alpha=0.3, priors=boxes[0])
    assert stats["location"] == pytest.approx(0.003)
    assert stats["confidence"] == pytest.approx(math.log(1 + math.exp(5)) * 2, rel=1e-5)


def test_loss_gradients_and_images_without_objects():
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]]] * 2, requires_grad=True)
    logits = torch.tensor([[0.3, -0.2], [1.0, 2.0]], requires_grad=True)
    gt = [torch.zeros(0, 4), torch.tensor([[0.4, 0.4, 1.0, 1.0]])]
    loss, stats = multibox_loss(boxes, logits, gt, alpha=0.3)
    # image 0: every confidence -> 0, no location; image 1: prediction 1 matched; mean over the 2 images
    conf0 = F.softplus(torch.tensor([0.3, -0.2])).sum()
    conf1 = F.softplus(torch.tensor(1.0)) + F.softplus(torch.tensor(-2.0))
    assert float(loss.detach()) == pytest.approx(float(conf0 + conf1 + 0.003) / 2)
    assert stats["matched"] == 0.5
    loss.backward()
    assert boxes.grad[0].abs().sum() == 0 and boxes.grad[1, 0].abs().sum() == 0
    # d/dl of 0.5 * 0.3 * ||l - g||^2, over 2 images: 0.15 * (l - g)
    torch.testing.assert_close(boxes.grad[1, 1], 0.15 * torch.tensor([0.1, 0.1, 0.0, 0.0]))
    torch.testing.assert_close(logits.grad[0], torch.sigmoid(torch.tensor([0.3, -0.2])) / 2)


def test_hungarian_matching_is_optimal_where_greedy_is_not():
    gt = torch.tensor([[0.2, 0.2, 0.6, 0.6], [0.2, 0.2, 0.6, 0.9]])
    preds = torch.tensor([[0.2, 0.2, 0.6, 0.62], [0.2, 0.2, 0.6, 0.45]])
    # squared distances: pred 0 -> gt 0: 0.0004, -> gt 1: 0.0784; pred 1 -> gt 0: 0.0225, -> gt 1: 0.2025.
    # Greedy takes the closest pair (0, 0) and leaves (1, 1): 0.2029 in all; the optimum (0, 1) + (1, 0): 0.1009.
    rows, cols = match(preds, torch.zeros(2), gt)
    assert rows.tolist() == [0, 1] and cols.tolist() == [1, 0]


@pytest.mark.parametrize("k,m", [(5, 3), (3, 5), (4, 4)])
def test_hungarian_matching_equals_brute_force(k, m):
    rng = np.random.default_rng(k * 10 + m)
    for trial in range(20):
        boxes = torch.tensor(random_boxes(k, trial))
        gt = torch.tensor(random_boxes(m, 100 + trial))
        logits = torch.tensor(rng.normal(0, 1, k))
        rows, cols = match(boxes, logits, gt, alpha=0.3)
        assert len(rows) == len(set(rows)) == len(set(cols)) == min(k, m)
        cost = 0.15 * torch.cdist(boxes, gt).square() - logits[:, None]  # [K, M]
        best = min(sum(float(cost[i, j]) for i, j in (zip(p, range(m)) if k >= m else zip(range(k), p)))
                   for p in itertools.permutations(range(k) if k >= m else range(m), min(k, m)))
        assert float(cost[rows, cols].sum()) == pytest.approx(best)
