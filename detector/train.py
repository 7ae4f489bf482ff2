"""Training a GoogLeNet classifier with the recipe of section 6 of "Going deeper with convolutions".

What the paper prescribes, and where it is here:

- "sampling of various sized patches of the image whose size is distributed evenly between 8% and 100% of the
  image area and whose aspect ratio is chosen randomly between 3/4 and 4/3": ``RandomResizedCrop`` scale and ratio;
- "random interpolation methods (bilinear, area, nearest neighbor and cubic, with equal probability)":
  ``RandomInterpolationResizedCrop``;
- "photometric distortions by Andrew Howard": random brightness, contrast and saturation (``ColorJitter``) and
  AlexNet's PCA lighting noise (``Lighting``), then horizontal flips;
- "asynchronous stochastic gradient descent with 0.9 momentum": synchronous SGD here (one process, or
  DistributedDataParallel under ``torchrun``), momentum 0.9;
- "decreasing the learning rate by 4% every 8 epochs": ``StepLR(step_size=8, gamma=0.96)`` stepped per epoch;
- "Polyak averaging was used to create the final model used at inference time": ``EMA``, an exponential moving
  average of the weights and buffers; the averaged weights are what the bundle gets;
- auxiliary losses weighted by 0.3 (section 5): ``googlenet_loss``.

What it leaves open comes from Caffe's ``bvlc_googlenet`` replication: learning rate 0.01 for a batch of 32,
weight decay 2e-4 on weights only (and, in ``GoogLeNet.reset_parameters``, its "xavier" initialisation).

Randomness is a pure function of the seed and the position in training: the augmentation of a sample depends
on (seed, epoch, sample index) and the dropout masks of a step on (seed, step, rank). The sampling order is
``DistributedSampler``'s (seed + epoch). So a checkpoint needs no RNG state beyond the member seed and its
position, and a resumed run, mid-epoch included, repeats the uninterrupted one for any ``--workers``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from torchvision.datasets import ImageFolder
from tqdm import tqdm

from detector.bundle import MAX_MEMBERS, Bundle, Preprocess, load_bundle, save_bundle
from detector.cpus import default_workers
from detector.googlenet import VARIANTS, GoogLeNetConfig, googlenet_loss
from detector.members import ArchConfig, build_member
from detector.image import IMAGE_SUFFIXES, read_image
from eval.classes import cls1000

CHECKPOINT_FORMAT = 1
CHECKPOINT_NAME = "checkpoint.pt"
# Checkpoints from a run with other values of these cannot continue this run.
RUN_KEYS = ("classes", "arch", "batch_size", "world_size", "seed", "size", "members")

# AlexNet's PCA of ImageNet RGB pixels in [0, 1] (Krizhevsky et al. 2012; the values fb.resnet.torch publishes).
IMAGENET_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_EIGVEC = ((-0.5675, 0.7192, 0.4009),
                   (-0.5808, -0.0045, -0.8140),
                   (-0.5836, -0.6948, 0.4203))


@dataclass(frozen=True)
class TrainConfig:
    data: str  # ImageFolder tree <class>/<images>
    out: str  # bundle directory to write
    val: str | None = None  # ImageFolder tree scored (top-1, averaged weights) after every epoch
    epochs: int = 60  # bvlc_googlenet's quick schedule; the paper does not say
    batch_size: int = 32  # per process (bvlc_googlenet: 32)
    lr: float = 0.01  # bvlc_googlenet's base_lr for a batch of 32
    momentum: float = 0.9  # section 6
    weight_decay: float = 2e-4  # bvlc_googlenet; weights only, no decay on biases
    lr_step_epochs: int = 8  # section 6: "decreasing the learning rate by 4% every 8 epochs"
    lr_gamma: float = 0.96
    ema_decay: float = 0.999  # Polyak averaging; see EMA for the warm-up
    min_area: float = 0.08  # section 6: crops of 8%..100% of the image area
    max_aspect: float = 4 / 3  # aspect ratio in [3/4, 4/3]
    jitter: float = 0.4  # brightness, contrast and saturation factors in [0.6, 1.4]
    lighting: float = 0.1  # std of AlexNet's PCA lighting noise
    variant: str = "paper"  # a new network's GoogLeNet variant; --init takes the bundle's architecture instead
    width: float = 1.0  # a new network's channel multiplier
    size: int = 224  # network input side
    members: int = 1  # ensemble members, trained one after another, member i with seed + i
    seed: int = 0
    init: str | None = None  # bundle whose weights start every member (member i from its member i mod n)
    resume: bool = False  # continue from the checkpoint (or start afresh when there is none)
    checkpoint_dir: str | None = None  # default <out>/.checkpoint
    checkpoint_every: int = 2000  # steps between mid-epoch checkpoints (0: at epoch ends only)
    max_steps: int = 0  # stop each member after this many steps (0: no limit)
    workers: int = default_workers(4)  # DataLoader processes per training process (cores, at most 4)
    device: str | None = None  # "cpu" or "cuda"; None picks cuda when available

    def __post_init__(self) -> None:
        positive = ("epochs", "batch_size", "lr", "lr_step_epochs", "lr_gamma", "size", "members")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name in ("weight_decay", "momentum", "seed", "checkpoint_every", "max_steps", "workers", "jitter",
                     "lighting"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"--ema-decay must be in [0, 1), got {self.ema_decay}")
        if not 0.0 < self.min_area <= 1.0 or self.max_aspect < 1.0:
            raise ValueError(f"need 0 < min_area <= 1 and max_aspect >= 1, got {self.min_area}, {self.max_aspect}")
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown --variant {self.variant!r}; choose one of {', '.join(VARIANTS)}")
        if self.members > MAX_MEMBERS:
            raise ValueError(f"--members must be at most {MAX_MEMBERS}, got {self.members}")
        if not 32 <= self.size <= 1024:
            raise ValueError(f"--size must be in 32..1024, got {self.size}")
        if self.device not in (None, "cpu", "cuda"):
            raise ValueError(f"--device must be cpu or cuda, got {self.device!r}")


# ---- data ------------------------------------------------------------------------------------------------


class RandomInterpolationResizedCrop(T.RandomResizedCrop):
    """``RandomResizedCrop`` whose resize uses bilinear, area, nearest or bicubic with equal probability
    (section 6). Input and output are PIL images; area is PIL's box filter."""

    MODES = (T.InterpolationMode.BILINEAR, T.InterpolationMode.BOX, T.InterpolationMode.NEAREST,
             T.InterpolationMode.BICUBIC)

    def forward(self, img: Image.Image) -> Image.Image:
        top, left, h, w = self.get_params(img, self.scale, self.ratio)
        mode = self.MODES[int(torch.randint(len(self.MODES), ()))]
        return TF.resized_crop(img, top, left, h, w, self.size, mode)


