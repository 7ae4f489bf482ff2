"""The one checkpoint format of every trainer: a safetensors file of tensors and a JSON file of everything else.

A checkpoint directory holds ``state.json`` (position, run settings, history, the non-tensor parts of the
optimiser and schedule states) and the ``weights-m<member>-s<step>.safetensors`` file it names (model, averaged
weights, optimiser tensors, RNG states, running sums). Nothing is unpickled on load. Writing goes weights first
under a new name, then the state that names them (atomically), then the old weights: a crash at any point leaves
a consistent checkpoint. Finished ensemble members wait in the same directory (``member<i>.safetensors``) until
the bundle is written.

Nested states (an optimiser's ``state_dict``) are stored as JSON in which each tensor is replaced by
``{"$tensor": name}`` and each dict with integer keys (an optimiser's per-parameter state) by
``{"$int_keys": [[key, value], ...]}``, so that ``unpack(pack(x))`` gives ``x`` back exactly (tuples come
back as lists).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from detector.files import atomic_path, write_text_atomic
from detector.nets.members import ArchConfig, build_member

FORMAT = 2  # 1: the detector's state.json with momentum buffers only (the classifier's was a pickle)
STATE_NAME = "state.json"


@dataclass
class Checkpoint:
    state: dict  # JSON: format, kind, run, member, epoch, step_in_epoch, step, history, packed nested states
    tensors: dict[str, Tensor]  # what the state's {"$tensor": name} entries name


def pack(obj, name: str, tensors: dict[str, Tensor]):
    """JSON-able ``obj`` with its tensors moved to ``tensors`` (under names starting with ``name``)."""
    if isinstance(obj, Tensor):
        tensors[name] = obj.detach().cpu().contiguous()
        return {"$tensor": name}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: pack(v, f"{name}.{k}", tensors) for k, v in obj.items()}
        return {"$int_keys": [[int(k), pack(v, f"{name}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [pack(v, f"{name}.{i}", tensors) for i, v in enumerate(obj)]
    return obj


def unpack(obj, tensors: dict[str, Tensor]):
    """The inverse of ``pack``."""
    if isinstance(obj, dict):
        if set(obj) == {"$tensor"}:
            return tensors[obj["$tensor"]]
        if set(obj) == {"$int_keys"}:
            return {k: unpack(v, tensors) for k, v in obj["$int_keys"]}
        return {k: unpack(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [unpack(v, tensors) for v in obj]
    return obj


def save_checkpoint(ckpt_dir: Path, state: dict, tensors: dict[str, Tensor]) -> None:
    """Write ``state`` (JSON, with ``member`` and ``step``) and ``tensors``; see the module docstring."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    name = f"weights-m{state['member']}-s{state['step']}.safetensors"
    with atomic_path(ckpt_dir / name) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    write_text_atomic(ckpt_dir / STATE_NAME, json.dumps({"format": FORMAT, **state, "weights": name}) + "\n")
    for old in ckpt_dir.glob("weights-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)


def load_checkpoint(ckpt_dir: Path, kind: str, run: dict) -> Checkpoint:
    """The checkpoint in ``ckpt_dir``; refuses another trainer's (``kind``) or another run's (``run`` differs)."""
    path = ckpt_dir / STATE_NAME
    try:
        state = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a readable checkpoint state ({e}); delete {ckpt_dir} to start "
                         "afresh") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or not isinstance(state.get("run"), dict):
        raise ValueError(f"{path}: not a checkpoint of format {FORMAT}; delete {ckpt_dir} to start afresh")
    if state.get("kind") != kind:
        raise ValueError(f"{path} is a {state.get('kind')} checkpoint, not a {kind} one; pick another "
                         "--checkpoint-dir")
    for key, value in run.items():
        if state["run"].get(key) != value:
            shown = "(differs)" if isinstance(value, (list, dict)) else (
                f"{state['run'].get(key)!r}, this run has {value!r}")
            raise ValueError(f"{path} was made with a different {key}: {shown}; resume with the same settings, or "
                             "pass another --checkpoint-dir")
    name = str(state.get("weights", ""))
    if "/" in name or not name.endswith(".safetensors") or not (ckpt_dir / name).is_file():
        raise ValueError(f"{path} names weights {name!r} that are not in {ckpt_dir}; delete it to start afresh")
    try:
        tensors = load_file(str(ckpt_dir / name))
    except Exception as e:  # safetensors' own error types
        raise ValueError(f"{ckpt_dir / name} is not a readable checkpoint: {str(e)[:300]}") from None
    return Checkpoint(state, tensors)


def open_checkpoint(ckpt_dir: Path, kind: str, run: dict, resume: bool, main: bool = True) -> Checkpoint | None:
    """The checkpoint to continue: None for a fresh start; refuses to overwrite one unless ``resume``."""
    path = ckpt_dir / STATE_NAME
    if path.exists():
        if not resume:
            raise ValueError(f"{path} exists from an earlier run; pass --resume to continue it, or delete it (or "
                             "pick another --checkpoint-dir) to start afresh")
        return load_checkpoint(ckpt_dir, kind, run)
    if resume and main:
        print(f"ircnn: no checkpoint at {ckpt_dir}; starting afresh", file=sys.stderr, flush=True)
    return None


def save_member(ckpt_dir: Path, member: int, weights: dict[str, Tensor], history: list[dict]) -> None:
    """A finished member's averaged weights and its per-epoch records, kept until every member is done."""
    save_file(weights, str(ckpt_dir / f"member{member}.safetensors"), metadata={"history": json.dumps(history)})


def load_members(ckpt_dir: Path, archs: list[ArchConfig]) -> list[tuple[nn.Module, list[dict]]]:
    """The members ``save_member`` wrote (``archs[i]`` is member ``i``'s architecture), as eval-mode networks with
    their per-epoch records."""
    out = []
    for member, arch in enumerate(archs):
        file = str(ckpt_dir / f"member{member}.safetensors")
        with safe_open(file, "pt") as f:
            history = json.loads(f.metadata()["history"])
        net = build_member(arch)
        net.load_state_dict(load_file(file))
        out.append((net.eval(), history))
    return out
