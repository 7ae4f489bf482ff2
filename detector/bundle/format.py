"""Model bundles: a directory with ``model.json`` and one safetensors file per ensemble member, as README.md describes.

This module reads and writes ``model.json``, all of it; the MultiBox weights that its ``multibox`` entry names are
``detector/bundle/multibox.py``'s (``multibox_file``, ``set_multibox``).

Loading never unpickles: member weights are safetensors; only ``import_torchvision`` reads a torchvision
``.pth`` checkpoint, with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from detector.config import MAKE_BUNDLE
from detector.devices import check_device
from detector.files import write_text_atomic
from detector.nets.efficientnet_lite import LITE_MEAN, LITE_STD, EfficientNetLiteConfig
from detector.nets.members import ArchConfig, arch_from_dict, build_member, describe_arch
from eval.parsing import parse_json

FORMAT = 1
# "classes": a classifier over its own class folders (``provenance["classes"]`` in head order), made by training.
TASKS = ("cls1000", "det200", "det200-from-cls1000", "classes")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision's ImageNet GoogLeNet was ported from TensorFlow and expects inputs in [-1, 1]; torchvision gets
# there with ``transform_input=True`` on ImageNet-normalised input. A bundle says it directly instead.
TORCHVISION_CHECKPOINT = "googlenet-1378be20.pth"
TORCHVISION_CHECKPOINT_SHA256_PREFIX = "1378be20"
UNIT_RANGE_MEAN = (0.5, 0.5, 0.5)
UNIT_RANGE_STD = (0.5, 0.5, 0.5)
MAX_MEMBERS = 64
MAX_MANIFEST_BYTES = 10_000_000  # model.json: a few kB, det_ids and provenance included
MIN_STD = 0.001  # preprocess std: below it the normalised input is out of any network's range
MIN_SIZE, MAX_SIZE = 32, 1024  # a network input side, the bundle's or a member's


class BundleError(ValueError):
    """A model bundle or checkpoint that cannot be used; the message says what is wrong and what to do."""


@dataclass(frozen=True)
class Preprocess:
    size: int = 224  # network input side
    mean: tuple[float, float, float] = IMAGENET_MEAN  # per RGB channel, for pixels scaled to [0, 1]
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        """Every number is in its range: an input side a network can take, a mean of pixel values in [0, 1] and
        a spread that keeps the normalised input finite (``(x - mean) / std`` with ``std >= 0.001`` stays within
        +-1000)."""
        if not _is_size(self.size):
            raise BundleError(f"preprocess size must be a whole number in {MIN_SIZE}..{MAX_SIZE}, got {self.size!r}")
        for name, values, low in (("mean", self.mean, 0.0), ("std", self.std, MIN_STD)):
            if len(values) != 3 or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                           and math.isfinite(v) and low <= v <= 1.0 for v in values):
                raise BundleError(f"preprocess {name} must be 3 numbers in [{low:g}, 1] (per RGB channel, for "
                                  f"pixels scaled to 0..1), got {list(values)!r}")

    def to_dict(self) -> dict:
        return {"size": self.size, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict) -> Preprocess:
        try:
            size, mean, std = d["size"], tuple(float(v) for v in d["mean"]), tuple(float(v) for v in d["std"])
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            raise BundleError(f"preprocess must have size, mean[3] and std[3]: {e}") from None
        return cls(size, mean, std)


def _is_size(size: object) -> bool:
    return isinstance(size, int) and not isinstance(size, bool) and MIN_SIZE <= size <= MAX_SIZE


def check_member_sizes(sizes: object, members: int, size: int) -> list[int] | None:
    """``model.json``'s ``member_sizes``: each member's input side, the first the bundle's ``preprocess`` size
    ``size``. Returns the list, or ``None`` when it is absent or every member takes ``size`` (how a bundle whose
    members share their input size is kept, and written: without the field)."""
    if sizes is None:
        return None
    if not isinstance(sizes, list) or len(sizes) != members or not all(_is_size(s) for s in sizes):
        raise BundleError(f"member_sizes must be a list of {members} whole numbers in {MIN_SIZE}..{MAX_SIZE}, each "
                          f"member's input side in member order, got {str(sizes)[:200]}")
    if sizes[0] != size:
        raise BundleError(f"member_sizes starts with {sizes[0]}, preprocess size is {size}: the bundle's preprocess "
                          "size is its first member's input side")
    return list(sizes) if len(set(sizes)) > 1 else None


@dataclass
class Bundle:
    """A loaded bundle: the members are networks in eval mode (``detector.nets.members``: GoogLeNet or
    EfficientNet-Lite, mixed freely), each with its ``config``; all members have the same number of classes.
    Each member takes inputs of its own side (``member_size``): ``preprocess.size`` for all, unless
    ``member_sizes`` lists one per member (a merge of bundles with different input sizes)."""

    task: str
    members: list[nn.Module]
    preprocess: Preprocess = field(default_factory=Preprocess)
    multibox: str | None = None
    provenance: dict = field(default_factory=dict)
    path: Path | None = None
    member_sizes: list[int] | None = None  # each member's input side where they differ; None: preprocess.size

    def member_size(self, i: int) -> int:
        """Member ``i``'s input side: its regions and crops are ``size x size``."""
        return self.preprocess.size if self.member_sizes is None else self.member_sizes[i]

    @property
    def input_sizes(self) -> list[int]:
        """Each member's input side, in member order."""
        return [self.member_size(i) for i in range(len(self.members))]

    @property
    def archs(self) -> list[ArchConfig]:
        """Each member's architecture, in member order."""
        return [m.config for m in self.members]

    @property
    def arch(self) -> ArchConfig:
        """The first member's architecture (every member's, unless the ensemble mixes architectures)."""
        return self.members[0].config

    @property
    def num_classes(self) -> int:
        return self.members[0].config.num_classes

    def arch_json(self) -> dict | list[dict]:
        """``model.json``'s ``arch``: one object when every member shares it, else one per member."""
        docs = [a.to_dict() for a in self.archs]
        return docs[0] if all(d == docs[0] for d in docs) else docs

    def describe(self) -> dict:
        return {
            "path": str(self.path) if self.path else None,
            "task": self.task,
            "arch": self.arch_json(),
            "architectures": [describe_arch(a) for a in self.archs],
            "members": len(self.members),
            "classes": self.num_classes,
            "parameters_per_member": [sum(p.numel() for p in m.parameters()) for m in self.members],
            "preprocess": self.preprocess.to_dict(),
            "member_sizes": self.input_sizes,
            "multibox": self.multibox,
            "provenance": self.provenance,
        }