class Lighting(nn.Module):
    """AlexNet's PCA lighting noise: adds ``eigvec @ (alpha * eigval)``, ``alpha ~ N(0, std)``, to every pixel
    of ``Tensor[3, H, W]`` with values in [0, 1]."""

    def __init__(self, std: float) -> None:
        super().__init__()
        self.std = std
        self.register_buffer("eigval", torch.tensor(IMAGENET_EIGVAL))
        self.register_buffer("eigvec", torch.tensor(IMAGENET_EIGVEC))

    def forward(self, img: Tensor) -> Tensor:
        alpha = torch.randn(3) * self.std
        rgb = self.eigvec @ (alpha * self.eigval)  # [3]
        return img + rgb[:, None, None]


def train_transform(cfg: TrainConfig, pre: Preprocess) -> T.Compose:
    """PIL image -> normalised ``Tensor[3, size, size]`` with the paper's random crops and distortions."""
    return T.Compose([
        RandomInterpolationResizedCrop(pre.size, scale=(cfg.min_area, 1.0),
                                       ratio=(1 / cfg.max_aspect, cfg.max_aspect)),
        T.RandomHorizontalFlip(),
        T.ColorJitter(brightness=cfg.jitter, contrast=cfg.jitter, saturation=cfg.jitter),
        T.ToTensor(),
        Lighting(cfg.lighting),
        T.Normalize(pre.mean, pre.std),
    ])


