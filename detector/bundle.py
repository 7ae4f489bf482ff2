"""Model bundles: a directory with ``model.json`` and one safetensors file per ensemble member (DESIGN.md).

Loading never unpickles: member weights are safetensors; only ``import_torchvision`` reads a torchvision
``.pth`` checkpoint, with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from detector.googlenet import GoogLeNet, GoogLeNetConfig

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


class BundleError(ValueError):
    """A model bundle or checkpoint that cannot be used; the message says what is wrong and what to do."""


@dataclass(frozen=True)
class Preprocess:
    size: int = 224  # network input side
    mean: tuple[float, float, float] = IMAGENET_MEAN  # per RGB channel, for pixels scaled to [0, 1]
    std: tuple[float, float, float] = IMAGENET_STD

    def to_dict(self) -> dict:
        return {"size": self.size, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict) -> Preprocess:
        try:
            size, mean, std = int(d["size"]), tuple(float(v) for v in d["mean"]), tuple(float(v) for v in d["std"])
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"preprocess must have size, mean[3] and std[3]: {e}") from None
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0 or not 32 <= size <= 1024:
            raise BundleError(f"bad preprocess {d!r}: need 3 means, 3 positive stds and 32 <= size <= 1024")
        return cls(size, mean, std)


@dataclass
class Bundle:
    """A loaded bundle: the members are ``GoogLeNet`` modules in eval mode."""

    arch: GoogLeNetConfig
    task: str
    members: list[GoogLeNet]
    preprocess: Preprocess = field(default_factory=Preprocess)
    multibox: str | None = None
    provenance: dict = field(default_factory=dict)
    path: Path | None = None

    def describe(self) -> dict:
        return {
            "path": str(self.path) if self.path else None,
            "task": self.task,
            "arch": self.arch.to_dict(),
            "members": len(self.members),
            "classes": self.arch.num_classes,
            "parameters_per_member": sum(p.numel() for p in self.members[0].parameters()),
            "preprocess": self.preprocess.to_dict(),
            "multibox": self.multibox,
            "provenance": self.provenance,
        }


def save_bundle(out: str | os.PathLike, bundle: Bundle) -> Path:
    """Write ``model.json`` and ``member{i}.safetensors``; refuses to overwrite a different existing bundle."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BundleError(f"{out} exists and is not a directory; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for i, m in enumerate(bundle.members):
        name = f"member{i}.safetensors"
        state = {k: v.detach().contiguous().cpu() for k, v in m.state_dict().items()}
        save_file(state, str(out / name), metadata={"format": str(FORMAT)})
        names.append(name)
    doc = {
        "format": FORMAT,
        "arch": bundle.arch.to_dict(),
        "task": bundle.task,
        "members": names,
        "preprocess": bundle.preprocess.to_dict(),
        "multibox": bundle.multibox,
        "provenance": bundle.provenance,
    }
    tmp = out / "model.json.tmp"
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(out / "model.json")
    bundle.path = out
    return out