def save_bundle(out: str | os.PathLike, bundle: Bundle) -> Path:
    """Write ``model.json`` and ``member{i}.safetensors``; refuses to overwrite a different existing bundle."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BundleError(f"{out} exists and is not a directory; choose another --out")
    sizes = check_member_sizes(bundle.member_sizes, len(bundle.members), bundle.preprocess.size)
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for i, m in enumerate(bundle.members):
        name = f"member{i}.safetensors"
        state = {k: v.detach().contiguous().cpu() for k, v in m.state_dict().items()}
        save_file(state, str(out / name), metadata={"format": str(FORMAT)})
        names.append(name)
    doc = {
        "format": FORMAT,
        "arch": bundle.arch_json(),
        "task": bundle.task,
        "members": names,
        "preprocess": bundle.preprocess.to_dict(),
        **({} if sizes is None else {"member_sizes": sizes}),  # absent when the members share preprocess.size
        "multibox": bundle.multibox,
        "provenance": bundle.provenance,
    }
    _write_manifest(out, doc)
    bundle.path = out
    return out


def _write_manifest(path: Path, doc: dict) -> None:
    """``model.json``, replaced atomically."""
    write_text_atomic(path / "model.json", json.dumps(doc, indent=2) + "\n")


def read_manifest(path: str | os.PathLike) -> dict:
    path = Path(path)
    manifest = path / "model.json"
    if not manifest.is_file():
        raise BundleError(
            f"{path} does not exist; check the path (a model bundle is a directory with model.json; if you have "
            f"none yet, {MAKE_BUNDLE})" if not path.exists() else
            f"{path} is not a model bundle (no model.json); {MAKE_BUNDLE}")
    if manifest.stat().st_size > MAX_MANIFEST_BYTES:  # is_file above: a regular file, its size is what it holds
        raise BundleError(f"{manifest} is larger than {MAX_MANIFEST_BYTES:,} bytes, far more than a bundle's "
                          "model.json; is this the right directory?")
    try:
        doc = parse_json(manifest.read_text(), str(manifest))  # depth-bounded: no RecursionError
    except (UnicodeDecodeError, ValueError) as e:  # json.JSONDecodeError, or nested too deep
        raise BundleError(f"{manifest} is not valid JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise BundleError(f"{manifest}: unsupported bundle format {doc.get('format') if isinstance(doc, dict) else doc!r}; "
                          f"this version reads format {FORMAT}")
    for key in ("arch", "task", "members", "preprocess"):
        if key not in doc:
            raise BundleError(f"{manifest}: missing field {key!r}")
    if doc["task"] not in TASKS:
        raise BundleError(f"{manifest}: unknown task {doc['task']!r}; expected one of {', '.join(TASKS)}")
    members = doc["members"]
    if not isinstance(members, list) or not 1 <= len(members) <= MAX_MEMBERS:
        raise BundleError(f"{manifest}: members must be a list of 1..{MAX_MEMBERS} file names")
    for name in members:
        if not _is_file_name(name):
            raise BundleError(f"{manifest}: member {name!r} must be a plain *.safetensors file name in the bundle")
    return doc


def _is_file_name(name: object) -> bool:
    """A plain ``*.safetensors`` name: weights files live inside the bundle, no paths, no parent references."""
    return isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9_.-]+\.safetensors", name) is not None


def multibox_file(path: str | os.PathLike) -> Path | None:
    """The MultiBox weights file that ``model.json`` names (it may be missing), or ``None`` for ``null``."""
    path = Path(path)
    name = read_manifest(path).get("multibox")
    if name is None:
        return None
    if not _is_file_name(name):
        raise BundleError(f"{path / 'model.json'}: multibox {name!r} must be a plain *.safetensors file name in "
                          "the bundle")
    return path / name


def set_multibox(path: str | os.PathLike, name: str) -> None:
    """Point an existing bundle's ``model.json`` at the MultiBox weights file ``name``; the rest stays as it is."""
    path = Path(path)
    doc = read_manifest(path)
    doc["multibox"] = name
    _write_manifest(path, doc)


