"""The training loop every trainer runs (classifier, detector, MultiBox), and what they share around it.

A trainer builds its model, optimiser, schedule and data and describes one step (``Job``); ``fit`` runs the
steps epoch by epoch: Polyak averaging (``EMA``) after every step, the schedule stepped after every step,
mid-epoch and end-of-epoch checkpoints (``detector.training.checkpoint``), a checkpoint on Ctrl-C, a stop after
``max_steps`` or ``max_minutes``, and one record per epoch for the trainer's callback.

Randomness is a pure function of the seed and the position in training: a trainer's data depend on (seed, epoch,
index) and the dropout masks of a step on (seed, step, rank), set here before every step. So a resumed run,
mid-epoch included, repeats the uninterrupted one for any number of loading processes on the CPU; the RNG states
are checkpointed all the same, for anything else that draws from them. On a GPU the same draws are made, but cuDNN
and cuBLAS pick kernels whose sums are not bit-reproducible unless deterministic algorithms are asked for
(``torch.use_deterministic_algorithms(True)`` with ``CUBLAS_WORKSPACE_CONFIG=:4096:8``, slower), so a resumed run
there matches the uninterrupted one within float rounding, not bit for bit.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from detector.bundle.format import MAX_MEMBERS
from detector.cpus import default_workers
from detector.devices import check_device
from detector.nets.googlenet import VARIANTS
from detector.progress import progress
from detector.training.checkpoint import Checkpoint, open_checkpoint, pack, save_checkpoint, save_member, unpack


@dataclass(frozen=True)
class RunConfig:
    """How a training run runs, whatever it trains (each trainer's config has one as ``run``)."""

    seed: int = 0  # member i of an ensemble uses seed + i
    device: str | None = None  # "cpu" or "cuda"; None picks cuda when available
    workers: int = default_workers(4)  # DataLoader processes per training process (cores, at most 4)
    ema_decay: float = 0.999  # Polyak averaging (EMA, with its warm-up); 0 keeps the live weights
    resume: bool = False  # continue from the checkpoint (or start afresh when there is none)
    checkpoint_dir: str | None = None  # default: a trainer-specific folder in the output bundle
    checkpoint_every: int = 2000  # steps between mid-epoch checkpoints (0: at epoch ends only)
    max_steps: int = 0  # stop (each member) after this many steps (0: no limit)
    max_minutes: float = 0.0  # stop (each member) after this many minutes of training (0: no limit)

    def __post_init__(self) -> None:
        check_non_negative(self, ("seed", "workers", "checkpoint_every", "max_steps", "max_minutes"))
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"--ema-decay must be in [0, 1), got {self.ema_decay}")
        if self.device not in (None, "cpu", "cuda"):
            raise ValueError(f"--device must be cpu or cuda, got {self.device!r}")


def _flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def check_positive(cfg: object, names: Iterable[str]) -> None:
    for name in names:
        if not getattr(cfg, name) > 0:
            raise ValueError(f"{_flag(name)} must be positive, got {getattr(cfg, name)}")


def check_non_negative(cfg: object, names: Iterable[str]) -> None:
    for name in names:
        if getattr(cfg, name) < 0:
            raise ValueError(f"{_flag(name)} must be >= 0, got {getattr(cfg, name)}")


def check_network(variant: str, size: int, members: int = 1) -> None:
    """A new GoogLeNet's variant, the input side and the ensemble size, as the flags give them."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown --variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    if members > MAX_MEMBERS:
        raise ValueError(f"--members must be at most {MAX_MEMBERS}, got {members}")
    if not 32 <= size <= 1024:
        raise ValueError(f"--size must be in 32..1024, got {size}")


def recipe(cfg: object) -> dict:
    """A trainer's config as one flat dict (its run settings beside its own) for a bundle's provenance."""
    doc = dataclasses.asdict(cfg)
    return {**{k: v for k, v in doc.items() if k != "run"}, **doc["run"]}


def mix_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from non-negative integers."""
    return int(np.random.SeedSequence(parts).generate_state(1, np.uint64)[0] >> np.uint64(1))


# ---- processes -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dist:
    rank: int  # this process among all (0 writes checkpoints, the bundle and progress)
    world: int  # processes; the global batch is world x batch_size
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def resolve_device(device: str | None) -> str:
    """"cpu" or "cuda": the flag's, or cuda when available."""
    return check_device(device or ("cuda" if torch.cuda.is_available() else "cpu")).type


COLLECTIVE_TIMEOUT = timedelta(hours=6)  # longest wait of one rank for the others at a collective


