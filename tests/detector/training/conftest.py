"""Fixtures of the detector training tests: a small synthetic ILSVRC-format set."""

from __future__ import annotations

from pathlib import Path

import pytest

from eval.synth import SynthConfig, write_synth_set


@pytest.fixture(scope="session")
def synth(tmp_path_factory) -> Path:
    """100 images of 128 px with 3 classes (80 train, 20 val), fixed seed."""
    root = tmp_path_factory.mktemp("synth")
    write_synth_set(str(root), SynthConfig(images=100, seed=3, classes=3, size=128), workers=1, overwrite=True)
    return root
