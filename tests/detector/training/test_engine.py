"""The one training loop (detector/training/engine.py) on a toy job: resume repeats the uninterrupted run, the
limits stop it, Polyak averaging warms up, the run settings are checked."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from detector.training.checkpoint import load_checkpoint
from detector.training.engine import EMA, Dist, EpochEnd, Job, RunConfig, fit

CPU = Dist(0, 1, torch.device("cpu"))


def toy_job(steps_per_epoch: int = 4, epochs: int = 3) -> Job:
    """A linear model with dropout on data that are a function of (epoch, step), Adam and a per-step schedule."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 1))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.9 ** s)

    def batches(epoch: int, first: int, end: int):
        for s in range(first, end):
            g = torch.Generator().manual_seed(100 * epoch + s)
            x = torch.randn(6, 3, generator=g)
            yield x, x.sum(1, keepdim=True)

    def step(net, batch):
        x, y = batch
        loss = (net(x) - y).square().mean()
        return loss, loss.detach().double()[None], len(x)

    def record(e: EpochEnd) -> dict:
        return {"epoch": e.epoch, "step": e.step, "complete": e.complete, "train_loss": e.mean(0), "lr": e.lr}

    return Job(kind="toy", name="toy", member=0, seed=7, run={"seed": 7}, model=model, optimizer=opt, scheduler=sched,
               steps_per_epoch=steps_per_epoch, total_steps=epochs * steps_per_epoch, batches=batches, step=step,
               stats=1, record=record)


def _run(ckpt: Path, resume: bool = False, **run) -> tuple[EMA, list[dict], list[dict]]:
    cfg = RunConfig(checkpoint_every=3, **run)
    job = toy_job()
    seen: list[dict] = []
    prior = load_checkpoint(ckpt, "toy", job.run) if resume else None
    ema, history = fit(job, cfg, CPU, ckpt, prior, seen.append)
    return ema, history, seen


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path):
    whole, whole_history, _ = _run(tmp_path / "whole")
    _, part, seen = _run(tmp_path / "cut", max_steps=6)  # stops in the middle of epoch 2
    assert [(r["epoch"], r["step"], r["complete"]) for r in seen] == [(1, 4, True), (2, 6, False)]
    torch.manual_seed(12345)  # the global generator at resume time does not matter
    resumed, history, seen = _run(tmp_path / "cut", resume=True)
    assert [(r["epoch"], r["step"]) for r in seen] == [(2, 8), (3, 12)]
    # the epoch means carry the steps before the interruption; the schedule goes on where it stopped
    assert [r["train_loss"] for r in seen] == pytest.approx([r["train_loss"] for r in whole_history[1:]], rel=1e-12)
    assert seen[1]["lr"] == whole_history[2]["lr"]
    assert history[:2] == part and len(history) == 4
    for a, b in zip(whole.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    state = load_checkpoint(tmp_path / "cut", "toy", {"seed": 7}).state
    assert (state["epoch"], state["step_in_epoch"], state["step"], state["ema_updates"]) == (3, 0, 12, 12)


def test_ctrl_c_checkpoints_the_last_completed_step(tmp_path, capsys):
    job = toy_job()
    real = job.step
    calls = {"n": 0}

    def interrupted(net, batch):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return real(net, batch)

    job.step = interrupted
    with pytest.raises(KeyboardInterrupt):
        fit(job, RunConfig(checkpoint_every=0), CPU, tmp_path, None, lambda r: None)
    state = load_checkpoint(tmp_path, "toy", {"seed": 7}).state
    assert (state["epoch"], state["step_in_epoch"], state["step"]) == (1, 1, 5)
    assert "--resume" in capsys.readouterr().err


def test_a_diverging_loss_says_to_lower_the_learning_rate(tmp_path):
    job = toy_job()
    real = job.step

    def diverging(net, batch):
        loss, stats, n = real(net, batch)
        return loss, stats * float("inf"), n

    job.step = diverging
    with pytest.raises(ValueError, match=r"diverged .* toy epoch 1; lower --lr \(now 0.05\)"):
        fit(job, RunConfig(), CPU, tmp_path, None, lambda r: None)


def test_run_settings_are_checked():
    with pytest.raises(ValueError, match="--ema-decay"):
        RunConfig(ema_decay=1.0)
    with pytest.raises(ValueError, match="--checkpoint-every must be >= 0"):
        RunConfig(checkpoint_every=-1)
    with pytest.raises(ValueError, match="--device"):
        RunConfig(device="tpu")


def test_ema_warms_up_then_averages():
    live = torch.nn.BatchNorm1d(1)
    ema = EMA(live, decay=0.999)
    with torch.no_grad():
        live.weight.fill_(0.0)
        live.running_mean.fill_(2.0)
        live.num_batches_tracked.fill_(7)
    ema.update(live)  # decay min(0.999, 2 / 11): the average moves 9/11 of the way
    assert ema.model.weight.item() == pytest.approx(1 - 9 / 11)
    assert ema.model.running_mean.item() == pytest.approx(2 * 9 / 11)
    assert ema.model.num_batches_tracked.item() == 7
    for _ in range(5000):
        ema.update(live)
    assert abs(ema.model.weight.item()) < 1e-3
    assert not ema.model.weight.requires_grad