def eval_transform(pre: Preprocess) -> T.Compose:
    """PIL image -> ``Tensor[3, size, size]``: shorter side to 256/224 of the input size, the centre crop."""
    return T.Compose([
        T.Resize(round(pre.size * 256 / 224)),
        T.CenterCrop(pre.size),
        T.ToTensor(),
        T.Normalize(pre.mean, pre.std),
    ])


def load_rgb(path: str) -> Image.Image:
    """The package's bounded decoder (EXIF orientation, alpha over white, any mode to RGB) as a PIL image."""
    return Image.fromarray(read_image(path))


def _is_image(path: str) -> bool:
    return path.lower().endswith(IMAGE_SUFFIXES)


def _seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from non-negative integers."""
    return int(np.random.SeedSequence(parts).generate_state(1, np.uint64)[0] >> np.uint64(1))


class Folder(ImageFolder):
    """An ImageFolder with a given folder -> target mapping. With ``seed``, the random transforms of sample
    ``i`` in epoch ``e`` draw from a generator seeded by (seed, e, i), whatever process loads it."""

    def __init__(self, root: str | os.PathLike, class_to_idx: dict[str, int], transform: Callable,
                 seed: int | None = None) -> None:
        self._given = dict(class_to_idx)
        self.seed, self.epoch = seed, 0
        super().__init__(str(root), transform=transform, loader=load_rgb, is_valid_file=_is_image)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        present = sorted(d.name for d in os.scandir(directory) if d.is_dir() and not d.name.startswith("."))
        unknown = [c for c in present if c not in self._given]
        if unknown:
            raise ValueError(f"{directory} has class folder(s) {unknown[:5]} that the training data does not have")
        return present, {c: self._given[c] for c in present}

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        if self.seed is None:
            return super().__getitem__(index)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_seed(self.seed, self.epoch, index))
            return super().__getitem__(index)


@dataclass(frozen=True)
class ClassList:
    names: tuple[str, ...]  # head order: output k is class names[k]
    folders: dict[str, int]  # training folder -> target index
    task: str  # "cls1000" (ILSVRC WNID folders, 1000-way head) or "classes" (the sorted folder names)


def resolve_classes(root: str | os.PathLike) -> ClassList:
    """The head of an ImageFolder tree: ILSVRC WNID folders keep their cls1000 index in a 1000-way head (so the
    bundle classifies and scores as any cls1000 model); otherwise the sorted folder names, one output each."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"--data {root} {'is not a directory' if root.exists() else 'does not exist'}; "
                         f"give an ImageFolder tree <class>/<images>")
    folders = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
    if len(folders) < 2:
        raise ValueError(f"--data {root} has {len(folders)} class folder(s) {folders}; a classifier needs at least "
                         f"2 (an ImageFolder tree <class>/<images>)")
    vocab = cls1000()
    if all(f in vocab.row_of_wnid for f in folders):
        return ClassList(vocab.wnids, {f: vocab.row_of_wnid[f] for f in folders}, "cls1000")
    return ClassList(tuple(folders), {f: i for i, f in enumerate(folders)}, "classes")


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


# ---- processes -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dist:
    rank: int  # this process among all (0 writes checkpoints, the bundle and progress)
    world: int  # processes; the global batch is world x batch_size
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_dist(device: str | None) -> Dist:
    """One process, or one of ``torchrun``'s (WORLD_SIZE, RANK, LOCAL_RANK): gloo on CPU, nccl on CUDA."""
    kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA device is available; use --device cpu")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(0, 1, torch.device(kind))
    local = int(os.environ["LOCAL_RANK"])
    if kind == "cuda":
        torch.cuda.set_device(local)
    elif "OMP_NUM_THREADS" not in os.environ:  # share the cores between the processes on this machine
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if kind == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), torch.device(kind, local) if kind == "cuda" else
                torch.device("cpu"))


