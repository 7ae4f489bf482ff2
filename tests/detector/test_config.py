import subprocess
import sys

import pytest

from detector.config import DetectConfig
from proposals.config import MergeConfig, ProposalConfig


@pytest.mark.parametrize("field, value", [("nms_iou", 0.0), ("score_threshold", 1.5), ("max_detections", 0),
                                          ("max_regions", 20_000), ("cascade_top_k", 0), ("context", -1)])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        DetectConfig(**{field: value})


def test_max_regions_is_at_most_the_proposals_cap():
    assert DetectConfig().max_regions == DetectConfig().proposals.merge.max_proposals == 3000
    with pytest.raises(ValueError, match="max_regions must be in 1..3000, got 3001"):
        DetectConfig(max_regions=3001)
    wide = ProposalConfig(merge=MergeConfig(max_proposals=5000))
    assert DetectConfig(max_regions=5000, proposals=wide).max_regions == 5000


def test_detector_configs_import_nothing_heavy():
    """`ircnn detect` builds these from its flags before it loads anything: a bad value answers at once."""
    code = "import sys, detector.config\nprint([m for m in ('torch', 'numpy', 'cv2', 'PIL') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
