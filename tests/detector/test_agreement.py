"""Whole objects from the agreement of overlapping regions, and image-level context, checked by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from detector.config import IMAGE_GATE, IMAGE_POWER, DetectConfig
from detector.pipeline.agreement import agreement_scores, box_agreement, vote_maps
from detector.pipeline.detector import Detector
from proposals.combine import ProposalGenerator


def test_vote_maps_average_the_scores_of_the_regions_covering_each_cell():
    boxes = torch.tensor([[0, 0, 16, 16], [8, 0, 24, 8]], dtype=torch.float32)  # cells: [0:2, 0:2] and [0:1, 1:3]
    maps = vote_maps(boxes, torch.tensor([[0.6], [0.2]]), height=16, width=32, stride=8)  # [1, 2, 4]
    expected = torch.tensor([[0.6, (0.6 + 0.2) / 2, 0.2, 0.0],
                             [0.6, 0.6, 0.0, 0.0]])
    assert torch.allclose(maps[0], expected)


def test_box_agreement_is_mass_share_times_density():
    maps = torch.zeros(1, 4, 4)
    maps[0, :2, :2] = 1.0  # the object fills the top-left 2 x 2 cells
    boxes = torch.tensor([[0, 0, 2, 2], [0, 0, 1, 1], [0, 0, 4, 4]], dtype=torch.float32)
    got = box_agreement(boxes, maps, stride=1)[:, 0]
    # the object's box: all the mass, full density; a quarter of it: 1/4 of the mass; the whole image: all the
    # mass at density 4/16
    assert torch.allclose(got, torch.tensor([1.0, 0.25, 0.25]))


def test_agreement_ranks_the_whole_object_above_its_best_part():
    # an object at x 0..160: its left half scores highest (the telling part), the whole a little lower, and
    # regions all over the object agree on the class; the background region on the right does not
    boxes = torch.tensor([[0, 0, 80, 80], [0, 0, 160, 80], [40, 0, 120, 80], [80, 0, 160, 80], [170, 0, 240, 80]],
                         dtype=torch.float32)
    cls = torch.tensor([0.9, 0.7, 0.6, 0.6, 0.0])
    probs = torch.stack([1 - cls, cls], 1)
    out = agreement_scores(boxes, probs, height=80, width=240)
    assert out[:, 1].argmax() == 1  # the whole object now wins
    assert out[4, 1] == 0.0 and torch.equal(out[:, 0], probs[:, 0])  # background column untouched
    assert torch.equal(agreement_scores(boxes, probs, 80, 240, power=0.0), probs)  # power 0: the scores as they were


class WholeAndPart:
    """A mapped classifier (whole objects on under "auto") whose regions score as in the test above."""

    det_ids = torch.tensor([1])
    cls_to_det = torch.ones(1)
    BOXES = np.array([[0, 0, 80, 80], [0, 0, 160, 80], [40, 0, 120, 80], [80, 0, 160, 80]], np.float32)

    def __init__(self, whole_image: float = 0.5):
        self.whole_image = whole_image

    def score_regions(self, image, boxes):
        cls = torch.tensor([0.9, 0.7, 0.6, 0.6])[: len(boxes)]
        return torch.stack([1 - cls, cls], 1), {"warp": 0.0, "networks": 0.0}

    def score_image(self, image, crops=10):
        return torch.tensor([1 - self.whole_image, self.whole_image])

    def runtimes(self):
        return ["fixed"]


@pytest.mark.parametrize("agreement, best", [(1.0, [0, 0, 160, 80]), (0.0, [0, 0, 80, 80])])
def test_the_detector_scores_by_agreement_by_default(agreement, best):
    config = DetectConfig(score_threshold=0.0, agreement=agreement)
    assert DetectConfig().agreement == 1.0
    detector = Detector(WholeAndPart(), ProposalGenerator(selective_search=lambda im: WholeAndPart.BOXES), config)
    dets = detector.detect(np.zeros((80, 240, 3), np.uint8))
    assert dets.boxes[0].tolist() == best
    assert ("agreement" in dets.seconds) == bool(agreement)


@pytest.mark.parametrize("whole_image", [0.3, 0.003])
def test_image_context_multiplies_by_the_gated_whole_image_probability(whole_image):
    image = np.zeros((80, 240, 3), np.uint8)
    proposals = ProposalGenerator(selective_search=lambda im: WholeAndPart.BOXES)
    plain = Detector(WholeAndPart(whole_image), proposals, DetectConfig(score_threshold=0.0)).detect(image)
    config = DetectConfig(score_threshold=0.0, image_context=True)
    dets = Detector(WholeAndPart(whole_image), proposals, config).detect(image)
    factor = min(1.0, whole_image / IMAGE_GATE) ** IMAGE_POWER  # 1 for 0.3; sqrt(0.1) for 0.003
    assert torch.equal(dets.boxes, plain.boxes)
    assert torch.allclose(dets.scores, plain.scores * factor)
    assert "image" in dets.seconds


def test_config_bounds():
    for bad in ({"agreement": -0.1}, {"agreement": 5.0}, {"image_crops": 144}, {"context_frames": -1}):
        with pytest.raises(ValueError):
            DetectConfig(**bad)
