"""Shared fixtures: small models with non-degenerate weights, and no downloads, ever."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest
import torch
from torch import nn

# Tests never download: default_bundle() stops with its message instead of asking torchvision.
os.environ["IRCNN_OFFLINE"] = "1"
# Exports and `--backend auto`'s measured choices go to a cache of this run, never the user's ~/.cache (one per
# run, so members exported or measured once serve every test after).
if "IRCNN_CACHE_DIR" not in os.environ:
    os.environ["IRCNN_CACHE_DIR"] = tempfile.mkdtemp(prefix="ircnn-test-cache-")
    atexit.register(shutil.rmtree, os.environ["IRCNN_CACHE_DIR"], ignore_errors=True)
# One intra-op thread: the test networks are tiny, and the suite shares its 2 cores with the processes it starts
# (selective search workers, uvicorn, Ray). With two OpenMP threads each op's barrier waits for a descheduled
# thread whenever anything else runs, and tiny-network tests ran 50-100x slower (measured).
torch.set_num_threads(1)


def spread_weights(model: nn.Module, seed: int) -> nn.Module:
    """Re-initialise so outputs differ between inputs and members (the default std 0.01 gives near-uniform
    softmax, which would let averaging bugs pass unseen)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model


@pytest.fixture
def spread():
    return spread_weights


@pytest.fixture
def tiny_bundle():
    """Factory: a bundle of narrow paper-variant members with spread weights; ``size``: their input side (default
    224)."""
    from detector.bundle.format import Preprocess, init_bundle
    from detector.nets.googlenet import GoogLeNetConfig

    def make(members: int = 1, width: float = 0.25, variant: str = "paper", seed: int = 0, num_classes: int = 1000,
             task: str = "cls1000", size: int = 224):
        bundle = init_bundle(GoogLeNetConfig(variant=variant, width=width, num_classes=num_classes),
                             members=members, seed=seed, task=task, preprocess=Preprocess(size=size))
        for i, m in enumerate(bundle.members):
            spread_weights(m, seed + i).eval()
        return bundle

    return make


@pytest.fixture(scope="module")
def module_cache(tmp_path_factory):
    """A cache directory (exports, measured choices) of this test module's own: for modules that export real-size
    members, so that they never find, or leave, another module's entries."""
    before = os.environ.get("IRCNN_CACHE_DIR")
    os.environ["IRCNN_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if before is None:
        del os.environ["IRCNN_CACHE_DIR"]
    else:
        os.environ["IRCNN_CACHE_DIR"] = before
