"""eval.boxes: the devkit's inclusive integers and COCO xywh against the project's boxes."""

import numpy as np

from eval.boxes import from_devkit, to_devkit_ints


def test_devkit_conversion_hand_computed():
    # A box covering pixels 10..19 (10 px wide) is x1=10, x2=20 here and xmin=10, xmax=19 in the devkit.
    assert to_devkit_ints(np.array([[10.0, 5.0, 20.0, 25.0]])).tolist() == [[10, 5, 19, 24]]
    assert from_devkit(np.array([[10, 5, 19, 24]])).tolist() == [[10.0, 5.0, 20.0, 25.0]]
    # Round half up, then xmax = round(x2) - 1.
    assert to_devkit_ints(np.array([[0.5, 1.49, 10.5, 11.4]])).tolist() == [[1, 1, 10, 10]]
    assert to_devkit_ints(np.zeros((0, 4))).shape == (0, 4)
