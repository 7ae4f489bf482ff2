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


def _identity(path: str | os.PathLike) -> tuple:
    """What makes two paths the same file: device and inode where it exists (hard and symbolic links, '..'),
    otherwise the resolved path."""
    try:
        st = os.stat(path)
        return ("inode", st.st_dev, st.st_ino)
    except OSError:
        return ("path", os.path.realpath(path))


def check_outputs(flag: str, out: str | os.PathLike, written: Iterable[str | os.PathLike],
                  inputs: Iterable[str | os.PathLike], reads: dict[str, Iterable[str | os.PathLike]]) -> None:
    """Raise ValueError if a file the run writes (``written``: ``out`` given by ``flag`` and the files written
    beside it) is one of its ``inputs`` or a file it reads (``reads``: what, e.g. '--imageset F' -> its paths),
    whichever path, link or hard link names it: checked before any work, so that no run destroys what it reads."""
    own = {}
    for path in written:
        own.setdefault(_identity(path), path)
    for path in inputs:
        key = _identity(path)
        if key in own:
            raise ValueError(f"{_subject(flag, out, own[key])} is an input (the same file as {path}); writing it "
                             "would destroy the input: choose another output file")
    for what, paths in reads.items():
        for path in paths:
            key = _identity(path)
            if key in own:
                raise ValueError(f"{_subject(flag, out, own[key])} is read by this run ({what}: {path}); choose "
                                 "another output file")


def _subject(flag: str, out: str | os.PathLike, path: str | os.PathLike) -> str:
    if os.fspath(path) == os.fspath(out):
        return f"{flag} {out}"
    return f"{flag} {out}: {path}, written beside it,"
