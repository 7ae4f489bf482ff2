"""ILSVRC class vocabularies, shipped as data (``eval/data/*.tsv``, copied from the devkit tables).

``cls1000``: the 1000 classification classes in torchvision/Caffe index order (0 = tench).
``det200``: the 200 detection classes in official ``ILSVRC2014_DET_ID`` order (1 = accordion).
Keys are WNIDs: first lemmas are not unique (``crane`` is both a bird and a machine).
"""

from __future__ import annotations

import csv
import functools
from dataclasses import dataclass
from importlib import resources


@dataclass(frozen=True)
class Vocabulary:
    """An ordered class list. ``ids[i]`` is the external id of row ``i`` (CLS index or DET id)."""

    ids: tuple[int, ...]
    wnids: tuple[str, ...]
    names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.wnids)

    @functools.cached_property
    def row_of_wnid(self) -> dict[str, int]:
        return {w: i for i, w in enumerate(self.wnids)}

    @functools.cached_property
    def row_of_id(self) -> dict[int, int]:
        return {k: i for i, k in enumerate(self.ids)}


def _read_table(name: str) -> list[dict[str, str]]:
    text = resources.files("eval.data").joinpath(name).read_text(encoding="utf-8")
    return list(csv.DictReader(text.splitlines(), delimiter="\t"))


@functools.cache
def cls1000() -> Vocabulary:
    rows = _read_table("cls1000.tsv")
    return Vocabulary(
        ids=tuple(int(r["index"]) for r in rows),
        wnids=tuple(r["wnid"] for r in rows),
        names=tuple(r["name"] for r in rows),
    )


@functools.cache
def det200() -> Vocabulary:
    rows = _read_table("det200.tsv")
    return Vocabulary(
        ids=tuple(int(r["det_id"]) for r in rows),
        wnids=tuple(r["wnid"] for r in rows),
        names=tuple(r["name"] for r in rows),
    )


@functools.cache
def cls1000_devkit_ids() -> dict[int, str]:
    """Devkit CLS-LOC id (1..1000, as in ``ILSVRC2012_validation_ground_truth.txt``) -> WNID."""
    return {int(r["devkit_id"]): r["wnid"] for r in _read_table("cls1000_devkit_ids.tsv")}


@functools.cache
def det200_from_cls1000() -> dict[int, tuple[int, ...]]:
    """DET id -> the CLS indices whose synset is that DET synset or one of its WordNet hyponyms."""
    return {
        int(r["det_id"]): tuple(int(i) for i in r["cls_indices"].split(","))
        for r in _read_table("det200_from_cls1000.tsv")
    }


@functools.cache
def person_evidence() -> tuple[int, ...]:
    """CLS indices of clothing and other things only people wear (``person_evidence.tsv``): not DET classes, not
    under one in WordNet, and evidence of DET ``person`` in an ImageNet classifier's output."""
    return tuple(int(r["index"]) for r in _read_table("person_evidence.tsv"))
