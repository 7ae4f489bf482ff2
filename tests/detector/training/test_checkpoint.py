"""The one checkpoint format (detector/training/checkpoint.py): safetensors plus JSON, exact round trips, and
nothing that a load could unpickle."""

from __future__ import annotations

import json

import pytest
import torch

from detector.training import checkpoint as ckpt
from detector.training.checkpoint import load_checkpoint, open_checkpoint, pack, save_checkpoint, unpack


def _trained_state() -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """A model, an AdamW with per-parameter state (tensor steps, moments) and a schedule after three steps."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, betas=(0.8, 0.99))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for _ in range(3):
        model(torch.randn(5, 3)).square().mean().backward()
        opt.step()
        sched.step()
    return model, opt, sched


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, list) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def test_round_trip_is_exact(tmp_path):
    model, opt, sched = _trained_state()
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors["rng.cpu"] = torch.get_rng_state()
    state = {"kind": "classifier", "run": {"seed": 3, "arch": {"width": 0.5}}, "member": 1, "epoch": 2,
             "step_in_epoch": 5, "step": 17, "history": [{"train_loss": 0.1 + 0.2, "val_top1": None}],
             "optimizer": pack(opt.state_dict(), "optimizer", tensors),
             "scheduler": pack(sched.state_dict(), "scheduler", tensors)}
    save_checkpoint(tmp_path, state, tensors)

    back = load_checkpoint(tmp_path, "classifier", {"seed": 3, "arch": {"width": 0.5}})
    assert back.state["format"] == ckpt.FORMAT and back.state["weights"] == "weights-m1-s17.safetensors"
    assert {k: back.state[k] for k in state if k not in ("optimizer", "scheduler")} == {
        k: v for k, v in state.items() if k not in ("optimizer", "scheduler")}
    assert back.state["history"][0]["train_loss"] == 0.1 + 0.2  # floats exactly, through JSON
    restored_opt = unpack(back.state["optimizer"], back.tensors)
    original = opt.state_dict()
    assert list(restored_opt["state"]) == list(original["state"])  # integer parameter keys, as the optimiser's
    assert _equal(restored_opt["state"], original["state"])  # tensors of the same dtype, shape and values
    original["param_groups"][0]["betas"] = list(original["param_groups"][0]["betas"])  # tuples come back as lists
    assert restored_opt["param_groups"] == original["param_groups"]
    assert unpack(back.state["scheduler"], back.tensors) == sched.state_dict()
    assert all(torch.equal(back.tensors[k], v) for k, v in tensors.items()) and back.tensors.keys() == tensors.keys()

    # the restored states continue training exactly as the originals do
    model2, opt2, sched2 = _trained_state()
    model2.load_state_dict({k[6:]: v for k, v in back.tensors.items() if k.startswith("model.")})
    opt2.load_state_dict(restored_opt)
    sched2.load_state_dict(unpack(back.state["scheduler"], back.tensors))
    for m, o, s in ((model, opt, sched), (model2, opt2, sched2)):
        torch.manual_seed(1)
        m(torch.randn(5, 3)).square().mean().backward()
        o.step()
        s.step()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))
    assert sched.get_last_lr() == sched2.get_last_lr()


def test_a_checkpoint_is_no_pickle_and_loading_never_unpickles(tmp_path, monkeypatch):
    model, opt, _ = _trained_state()
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    state = {"kind": "multibox", "run": {}, "member": 0, "step": 3,
             "optimizer": pack(opt.state_dict(), "optimizer", tensors)}
    save_checkpoint(tmp_path, state, tensors)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["state.json", "weights-m0-s3.safetensors"]
    json.loads((tmp_path / "state.json").read_text())  # plain JSON
    weights = (tmp_path / "weights-m0-s3.safetensors").read_bytes()
    header = int.from_bytes(weights[:8], "little")  # safetensors: a length, a JSON header, raw tensor bytes
    json.loads(weights[8:8 + header])
    assert not weights.startswith((b"\x80", b"PK"))  # neither a pickle nor torch.save's zip

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint load called torch.load / pickle")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr("pickle.load", refuse)
    monkeypatch.setattr("pickle.loads", refuse)
    back = load_checkpoint(tmp_path, "multibox", {})
    assert torch.equal(back.tensors["model.0.weight"], model.state_dict()["0.weight"])


def test_a_second_save_replaces_the_first(tmp_path):
    save_checkpoint(tmp_path, {"kind": "detector", "run": {}, "member": 0, "step": 1}, {"a": torch.zeros(2)})
    save_checkpoint(tmp_path, {"kind": "detector", "run": {}, "member": 0, "step": 2}, {"a": torch.ones(2)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json", "weights-m0-s2.safetensors"]
    assert torch.equal(load_checkpoint(tmp_path, "detector", {}).tensors["a"], torch.ones(2))


def test_load_refuses_another_trainer_another_run_and_damage(tmp_path):
    save_checkpoint(tmp_path, {"kind": "detector", "run": {"batch_size": 16, "det_ids": [1, 2]}, "member": 0,
                               "step": 1}, {"a": torch.zeros(2)})
    with pytest.raises(ValueError, match="is a detector checkpoint, not a multibox one"):
        load_checkpoint(tmp_path, "multibox", {})
    with pytest.raises(ValueError, match="different batch_size: 16, this run has 20"):
        load_checkpoint(tmp_path, "detector", {"batch_size": 20})
    with pytest.raises(ValueError, match=r"different det_ids: \(differs\)"):
        load_checkpoint(tmp_path, "detector", {"det_ids": [1, 3]})
    with pytest.raises(ValueError, match="--resume"):
        open_checkpoint(tmp_path, "detector", {}, resume=False)
    (tmp_path / "weights-m0-s1.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path, "detector", {})
    (tmp_path / "state.json").write_text("{")
    with pytest.raises(ValueError, match="not a readable checkpoint state"):
        load_checkpoint(tmp_path, "detector", {})


def test_no_checkpoint_starts_afresh(tmp_path, capsys):
    assert open_checkpoint(tmp_path / "none", "classifier", {}, resume=True) is None
    assert "starting afresh" in capsys.readouterr().err