def _sum_over_processes(t: Tensor, d: Dist) -> Tensor:
    if d.world > 1:
        t = t.clone()
        dist.all_reduce(t)
    return t


# ---- checkpoints -----------------------------------------------------------------------------------------


def save_checkpoint(path: Path, doc: dict) -> None:
    """Write atomically: a crash leaves the previous checkpoint, never half of a new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(doc, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, run: dict) -> dict:
    """Tensors, numbers, strings, lists and dicts only (``weights_only=True``); refuses another run's."""
    try:
        doc = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} is not a loadable checkpoint: {str(e)[:300]}; delete it to start afresh") from None
    if not isinstance(doc, dict) or doc.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a checkpoint of format {CHECKPOINT_FORMAT}; delete it to start afresh")
    for key in RUN_KEYS:
        if doc["run"].get(key) != run[key]:
            shown = "(differs)" if key == "classes" else f"{doc['run'].get(key)!r}, this run has {run[key]!r}"
            raise ValueError(f"{path} was made with a different {key}: {shown}; resume with the same settings, "
                             f"or pass another --checkpoint-dir")
    return doc


# ---- training --------------------------------------------------------------------------------------------


def restore_training(doc: dict, model: nn.Module, ema: EMA, opt: torch.optim.Optimizer, sched) -> tuple[int, int, int]:
    """Load a checkpoint's model, averaged weights, optimiser and schedule; returns (epoch, step in epoch, step)."""
    model.load_state_dict(doc["model"])
    ema.model.load_state_dict(doc["ema"])
    ema.updates = doc["ema_updates"]
    opt.load_state_dict(doc["optimizer"])
    sched.load_state_dict(doc["scheduler"])
    return doc["epoch"], doc["step_in_epoch"], doc["step"]


def top1(model: nn.Module, loader: DataLoader, device: torch.device) -> float:
    """Fraction of images whose highest-scoring output is their class; ``model`` maps ``Tensor[B, 3, S, S]``
    to ``Tensor[B, C]`` in eval mode."""
    correct = total = 0
    with torch.inference_mode():
        for x, y in loader:
            pred = model(x.to(device)).argmax(1).cpu()
            correct += int((pred == y).sum())
            total += len(y)
    return correct / max(total, 1)


def _new_model(arch: ArchConfig, seed: int, init: Bundle | None, member: int) -> nn.Module:
    torch.manual_seed(seed)
    model = build_member(arch)
    if init is not None:
        model.load_state_dict(init.members[member % len(init.members)].state_dict())
    return model