def manifest_archs(doc: dict, where: Path) -> list[ArchConfig]:
    """Each member's architecture from a manifest (one ``arch`` object for all, or a list, one per member),
    validated before any network is built: types, ranges, the head size bound, the task's class count."""
    raw = doc["arch"]
    count = len(doc["members"])
    if isinstance(raw, list) and len(raw) != count:
        raise BundleError(f"{where}: arch lists {len(raw)} architectures for {count} members; give one per member "
                          "or a single arch object for all")
    try:
        archs = [arch_from_dict(a) for a in raw] if isinstance(raw, list) else [arch_from_dict(raw)] * count
    except (TypeError, ValueError) as e:
        raise BundleError(f"{where}: bad arch: {e}") from None
    classes = {a.num_classes for a in archs}
    if len(classes) > 1:
        raise BundleError(f"{where}: members disagree on the number of classes ({sorted(classes)}); an ensemble "
                          "averages one class list")
    expected = {"cls1000": 1000, "det200-from-cls1000": 1000}.get(doc["task"])
    if expected and archs[0].num_classes != expected:
        raise BundleError(f"{where}: task {doc['task']} needs {expected} classes, arch has {archs[0].num_classes}")
    if not isinstance(doc.get("provenance"), (dict, type(None))):
        raise BundleError(f"{where}: provenance must be a JSON object, got {type(doc['provenance']).__name__}")
    if doc.get("multibox") is not None and not isinstance(doc["multibox"], str):
        raise BundleError(f"{where}: multibox must be a file name or null, got {doc['multibox']!r}")
    return archs


def check_finite(model: nn.Module, where: str) -> None:
    """Refuse weights with NaN or infinity: they load and run, but every score they give is NaN."""
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise BundleError(f"{where}: tensor {name} has {bad} non-finite value(s) (NaN or infinity); these "
                              "weights cannot give scores; re-export or retrain the member")


