"""The DET-head mapping: which ILSVRC DET class each output column of a bundle's head stands for.

``det200`` bundles have a ``K + 1``-way head (column 0 background); ``det200-from-cls1000`` (and ``cls1000``)
bundles are ImageNet classifiers whose DET score is the summed probability of the DET class's CLS classes."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from detector.bundle.format import Bundle, check_det_ids
from eval.classes import det200_from_cls1000, person_evidence

if TYPE_CHECKING:
    pass

FROM_CLS_TASKS = ("det200-from-cls1000", "cls1000")  # 1000-way ImageNet heads, mapped to DET classes
PERSON = 124  # the DET id of "person"


def det_head(bundle: Bundle, evidence: bool = False) -> tuple[Tensor, Tensor | None]:
    """``(det_ids Tensor[K] int64, cls_to_det Tensor[1000, K] or None)`` for the bundle's head; raises if the
    head cannot give DET scores. ``evidence``: for 1000-way heads, the person-evidence CLS classes
    (``eval.classes.person_evidence``: clothing only people wear) also count for DET person."""
    k_head = bundle.arch.num_classes
    if bundle.task in FROM_CLS_TASKS:
        if k_head != 1000:
            raise ValueError(f"a {bundle.task} bundle needs a 1000-way head, this one has {k_head} outputs")
        mapping = det200_from_cls1000()
        det_ids = torch.tensor(sorted(mapping), dtype=torch.int64)
        cls_to_det = torch.zeros(1000, len(det_ids))  # [1000, K]: 1 where CLS index c belongs to DET column j
        for j, det_id in enumerate(det_ids.tolist()):
            cls_to_det[list(mapping[det_id]), j] = 1.0
            if evidence and det_id == PERSON:
                cls_to_det[list(person_evidence()), j] = 1.0
        return det_ids, cls_to_det
    if bundle.task != "det200":
        raise ValueError(f"bundle task {bundle.task!r} cannot detect; use a det200 bundle (`ircnn train detector`) "
                         "or a det200-from-cls1000 one (`ircnn model import-torchvision FILE --task "
                         "det200-from-cls1000 --out DIR`)")
    if k_head < 2:
        raise ValueError(f"a det200 bundle needs a head of K + 1 >= 2 outputs (background + K classes), "
                         f"this one has {k_head}")
    det_ids = bundle.provenance.get("det_ids")
    if det_ids is None:
        if k_head != 201:
            raise ValueError(f"this det200 bundle's head has {k_head} outputs but its provenance has no det_ids: a "
                             f"head other than 201-way (background + 200) must list the DET id of each of its "
                             f"{k_head - 1} non-background columns in provenance['det_ids']")
        det_ids = list(range(1, 201))
    det_ids = check_det_ids(det_ids, k_head)
    return torch.tensor(det_ids, dtype=torch.int64), None


