import subprocess
import sys

import pytest

from proposals.config import MODES, MergeConfig, ProposalConfig, SelectiveSearchConfig
from proposals.selective_search import KS


def test_modes_are_the_strategies_selective_search_knows():
    assert MODES == tuple(KS)


def test_configs_import_nothing_heavy():
    """`ircnn proposals` builds these from its flags before it loads anything: a bad value answers at once."""
    code = "import sys, proposals.config\nprint([m for m in ('torch', 'numpy', 'cv2', 'PIL') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_proposal_config_defaults_are_the_papers():
    config = ProposalConfig()
    assert config.selective_search and config.multibox and config.multibox_top is None
    assert config.search == SelectiveSearchConfig() and config.search.coarsen == 2.0
    assert config.merge == MergeConfig() and config.merge.max_proposals == 3000
    with pytest.raises(ValueError, match="coarsen"):
        ProposalConfig(search=SelectiveSearchConfig(coarsen=0.1))
