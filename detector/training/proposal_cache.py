"""Proposals of each training image, computed once and kept on disk (``ProposalCache``): one ``.npz`` per image
(float32 boxes, no pickle), in a folder named by a hash of the proposal settings, so other settings never read
stale boxes."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from detector.files import atomic_path
from detector.image import read_image


@dataclass
class CachedProposals:
    boxes: np.ndarray  # float32 [N, 4] x1, y1, x2, y2 in image pixels
    source: np.ndarray  # int8 [N]: 0 selective search, 1 MultiBox (proposals.combine)
    size: tuple[int, int]  # (height, width) of the decoded image


class ProposalCache:
    """Proposals of each image on disk: ``<root>/<settings hash>/<ab>/<path hash>.npz``.

    ``settings`` (JSON-able) describe how proposals are made; any change gives another folder. An image is keyed
    by its resolved path, size and modification time. Files are read with ``np.load(allow_pickle=False)`` and
    checked (shapes, dtypes, finite boxes inside the image, the path they were made for); a file that fails is
    reported as unusable, and ``get_or_compute`` makes it again.
    """

    def __init__(self, root: str | os.PathLike, settings: dict) -> None:
        text = json.dumps(settings, sort_keys=True)
        self.key = hashlib.sha256(text.encode()).hexdigest()[:16]
        self.dir = Path(root) / self.key
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "settings.json").write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
        self.hits = self.misses = self.repaired = 0

    @staticmethod
    def _identity(image: Path) -> str:
        st = image.stat()
        return f"{image.resolve()}|{st.st_size}|{st.st_mtime_ns}"

    def file_of(self, image: str | os.PathLike) -> Path:
        digest = hashlib.sha256(self._identity(Path(image)).encode()).hexdigest()
        return self.dir / digest[:2] / f"{digest}.npz"

    def load(self, image: str | os.PathLike) -> CachedProposals | None:
        """The cached proposals of ``image``; None when there are none. Raises ValueError for an unusable file."""
        file = self.file_of(image)
        if not file.is_file():
            return None
        try:
            with np.load(file, allow_pickle=False) as z:
                boxes, source, size, ident = z["boxes"], z["source"], z["size"], str(z["image"])
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:
            raise ValueError(f"{file}: unreadable proposal cache file ({type(e).__name__}: {e})") from None
        ok = (boxes.dtype == np.float32 and boxes.ndim == 2 and boxes.shape[1] == 4 and source.dtype == np.int8
              and source.shape == (len(boxes),) and size.shape == (2,) and (size > 0).all()
              and ident == self._identity(Path(image)) and np.isfinite(boxes).all()
              and (boxes >= 0).all() and (boxes[:, [0, 2]] <= size[1]).all() and (boxes[:, [1, 3]] <= size[0]).all())
        if not ok:
            raise ValueError(f"{file}: proposal cache file has the wrong content for {image}")
        return CachedProposals(boxes, source, (int(size[0]), int(size[1])))

    def store(self, image: str | os.PathLike, value: CachedProposals) -> None:
        file = self.file_of(image)
        file.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(file, suffix=".tmp.npz") as tmp:
            np.savez(tmp, boxes=value.boxes.astype(np.float32).reshape(-1, 4), source=value.source.astype(np.int8),
                     size=np.array(value.size, dtype=np.int64), image=np.array(self._identity(Path(image))))

    def get_or_compute(self, image: str | os.PathLike,
                       compute: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]) -> CachedProposals:
        """Cached proposals, or ``compute(decoded image) -> (boxes float32 [N, 4], source int8 [N])`` stored."""
        try:
            value = self.load(image)
        except ValueError as e:
            print(f"ircnn: {e}; computing the proposals again", file=sys.stderr, flush=True)
            self.repaired += 1
            value = None
        if value is not None:
            self.hits += 1
            return value
        self.misses += 1
        pixels = read_image(image)
        boxes, source = compute(pixels)
        value = CachedProposals(np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(source, np.int8),
                                pixels.shape[:2])
        self.store(image, value)
        return value