def load_bundle(path: str | os.PathLike, device: str | torch.device = "cpu") -> Bundle:
    """Load a bundle directory; every member must match its architecture exactly (``strict=True``), with finite
    weights. Everything ``model.json`` says is checked before the first network is built."""
    device = check_device(device)
    path = Path(path)
    doc = read_manifest(path)
    archs = manifest_archs(doc, path / "model.json")
    preprocess = Preprocess.from_dict(doc["preprocess"])
    try:
        sizes = check_member_sizes(doc.get("member_sizes"), len(doc["members"]), preprocess.size)
    except BundleError as e:
        raise BundleError(f"{path / 'model.json'}: {e}") from None
    for name in doc["members"]:
        if not (path / name).exists():
            raise BundleError(f"{path}: member file {name} is missing")
        if not (path / name).is_file():  # a FIFO would block the read, a device never end
            raise BundleError(f"{path}: member file {name} is not a regular file; a member is a .safetensors file")
    members = []
    for name, arch in zip(doc["members"], archs):
        file = path / name
        try:
            model = build_member(arch)
        except ImportError as e:
            raise BundleError(f"{path}: member {name} is {describe_arch(arch)}: {e}") from None
        try:
            state = load_file(str(file), device="cpu")
            model.load_state_dict(state, strict=True)
        except Exception as e:  # safetensors raises its own error types; report them all the same way
            raise BundleError(f"{file}: weights do not match the bundle's arch: {str(e)[:500]}") from None
        check_finite(model, str(file))
        members.append(model.to(device).eval())
    return Bundle(task=doc["task"], members=members, preprocess=preprocess, multibox=doc.get("multibox"),
                  provenance=doc.get("provenance") or {}, path=path, member_sizes=sizes)


def check_det_ids(det_ids: list[int], head: int) -> list[int]:
    """A ``det200`` head's DET ids: ``head - 1`` distinct ints in 1..200, column ``j`` -> ``det_ids[j - 1]``."""
    if not isinstance(det_ids, (list, tuple)) or not all(isinstance(d, int) and not isinstance(d, bool)
                                                          for d in det_ids):
        raise BundleError(f"det_ids must be a list of int DET ids, got {str(det_ids)[:200]}")
    if len(det_ids) != head - 1:
        raise BundleError(f"a {head}-way det200 head (background + {head - 1}) needs {head - 1} det_ids, "
                          f"got {len(det_ids)}")
    bad = sorted({d for d in det_ids if not 1 <= d <= 200 or det_ids.count(d) > 1})
    if bad:
        raise BundleError(f"det_ids must be distinct ILSVRC DET ids in 1..200; out of range or repeated: {bad}")
    return list(det_ids)


def init_bundle(arch: ArchConfig, members: int = 1, seed: int = 0, task: str = "cls1000",
                preprocess: Preprocess | None = None, det_ids: list[int] | None = None) -> Bundle:
    """Randomly initialised members (torchvision's init); member ``i`` uses seed ``seed + i``.

    ``det_ids`` (``det200`` only): the DET id of each non-background head column, stored in the provenance
    (detection needs them unless the head is 201-way, which means 1..200).
    """
    if not 1 <= members <= MAX_MEMBERS:
        raise BundleError(f"--members must be in 1..{MAX_MEMBERS}, got {members}")
    if task not in TASKS:
        raise BundleError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    if det_ids is not None and task != "det200":
        raise BundleError(f"det_ids are for det200 bundles, not {task}")
    if det_ids is not None:
        det_ids = check_det_ids(det_ids, arch.num_classes)
    models = []
    for i in range(members):
        torch.manual_seed(seed + i)
        models.append(build_member(arch).eval())
    provenance = {"source": "random-init", "seed": seed, "member_seeds": [seed + i for i in range(members)]}
    if det_ids is not None:
        provenance["det_ids"] = det_ids
    if preprocess is None:
        preprocess = (Preprocess(arch.input_size, LITE_MEAN, LITE_STD) if isinstance(arch, EfficientNetLiteConfig)
                      else Preprocess())
    return Bundle(task=task, members=models, preprocess=preprocess, provenance=provenance)


def read_state_dict(file: Path) -> dict:
    """A ``state_dict`` saved with ``torch.save`` (bare, or under ``"state_dict"``), read with
    ``torch.load(weights_only=True)``: tensors and plain containers only, never arbitrary pickled objects."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise BundleError(f"{file} is not a loadable PyTorch checkpoint (weights_only=True): {str(e)[:300]}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise BundleError(f"{file} holds a {type(state).__name__}, not a state_dict; save one with "
                          "torch.save(model.state_dict(), path)")
    return state


