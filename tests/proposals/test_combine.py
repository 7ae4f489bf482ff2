import math

import pytest
import torch

from proposals.combine import MULTIBOX, SELECTIVE_SEARCH, MergeConfig, ProposalGenerator, Proposals, merge
from proposals.config import ProposalConfig
from proposals.recall import CoverageEvaluator, best_overlaps


def test_merge_keeps_both_sources_and_drops_duplicates_in_priority_order():
    mb = Proposals.from_multibox(torch.tensor([[0, 0, 10, 10], [50, 50, 80, 90.0]]), torch.tensor([0.9, 0.4]))
    ss = Proposals.from_selective_search(torch.tensor([[0, 0, 10, 10.2],  # near-duplicate of MultiBox's first
                                                       [20, 20, 40, 40],
                                                       [20, 20, 40, 40],  # exact duplicate
                                                       [0, 0, 100, 100.0]]))
    out = merge([mb, ss])
    assert out.boxes.tolist() == [[0, 0, 10, 10], [50, 50, 80, 90], [20, 20, 40, 40], [0, 0, 100, 100]]
    assert out.source.tolist() == [MULTIBOX, MULTIBOX, SELECTIVE_SEARCH, SELECTIVE_SEARCH]
    assert out.scores[:2].tolist() == pytest.approx([0.9, 0.4]) and math.isnan(out.scores[2].item())
    doc = out.to_json()
    assert doc[0] == {"box": [0, 0, 10, 10], "source": "multibox", "score": 0.9}
    assert doc[2]["source"] == "selective_search" and doc[2]["score"] is None


def test_merge_caps_and_handles_empty_input():
    ss = Proposals.from_selective_search(torch.tensor([[i, 0, i + 5, 5.0] for i in range(0, 100, 10)]))
    assert len(merge([ss], MergeConfig(max_proposals=3))) == 3
    empty = merge([Proposals.from_selective_search(torch.zeros(0, 4))])
    assert empty.boxes.shape == (0, 4) and len(empty) == 0
    with pytest.raises(ValueError, match="dedup_iou"):
        MergeConfig(dedup_iou=0)


class FixedMultiBox:
    """A MultiBox stand-in: the same three boxes, most confident first, for every image."""

    def propose(self, images):
        return [(torch.tensor([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50.0]]), torch.tensor([0.9, 0.5, 0.1]))
                for _ in images]


def test_generator_from_config_keeps_the_top_multibox_boxes_and_needs_a_source():
    image = torch.zeros(60, 60, 3, dtype=torch.uint8).numpy()
    config = ProposalConfig(selective_search=False, multibox_top=2)
    with ProposalGenerator.from_config(config, FixedMultiBox()) as generate:
        parts, seconds = generate.parts(image)
        merged, _ = generate(image)
    assert list(parts) == ["multibox"] and set(seconds) == {"multibox"}
    assert parts["multibox"].scores.tolist() == pytest.approx([0.9, 0.5])
    assert merged.boxes.tolist() == [[0, 0, 10, 10], [20, 20, 30, 30]]
    with pytest.raises(ValueError, match="no proposal source"):
        ProposalGenerator.from_config(ProposalConfig(selective_search=False), None)
    with pytest.raises(ValueError, match="no proposal source"):  # MultiBox off: the network is not used
        ProposalGenerator.from_config(ProposalConfig(selective_search=False, multibox=False), FixedMultiBox())
    with pytest.raises(ValueError, match="multibox_top"):
        ProposalConfig(multibox_top=0)


def test_best_overlaps_by_hand():
    gt = torch.tensor([[0, 0, 10, 10], [100, 100, 110, 120.0]])
    props = torch.tensor([[0, 0, 10, 20],  # IoU 0.5 with gt 0
                          [100, 100, 110, 120],  # exact on gt 1
                          [0, 0, 10, 10.0]])  # exact on gt 0
    best, curve = best_overlaps(props, gt, points=(1, 2, 3, 10))
    assert best.tolist() == pytest.approx([1.0, 1.0])
    assert torch.allclose(curve, torch.tensor([[0.5, 0.0], [0.5, 1.0], [1.0, 1.0], [1.0, 1.0]]))
    none, none_curve = best_overlaps(torch.zeros(0, 4), gt, points=(1,))
    assert none.tolist() == [0, 0] and none_curve.shape == (1, 2)


def test_coverage_evaluator_figures():
    ev = CoverageEvaluator(points=(1, 2))
    gt = torch.tensor([[0, 0, 10, 10], [20, 20, 30, 30.0]])
    ev.process("a", torch.tensor([[0, 0, 10, 10], [20, 20, 30, 36.0]]), gt, seconds=1.0)  # IoU 1 and 10/16
    ev.process("a", torch.zeros(0, 4), torch.tensor([[0, 0, 5, 5.0]]), seconds=3.0)  # missed entirely
    (row,) = ev.evaluate()
    assert row["images"] == 2 and row["objects"] == 3 and row["proposals_per_image"] == 1.0
    assert row["coverage"] == pytest.approx(2 / 3)
    assert row["recall_0.7"] == pytest.approx(1 / 3)
    assert row["abo"] == pytest.approx((1 + 10 / 16 + 0) / 3)
    assert row["seconds_per_image"] == 2.0
    assert row["recall_curve"] == [{"proposals": 1, "recall_0.5": pytest.approx(1 / 3)},
                                   {"proposals": 2, "recall_0.5": pytest.approx(2 / 3)}]