def train_member(cfg: TrainConfig, member: int, arch: GoogLeNetConfig, data: Folder, val: DataLoader | None,
                 d: Dist, run: dict, ckpt_path: Path, init: Bundle | None, resume_doc: dict | None,
                 on_epoch: Callable[[dict], None]) -> tuple[dict[str, Tensor], list[dict]]:
    """Train one member; returns its averaged weights (a GoogLeNet state dict) and its per-epoch records."""
    seed = cfg.seed + member
    data.seed = seed  # this member's augmentations, as its sampling order, come from its own seed
    model = _new_model(arch, seed, init, member).to(d.device)
    ema = EMA(model, cfg.ema_decay)
    decay = [p for p in model.parameters() if p.ndim > 1]  # conv and linear weights; not biases
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": cfg.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, momentum=cfg.momentum)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.lr_step_epochs, gamma=cfg.lr_gamma)
    epoch = step_in_epoch = step = 0
    sums = torch.zeros(2, dtype=torch.float64, device=d.device)  # [loss sum, steps] of this epoch so far
    history: list[dict] = []
    if resume_doc is not None:
        epoch, step_in_epoch, step = restore_training(resume_doc, model, ema, opt, sched)
        history = list(resume_doc["history"])
        if d.main:  # the other processes' shares are in the saved sum already
            sums = resume_doc["loss_sums"].to(d.device, torch.float64)
    live = model
    if d.world > 1:
        model = DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    sampler = DistributedSampler(data, num_replicas=d.world, rank=d.rank, shuffle=True, seed=seed)
    steps_per_epoch = len(sampler) // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"--data has {len(data)} images, fewer than one batch of {cfg.batch_size} per process "
                         f"({d.world} processes); lower --batch-size")

    def checkpoint() -> None:
        global_sums = _sum_over_processes(sums, d)
        if d.main:
            save_checkpoint(ckpt_path, {
                "format": CHECKPOINT_FORMAT, "run": run, "member": member, "epoch": epoch,
                "step_in_epoch": step_in_epoch, "step": step, "model": live.state_dict(),
                "ema": ema.model.state_dict(), "ema_updates": ema.updates, "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "loss_sums": global_sums.cpu(), "history": history})

    def stopped() -> bool:
        return bool(cfg.max_steps) and step >= cfg.max_steps

    while epoch < cfg.epochs and not stopped():
        sampler.set_epoch(epoch)
        data.epoch = epoch
        indices = list(sampler)[step_in_epoch * cfg.batch_size: steps_per_epoch * cfg.batch_size]
        loader = DataLoader(data, batch_size=cfg.batch_size, sampler=indices, num_workers=cfg.workers,
                            pin_memory=d.device.type == "cuda")
        lr = opt.param_groups[0]["lr"]
        model.train()
        start, seen = time.perf_counter(), 0
        bar = tqdm(total=steps_per_epoch, initial=step_in_epoch, desc=f"member {member} epoch {epoch + 1}",
                   unit="step", disable=None if d.main else True, leave=False)
        for x, y in loader:
            torch.manual_seed(_seed(seed, step, d.rank))  # dropout masks: a function of (seed, step, rank)
            x, y = x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True)
            loss = googlenet_loss(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ema.update(live)
            sums[0] += loss.detach()
            sums[1] += 1
            step, step_in_epoch, seen = step + 1, step_in_epoch + 1, seen + len(y)
            bar.update()
            if step % 10 == 0 or step_in_epoch == steps_per_epoch:
                rate = seen * d.world / (time.perf_counter() - start)
                bar.set_postfix(loss=f"{(sums[0] / sums[1]).item():.4f}", img_s=f"{rate:.0f}", refresh=False)
            if stopped():
                break
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step_in_epoch < steps_per_epoch:
                checkpoint()
        bar.close()
        seconds = time.perf_counter() - start
        loss_sum, count = _sum_over_processes(sums, d).tolist()
        if not np.isfinite(loss_sum):
            raise ValueError(f"training diverged (loss {loss_sum}) in member {member} epoch {epoch + 1}; "
                             f"lower --lr (now {cfg.lr})")
        record = {"member": member, "epoch": epoch + 1, "epochs": cfg.epochs, "step": step,
                  "complete": step_in_epoch == steps_per_epoch, "train_loss": loss_sum / max(count, 1.0),
                  "lr": lr, "images_per_s": seen * d.world / seconds, "seconds": seconds, "val_top1": None}
        if record["complete"]:
            epoch, step_in_epoch = epoch + 1, 0
            sums.zero_()
            sched.step()
        if d.main and val is not None:
            record["val_top1"] = top1(ema.model, val, d.device)
        history.append(record)
        checkpoint()
        if d.main:
            on_epoch(record)
    return {k: v.detach().cpu().contiguous() for k, v in ema.model.state_dict().items()}, history


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


def train(cfg: TrainConfig, on_epoch: Callable[[dict], None] = lambda record: None) -> Bundle | None:
    """Train ``cfg.members`` GoogLeNets on ``cfg.data`` and write their averaged weights as a bundle.

    ``on_epoch`` gets one record per epoch (rank 0 only): member, epoch, step, train_loss, lr, images_per_s,
    seconds, val_top1. Returns the saved bundle on rank 0 and ``None`` on the other processes.
    """
    classes = resolve_classes(cfg.data)
    init = load_bundle(cfg.init) if cfg.init else None
    if init is not None:
        arch, mean, std = init.arch, init.preprocess.mean, init.preprocess.std
        if arch.num_classes != len(classes.names):
            raise ValueError(f"--init {cfg.init} has {arch.num_classes} outputs, the data needs {len(classes.names)} "
                             f"({'ILSVRC WNID folders' if classes.task == 'cls1000' else 'one per class folder'})")
    else:
        arch = GoogLeNetConfig(variant=cfg.variant, num_classes=len(classes.names), width=cfg.width)
        mean, std = Preprocess().mean, Preprocess().std
    pre = Preprocess(size=cfg.size, mean=mean, std=std)
    if cfg.val is not None and not Path(cfg.val).is_dir():
        raise ValueError(f"--val {cfg.val} is not a directory; give an ImageFolder tree <class>/<images>")

    d = setup_dist(cfg.device)
    try:
        data = Folder(cfg.data, classes.folders, train_transform(cfg, pre), seed=cfg.seed)
        val = None
        if cfg.val is not None and d.main:
            val = DataLoader(Folder(cfg.val, classes.folders, eval_transform(pre)), batch_size=cfg.batch_size,
                             num_workers=cfg.workers)
        ckpt_dir = Path(cfg.checkpoint_dir or Path(cfg.out) / ".checkpoint")
        ckpt_path = ckpt_dir / CHECKPOINT_NAME
        run = {"classes": list(classes.names), "arch": arch.to_dict(), "batch_size": cfg.batch_size,
               "world_size": d.world, "seed": cfg.seed, "size": cfg.size, "members": cfg.members}
        doc = None
        if ckpt_path.exists():
            if not cfg.resume:
                raise ValueError(f"{ckpt_path} exists from an earlier run; pass --resume to continue it, or delete "
                                 f"it (or pick another --checkpoint-dir) to start afresh")
            doc = load_checkpoint(ckpt_path, run)
        elif cfg.resume and d.main:
            print(f"ircnn: no checkpoint at {ckpt_path}; starting afresh", file=sys.stderr, flush=True)
        first = doc["member"] if doc else 0
        for member in range(first, cfg.members):
            weights, history = train_member(cfg, member, arch, data, val, d, run, ckpt_path, init,
                                            doc if member == first else None, on_epoch)
            if d.main:  # finished members wait here for the bundle; the checkpoint moves on to the next
                save_member(ckpt_dir, member, weights, history)
        if not d.main:
            return None
        members, records = [], []
        for member, (net, history) in enumerate(load_members(ckpt_dir, [arch] * cfg.members)):
            curve = [{k: r[k] for k in ("epoch", "step", "complete", "train_loss", "val_top1", "lr")} for r in history]
            records.append({"member": member, "seed": cfg.seed + member, "epochs": curve})
            members.append(net)
        provenance = {
            "source": "train-classifier", "data": str(cfg.data), "data_classes": len(classes.folders),
            "member_seeds": [cfg.seed + i for i in range(cfg.members)],
            "world_size": d.world, "recipe": dataclasses.asdict(cfg), "members": records,
            "weights": "Polyak average (EMA) of the training weights"}
        if classes.task == "classes":  # a cls1000 head's classes are the task's
            provenance["classes"] = list(classes.names)
        bundle = Bundle(task=classes.task, members=members, preprocess=pre, provenance=provenance)
        save_bundle(cfg.out, bundle)
        return bundle
    finally:
        if d.world > 1 and dist.is_initialized():
            dist.destroy_process_group()
