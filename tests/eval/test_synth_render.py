"""eval.synth_render: what one synthetic image contains, its boxes, and the set's settings."""

import numpy as np
import pytest

from eval.synth import SynthConfig
from eval.synth_photos import CLASSES
from eval.synth_render import _render, render


@pytest.fixture(scope="module")
def rendered():
    """100 images of the default size, rendered without writing: (width, height, boxes [N, 4], wnids)."""
    config = SynthConfig(images=100, seed=11)
    out = []
    for i in range(1, 101):
        image, objects = render(config, i)
        boxes = np.array([b for _, b in objects], dtype=np.float64).reshape(-1, 4)
        out.append((image.shape[1], image.shape[0], boxes, [w for w, _ in objects]))
    return out


def test_render_is_pure():
    config = SynthConfig(images=5, seed=3)
    a, objects_a = render(config, 4)
    render(config, 2)
    b, objects_b = render(config, 4)
    assert np.array_equal(a, b) and objects_a == objects_b


def test_object_sizes_span_small_to_large(rendered):
    sides = np.concatenate([np.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]) for _, _, b, _ in rendered])
    assert len(sides) > 150
    assert sides.min() < 32
    assert any((np.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]) > 0.5 * max(w, h)).any()
               for w, h, b, _ in rendered)


def test_objects_per_image_and_boxes(rendered):
    counts = [len(wnids) for _, _, _, wnids in rendered]
    assert max(counts) <= 6 and 0 in counts and max(counts) >= 5
    for w, h, boxes, wnids in rendered:
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
        assert (boxes[:, 2:] - boxes[:, :2] >= 16).all()  # min_box: no box under the devkit's 1/3 small-object threshold
        assert (boxes == np.round(boxes)).all()  # whole pixel edges
        assert set(wnids) <= {c.wnid for c in CLASSES}
    assert {w for *_, wnids in rendered for w in wnids} == {c.wnid for c in CLASSES}


def test_boxes_are_tight_around_the_visible_pixels():
    config = SynthConfig(images=20, seed=8, size=240)
    checked = 0
    for i in range(1, 21):
        image, objects, owner = _render(config, i)
        assert owner.shape == image.shape[:2]
        assert set(np.unique(owner)) <= {-2, -1, *range(len(objects))}
        for k, (_, (x1, y1, x2, y2)) in enumerate(objects):
            ys, xs = np.nonzero(owner == k)
            assert (x1, y1, x2, y2) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            checked += 1
    assert checked > 20


def test_truncation_and_occlusion_occur(rendered):
    truncated = sum(((b[:, 0] == 0) | (b[:, 1] == 0) | (b[:, 2] == w) | (b[:, 3] == h)).sum()
                    for w, h, b, _ in rendered)
    overlapping = 0
    for *_, b, _ in rendered:
        for i in range(len(b)):
            for j in range(i + 1, len(b)):
                iw = min(b[i, 2], b[j, 2]) - max(b[i, 0], b[j, 0])
                ih = min(b[i, 3], b[j, 3]) - max(b[i, 1], b[j, 1])
                overlapping += iw > 0 and ih > 0
    assert truncated >= 10 and overlapping >= 10


@pytest.mark.parametrize("field, value", [("images", 0), ("images", 1_000_001), ("classes", 0),
                                          ("classes", len(CLASSES) + 1), ("seed", -1), ("val_fraction", 1.5),
                                          ("size", 64)])
def test_config_bounds(field, value):
    with pytest.raises(ValueError, match=field):
        SynthConfig(**{field: value})
