"""The check every command that reads PATH arguments makes first: importing nothing heavy, so that a wrong path
is a usage error within a second, before torch and the model load."""

from __future__ import annotations

import os
from collections.abc import Iterable


def check_paths(paths: Iterable[str | os.PathLike]) -> None:
    """Raise ValueError naming the PATH arguments that do not exist: a usage error, found before any work (and,
    in ``ircnn detect`` and ``ircnn classify``, before the model loads)."""
    missing = [str(p) for p in paths if not os.path.exists(p)]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ValueError(f"no such file or directory: {', '.join(missing[:3])}{more}; check the path"
                         f"{'s' if len(missing) > 1 else ''}")