def read_manifest(path: str | os.PathLike) -> dict:
    path = Path(path)
    manifest = path / "model.json"
    if not manifest.is_file():
        create = (f"`ircnn model init --out DIR` or `ircnn model import-torchvision {TORCHVISION_CHECKPOINT} "
                  "--out DIR`")
        raise BundleError(
            f"{path} does not exist; check the path (a model bundle is a directory with model.json; if you have "
            f"no model.json yet, create one with {create})" if not path.exists() else
            f"{path} is not a model bundle (no model.json); create one with {create}")
    try:
        doc = json.loads(manifest.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
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
        # member files live inside the bundle: no paths, no parent references
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+\.safetensors", name):
            raise BundleError(f"{manifest}: member {name!r} must be a plain *.safetensors file name in the bundle")
    return doc


def load_bundle(path: str | os.PathLike, device: str | torch.device = "cpu") -> Bundle:
    """Load a bundle directory; every member must match the architecture exactly (``strict=True``)."""
    path = Path(path)
    doc = read_manifest(path)
    try:
        arch = GoogLeNetConfig.from_dict(doc["arch"])
    except (TypeError, ValueError) as e:
        raise BundleError(f"{path / 'model.json'}: bad arch: {e}") from None
    expected_classes = {"cls1000": 1000, "det200-from-cls1000": 1000}.get(doc["task"])
    if expected_classes and arch.num_classes != expected_classes:
        raise BundleError(f"{path}: task {doc['task']} needs {expected_classes} classes, arch has {arch.num_classes}")
    members = []
    for name in doc["members"]:
        file = path / name
        if not file.is_file():
            raise BundleError(f"{path}: member file {name} is missing")
        model = GoogLeNet(arch)
        try:
            state = load_file(str(file), device="cpu")
            model.load_state_dict(state, strict=True)
        except Exception as e:  # safetensors raises its own error types; report them all the same way
            raise BundleError(f"{file}: weights do not match the bundle's arch: {str(e)[:500]}") from None
        members.append(model.to(device).eval())
    return Bundle(arch=arch, task=doc["task"], members=members,
                  preprocess=Preprocess.from_dict(doc["preprocess"]), multibox=doc.get("multibox"),
                  provenance=doc.get("provenance") or {}, path=path)


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


def init_bundle(arch: GoogLeNetConfig, members: int = 1, seed: int = 0, task: str = "cls1000",
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
        models.append(GoogLeNet(arch).eval())
    provenance = {"source": "random-init", "seed": seed, "member_seeds": [seed + i for i in range(members)]}
    if det_ids is not None:
        provenance["det_ids"] = det_ids
    return Bundle(arch=arch, task=task, members=models, preprocess=preprocess or Preprocess(), provenance=provenance)


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise BundleError(f"{file} is not a loadable PyTorch checkpoint (weights_only=True): {str(e)[:300]}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or "fc.weight" not in state:
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
    return Bundle(arch=arch, task=task, members=[model.eval()], preprocess=preprocess,
                  provenance={"source": "import-torchvision", "file": file.name, "sha256": digest,
                              "input_range": input_range})


def torchvision_checkpoint_path() -> Path:
    """Where torchvision keeps (and looks for) its ImageNet GoogLeNet checkpoint."""
    return Path(torch.hub.get_dir()) / "checkpoints" / TORCHVISION_CHECKPOINT


def default_bundle(device: str | torch.device = "cpu") -> Bundle:
    """torchvision's ImageNet GoogLeNet: from torchvision's cache, else downloaded by torchvision when online.

    Set ``IRCNN_OFFLINE=1`` to never try the download (tests do).
    """
    path = torchvision_checkpoint_path()
    if not path.is_file() and os.environ.get("IRCNN_OFFLINE", "") not in ("1", "true", "yes"):
        try:
            from torchvision.models import GoogLeNet_Weights

            GoogLeNet_Weights.IMAGENET1K_V1.get_state_dict(progress=True, check_hash=True)
        except Exception:  # no network, proxy refusal, hash mismatch: all end in the message below
            pass
    if not path.is_file():
        raise BundleError(
            f"no model given and torchvision's ImageNet GoogLeNet is not available offline. Either put "
            f"{TORCHVISION_CHECKPOINT} (download it on a machine that is online from "
            f"https://download.pytorch.org/models/{TORCHVISION_CHECKPOINT}) at {path} (torchvision's cache; "
            f"TORCH_HOME moves it), or pass "
            f"--model DIR with a bundle made by `ircnn model import-torchvision FILE --out DIR` or "
            f"`ircnn model init --out DIR`")
    bundle = import_torchvision(path)
    for m in bundle.members:
        m.to(device)
    return bundle


def resolve_bundle(model: str | os.PathLike | None, device: str | torch.device = "cpu") -> Bundle:
    return default_bundle(device) if model is None else load_bundle(model, device)