@contextmanager
def processes(device: str | None) -> Iterator[Dist]:
    """One process, or one of ``torchrun``'s (WORLD_SIZE, RANK, LOCAL_RANK): gloo on CPU, nccl on CUDA; the
    process group is destroyed on the way out."""
    kind = resolve_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        yield Dist(0, 1, torch.device(kind))
        return
    local = int(os.environ["LOCAL_RANK"])
    if kind == "cuda":
        torch.cuda.set_device(local)
    elif "OMP_NUM_THREADS" not in os.environ:  # share the cores between the processes on this machine
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    if not dist.is_initialized():
        # the first collective comes after each rank's share of the proposals (minutes to hours on big sets, and
        # uneven between ranks): the default 10-minute timeout would end the run there
        dist.init_process_group("nccl" if kind == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT)
    try:
        yield Dist(dist.get_rank(), dist.get_world_size(),
                   torch.device(kind, local) if kind == "cuda" else torch.device("cpu"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def sum_over_processes(t: Tensor, d: Dist) -> Tensor:
    if d.world > 1:
        t = t.clone()
        dist.all_reduce(t)
    return t


# ---- model -----------------------------------------------------------------------------------------------


class EMA:
    """Polyak averaging as an exponential moving average of a model's floating-point weights and buffers
    (integer buffers are copied). After ``n`` updates the decay is ``min(decay, (1 + n) / (10 + n))``, as in
    TensorFlow's ``ExponentialMovingAverage(num_updates=...)``, so short runs are not stuck near the init."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for avg, live in zip(self.model.state_dict().values(), model.state_dict().values()):
            if avg.dtype.is_floating_point:
                avg.lerp_(live, 1.0 - d)
            else:
                avg.copy_(live)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on conv and linear weights, none on biases and normalisation parameters."""
    params = list(model.parameters())
    return [{"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]


def cpu_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


# ---- the loop --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EpochEnd:
    """What ``fit`` knows at the end of an epoch (or of the part of it that ran), for the trainer's record."""

    epoch: int  # 1-based
    step: int  # steps done
    complete: bool  # the epoch ran to its end (not stopped by max_steps / max_minutes)
    lr: float  # at the epoch's start
    seconds: float
    rate: float  # items per second, all processes
    sums: list[float]  # the job's stats summed over this epoch's steps and processes; the last is the step count

    def mean(self, i: int) -> float:
        return self.sums[i] / max(self.sums[-1], 1.0)


@dataclass
class Job:
    """One model's training, as a trainer describes it to ``fit``."""

    kind: str  # "classifier" | "detector" | "multibox": checkpoints of one kind never continue another
    name: str  # "member 0", "multibox": in the progress bar and the messages
    member: int  # index in the ensemble (0 for a single model)
    seed: int  # dropout masks of step s on rank r come from mix_seed(seed, s, r)
    run: dict  # settings a checkpoint must have been made with to continue this run
    model: nn.Module  # live weights, on the device
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler  # stepped after every step
    steps_per_epoch: int
    total_steps: int
    batches: Callable[[int, int, int], Iterable]  # (epoch, first step, end step) -> the batches of those steps
    step: Callable[[nn.Module, object], tuple[Tensor, Tensor, int]]  # (model, batch) -> (loss, stats, items)
    stats: int  # length of a step's stats (float64 Tensor[stats]; stats[0] is the loss)
    record: Callable[[EpochEnd], dict]  # an epoch's record for the callback and the history
    evaluate: Callable[[nn.Module], dict] | None = None  # (averaged model) -> fields for the record, rank 0
    unit: str = "img"  # what a step's items are: rate in the progress bar as <unit>_s


def fit(job: Job, cfg: RunConfig, d: Dist, ckpt_dir: Path, resume: Checkpoint | None,
        on_epoch: Callable[[dict], None]) -> tuple[EMA, list[dict]]:
    """Run ``job`` from the start or from ``resume``; returns the averaged weights and the per-epoch records."""
    live, opt, sched = job.model, job.optimizer, job.scheduler
    ema = EMA(live, cfg.ema_decay)
    epoch = step_in_epoch = step = 0
    sums = torch.zeros(job.stats + 1, dtype=torch.float64, device=d.device)  # this epoch's stats, then steps
    history: list[dict] = []
    if resume is not None:
        state, tensors = resume.state, resume.tensors
        live.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        ema.model.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
        ema.updates = state["ema_updates"]
        opt.load_state_dict(unpack(state["optimizer"], tensors))
        sched.load_state_dict(unpack(state["scheduler"], tensors))
        torch.set_rng_state(tensors["rng.cpu"])
        if d.device.type == "cuda" and "rng.cuda" in tensors:
            torch.cuda.set_rng_state(tensors["rng.cuda"], d.device)
        epoch, step_in_epoch, step = state["epoch"], state["step_in_epoch"], state["step"]
        history = list(state["history"])
        if d.main:  # the other processes' shares are in the saved sums already
            sums = tensors["sums"].to(d.device, torch.float64)
    model = live
    if d.world > 1:
        model = DistributedDataParallel(live, device_ids=[d.device.index] if d.device.type == "cuda" else None)

    def checkpoint() -> None:
        global_sums = sum_over_processes(sums, d)
        if not d.main:
            return
        tensors = {f"model.{k}": v for k, v in live.state_dict().items()}
        tensors.update({f"ema.{k}": v for k, v in ema.model.state_dict().items()})
        tensors["sums"], tensors["rng.cpu"] = global_sums, torch.get_rng_state()
        if d.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(d.device)
        save_checkpoint(ckpt_dir, {
            "kind": job.kind, "run": job.run, "member": job.member, "epoch": epoch, "step_in_epoch": step_in_epoch,
            "step": step, "ema_updates": ema.updates, "history": history,
            "optimizer": pack(opt.state_dict(), "optimizer", tensors),
            "scheduler": pack(sched.state_dict(), "scheduler", tensors)}, tensors)

    spe = job.steps_per_epoch
    total = min(job.total_steps, cfg.max_steps or job.total_steps)
    began, out_of_time = time.perf_counter(), False
    while step < total and not out_of_time:
        last = min(spe, step_in_epoch + total - step)
        lr = opt.param_groups[0]["lr"]
        model.train()
        start, seen = time.perf_counter(), 0
        bar = progress(spe, f"{job.name} epoch {epoch + 1}", "step", initial=step_in_epoch, show=d.main)
        try:
            for batch in job.batches(epoch, step_in_epoch, last):
                torch.manual_seed(mix_seed(job.seed, step, d.rank))  # dropout masks: a function of (seed, step, rank)
                loss, stats, items = job.step(model, batch)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                ema.update(live)
                sums[:-1] += stats
                sums[-1] += 1
                step, step_in_epoch, seen = step + 1, step_in_epoch + 1, seen + items
                if bar is not None:
                    bar.update()
                if step % 10 == 0 or step_in_epoch == last:
                    rate = seen * d.world / (time.perf_counter() - start)
                    if bar is not None:
                        bar.set_postfix({"loss": f"{(sums[0] / sums[-1]).item():.4f}",
                                         f"{job.unit}_s": f"{rate:.0f}"}, refresh=False)
                if cfg.max_minutes and time.perf_counter() - began >= 60 * cfg.max_minutes:
                    out_of_time = True
                    break
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step_in_epoch < last:
                    checkpoint()
        except KeyboardInterrupt:
            if bar is not None:
                bar.close()
            checkpoint()  # the last completed step; a resumed run repeats from the next one
            if d.main:
                print(f"ircnn: stopped at {job.name} step {step}; the checkpoint in {ckpt_dir} continues it with "
                      "--resume", file=sys.stderr, flush=True)
            raise
        if bar is not None:
            bar.close()
        seconds = time.perf_counter() - start
        totals = sum_over_processes(sums, d).tolist()
        if not np.isfinite(totals[0]):
            raise ValueError(f"training diverged (loss {totals[0]}) in {job.name} epoch {epoch + 1}; lower --lr "
                             f"(now {job.optimizer.defaults['lr']})")
        complete = step_in_epoch == spe
        record = job.record(EpochEnd(epoch + 1, step, complete, lr, seconds, seen * d.world / seconds, totals))
        if complete:
            epoch, step_in_epoch = epoch + 1, 0
            sums.zero_()
        if d.main and job.evaluate is not None:
            record.update(job.evaluate(ema.model))
        history.append(record)
        checkpoint()
        if d.main:
            on_epoch(record)
    return ema, history


def train_members(kind: str, count: int, run: dict, cfg: RunConfig, d: Dist, ckpt_dir: Path,
                  train_one: Callable[[int, Checkpoint | None], tuple[EMA, list[dict]]]) -> None:
    """Members ``0..count-1`` one after another, from the checkpoint's member on when resuming; each finished
    member's averaged weights wait in ``ckpt_dir`` (``load_member``) for the bundle."""
    resume = open_checkpoint(ckpt_dir, kind, run, cfg.resume, d.main)
    first = resume.state["member"] if resume else 0
    for member in range(first, count):
        ema, history = train_one(member, resume if member == first else None)
        if d.main:
            save_member(ckpt_dir, member, cpu_state(ema.model), history)
