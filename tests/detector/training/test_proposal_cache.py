"""The proposal cache of detector training (detector/training/proposal_cache.py): hits, a settings change,
unusable files recomputed, never unpickled."""

from __future__ import annotations

import json

import numpy as np
import pytest

from detector.training.proposal_cache import CachedProposals, ProposalCache
from detector.training.windows import read_detection_split


class Counting:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, pixels: np.ndarray):
        self.calls += 1
        h, w = pixels.shape[:2]
        return np.array([[0, 0, w / 2, h / 2], [1, 1, w, h]], np.float32), np.zeros(2, np.int8)


def test_cache_hits_and_a_settings_change_recomputes(synth, tmp_path):
    image = read_detection_split(synth, "ImageSets/DET/train.txt")[0].path
    compute = Counting()
    cache = ProposalCache(tmp_path, {"selective_search": {"coarsen": 2.0}})
    first = cache.get_or_compute(image, compute)
    again = cache.get_or_compute(image, compute)
    assert compute.calls == 1 and (cache.hits, cache.misses) == (1, 1)
    assert np.array_equal(first.boxes, again.boxes) and again.boxes.dtype == np.float32
    other = ProposalCache(tmp_path, {"selective_search": {"coarsen": 1.0}})
    assert other.dir != cache.dir and other.load(image) is None
    other.get_or_compute(image, compute)
    assert compute.calls == 2
    assert json.loads((cache.dir / "settings.json").read_text()) == {"selective_search": {"coarsen": 2.0}}


@pytest.mark.parametrize("damage", ["truncated", "pickled", "outside"])
def test_an_unusable_cache_file_is_recomputed(synth, tmp_path, damage, capsys):
    image = read_detection_split(synth, "ImageSets/DET/train.txt")[0].path
    compute = Counting()
    cache = ProposalCache(tmp_path, {"s": 1})
    good = cache.get_or_compute(image, compute)
    file = cache.file_of(image)
    if damage == "truncated":
        file.write_bytes(file.read_bytes()[:50])
    elif damage == "pickled":  # an object array: np.load(allow_pickle=False) must refuse it, never unpickle
        np.savez(file, boxes=np.array([object()], dtype=object), source=np.zeros(0, np.int8),
                 size=np.array([1, 1]), image=np.array("x"))
    else:
        cache.store(image, CachedProposals(np.array([[0, 0, 1e5, 10]], np.float32), np.zeros(1, np.int8),
                                           good.size))
    with pytest.raises(ValueError, match="proposal cache file"):
        cache.load(image)
    again = cache.get_or_compute(image, compute)
    assert compute.calls == 2 and cache.repaired == 1 and np.array_equal(again.boxes, good.boxes)
    assert "computing the proposals again" in capsys.readouterr().err
    assert cache.load(image) is not None  # the file was rewritten
