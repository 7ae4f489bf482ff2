"""The input transform (detector/nets/transform.py): uint8 pixels to normalised network input."""

from __future__ import annotations

import copy

import torch
from torch import nn

from detector.nets.transform import Normalize, fold_into_conv

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def pixels(n: int = 2, side: int = 9, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_normalize_is_the_bundles_mean_and_std():
    x = pixels()
    out = Normalize(MEAN, STD)(x)
    assert out.dtype == torch.float32 and out.shape == x.shape
    by_hand = (x.double() / 255 - torch.tensor(MEAN, dtype=torch.float64).view(1, 3, 1, 1)) / torch.tensor(
        STD, dtype=torch.float64).view(1, 3, 1, 1)
    torch.testing.assert_close(out.double(), by_hand, atol=1e-6, rtol=0)
    # black and white, exactly as float32 computes -mean / std and (255 - 255 mean) / (255 std) in one multiply-add
    edges = Normalize(MEAN, STD)(torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 3, 1, 1))
    std = torch.tensor(STD).view(1, 3, 1, 1)
    scale, shift = 1.0 / (255.0 * std), -torch.tensor(MEAN).view(1, 3, 1, 1) / std
    assert torch.equal(edges, torch.tensor([0.0, 255.0]).view(2, 1, 1, 1) * scale + shift)


def test_normalize_keeps_its_constants_out_of_the_state_dict():
    norm = Normalize(MEAN, STD)
    assert norm.state_dict() == {}  # they come from the bundle's preprocess
    assert sorted(name for name, _ in norm.named_buffers()) == ["scale", "shift"]  # buffers: .to(device) moves them


def test_folded_convolution_equals_normalize_then_convolution():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)  # zero padding: the border is where a folded offset would go wrong
    folded = copy.deepcopy(conv)
    pixel_mean = fold_into_conv(folded, MEAN, STD)
    assert pixel_mean.shape == (1, 3, 1, 1)
    torch.testing.assert_close(pixel_mean, 255.0 * torch.tensor(MEAN).view(1, 3, 1, 1))
    x = pixels(side=7, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(folded(x.float() - pixel_mean), conv(Normalize(MEAN, STD)(x)), atol=1e-5, rtol=1e-5)
