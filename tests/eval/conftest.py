"""Fixtures of the eval tests: a text file written under tmp_path, and a small table of detections."""

import numpy as np
import pytest

from eval.detections import DetectionTable


@pytest.fixture
def write(tmp_path):
    """``write(name, text)``: the path (str) of a new UTF-8 file ``tmp_path / name`` holding ``text``."""
    def write(name, text):
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return str(path)

    return write


@pytest.fixture
def detections():
    """Three detections of images 2, 1, 2; scores with a full-precision tail and a tiny one."""
    return DetectionTable(np.array([2, 1, 2]), np.array([28, 1, 200]), np.array([0.5, 0.1 + 0.2, 1e-7]),
                          np.array([[10.0, 5.0, 20.0, 25.0], [0.4, 0.6, 99.5, 50.2], [3.0, 3.0, 4.0, 4.0]]))
