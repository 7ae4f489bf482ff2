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
- "decreasing the learning rate by 4% every 8 epochs": ``StepLR(gamma=0.96)`` over 8 epochs of steps;
- "Polyak averaging was used to create the final model used at inference time": ``EMA``, an exponential moving
  average of the weights and buffers; the averaged weights are what the bundle gets;
- auxiliary losses weighted by 0.3 (section 5): ``googlenet_loss``.

What it leaves open comes from Caffe's ``bvlc_googlenet`` replication: learning rate 0.01 for a batch of 32,
weight decay 2e-4 on weights only (and, in ``GoogLeNet.reset_parameters``, its "xavier" initialisation).

The loop, Polyak averaging, checkpoints and processes are ``detector.training.engine``'s; the augmentation of a
sample depends on (seed, epoch, sample index) and the sampling order is ``DistributedSampler``'s (seed + epoch),
so a resumed run, mid-epoch included, repeats the uninterrupted one for any ``--workers``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler
from torchvision.datasets import ImageFolder

from detector.bundle.format import Bundle, Preprocess, load_bundle, save_bundle
from detector.image import IMAGE_SUFFIXES, read_image
from detector.nets.googlenet import GoogLeNetConfig, googlenet_loss
from detector.nets.members import ArchConfig, build_member
from detector.training.checkpoint import Checkpoint, load_members
from detector.training.engine import (EMA, Dist, EpochEnd, Job, RunConfig, check_network, check_non_negative,
                                      check_positive, fit, mix_seed, param_groups, processes, recipe, train_members)
from eval.classes import cls1000

# AlexNet's PCA of ImageNet RGB pixels in [0, 1] (Krizhevsky et al. 2012; the values fb.resnet.torch publishes).
IMAGENET_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_EIGVEC = ((-0.5675, 0.7192, 0.4009),
                   (-0.5808, -0.0045, -0.8140),
                   (-0.5836, -0.6948, 0.4203))


@dataclass(frozen=True)
class ClassifierTrainConfig:
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
    min_area: float = 0.08  # section 6: crops of 8%..100% of the image area
    max_aspect: float = 4 / 3  # aspect ratio in [3/4, 4/3]
    jitter: float = 0.4  # brightness, contrast and saturation factors in [0.6, 1.4]
    lighting: float = 0.1  # std of AlexNet's PCA lighting noise
    variant: str = "paper"  # a new network's GoogLeNet variant; --init takes the bundle's architecture instead
    width: float = 1.0  # a new network's channel multiplier
    size: int = 224  # network input side
    members: int = 1  # ensemble members, trained one after another, member i with seed + i
    init: str | None = None  # bundle whose weights start every member (member i from its member i mod n)
    run: RunConfig = field(default_factory=RunConfig)  # seed (member i: seed + i), device, workers, EMA, checkpoints

    def __post_init__(self) -> None:
        check_positive(self, ("epochs", "batch_size", "lr", "lr_step_epochs", "lr_gamma", "size", "members"))
        check_non_negative(self, ("weight_decay", "momentum", "jitter", "lighting"))
        if not 0.0 < self.min_area <= 1.0 or self.max_aspect < 1.0:
            raise ValueError(f"need 0 < min_area <= 1 and max_aspect >= 1, got {self.min_area}, {self.max_aspect}")
        check_network(self.variant, self.size, self.members)


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


def train_transform(cfg: ClassifierTrainConfig, pre: Preprocess) -> T.Compose:
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
            torch.manual_seed(mix_seed(self.seed, self.epoch, index))
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


# ---- training --------------------------------------------------------------------------------------------


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


def member_job(cfg: ClassifierTrainConfig, member: int, arch: ArchConfig, data: Folder, val: DataLoader | None,
               d: Dist, run: dict, init: Bundle | None) -> Job:
    """Member ``member``'s training: SGD with momentum, the paper's schedule, ``googlenet_loss``."""
    seed = cfg.run.seed + member
    data.seed = seed  # this member's augmentations, as its sampling order, come from its own seed
    model = _new_model(arch, seed, init, member).to(d.device)
    opt = torch.optim.SGD(param_groups(model, cfg.weight_decay), lr=cfg.lr, momentum=cfg.momentum)
    sampler = DistributedSampler(data, num_replicas=d.world, rank=d.rank, shuffle=True, seed=seed)
    steps_per_epoch = len(sampler) // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"--data has {len(data)} images, fewer than one batch of {cfg.batch_size} per process "
                         f"({d.world} processes); lower --batch-size")
    # -4% every lr_step_epochs epochs, stepped per step: the same rates as a StepLR stepped per epoch
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.lr_step_epochs * steps_per_epoch, gamma=cfg.lr_gamma)

    def batches(epoch: int, first: int, end: int) -> DataLoader:
        sampler.set_epoch(epoch)
        data.epoch = epoch
        indices = list(sampler)[first * cfg.batch_size: end * cfg.batch_size]
        return DataLoader(data, batch_size=cfg.batch_size, sampler=indices, num_workers=cfg.run.workers,
                          pin_memory=d.device.type == "cuda")

    def step(net: nn.Module, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, int]:
        x, y = (t.to(d.device, non_blocking=True) for t in batch)
        loss = googlenet_loss(net(x), y)
        return loss, loss.detach().double()[None], len(y)

    def record(e: EpochEnd) -> dict:
        return {"member": member, "epoch": e.epoch, "epochs": cfg.epochs, "step": e.step, "complete": e.complete,
                "train_loss": e.mean(0), "lr": e.lr, "images_per_s": e.rate, "seconds": e.seconds, "val_top1": None}

    evaluate = None if val is None else (lambda averaged: {"val_top1": top1(averaged, val, d.device)})
    return Job(kind="classifier", name=f"member {member}", member=member, seed=seed, run=run, model=model,
               optimizer=opt, scheduler=sched, steps_per_epoch=steps_per_epoch,
               total_steps=cfg.epochs * steps_per_epoch, batches=batches, step=step, stats=1, record=record,
               evaluate=evaluate)


def train_classifier(cfg: ClassifierTrainConfig,
                     on_epoch: Callable[[dict], None] = lambda record: None) -> Bundle | None:
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

    with processes(cfg.run.device) as d:
        data = Folder(cfg.data, classes.folders, train_transform(cfg, pre), seed=cfg.run.seed)
        val = None
        if cfg.val is not None and d.main:
            val = DataLoader(Folder(cfg.val, classes.folders, eval_transform(pre)), batch_size=cfg.batch_size,
                             num_workers=cfg.run.workers)
        ckpt_dir = Path(cfg.run.checkpoint_dir or Path(cfg.out) / ".checkpoint")
        run = {"classes": list(classes.names), "arch": arch.to_dict(), "batch_size": cfg.batch_size,
               "world_size": d.world, "seed": cfg.run.seed, "size": cfg.size, "members": cfg.members}

        def train_one(member: int, resume: Checkpoint | None) -> tuple[EMA, list[dict]]:
            job = member_job(cfg, member, arch, data, val, d, run, init)
            return fit(job, cfg.run, d, ckpt_dir, resume, on_epoch)

        train_members("classifier", cfg.members, run, cfg.run, d, ckpt_dir, train_one)
        if not d.main:
            return None
        members, records = [], []
        for member, (net, history) in enumerate(load_members(ckpt_dir, [arch] * cfg.members)):
            curve = [{k: r[k] for k in ("epoch", "step", "complete", "train_loss", "val_top1", "lr")} for r in history]
            records.append({"member": member, "seed": cfg.run.seed + member, "epochs": curve})
            members.append(net)
        provenance = {
            "source": "train-classifier", "data": str(cfg.data), "data_classes": len(classes.folders),
            "member_seeds": [cfg.run.seed + i for i in range(cfg.members)],
            "world_size": d.world, "recipe": recipe(cfg), "members": records,
            "weights": "Polyak average (EMA) of the training weights"}
        if classes.task == "classes":  # a cls1000 head's classes are the task's
            provenance["classes"] = list(classes.names)
        bundle = Bundle(task=classes.task, members=members, preprocess=pre, provenance=provenance)
        save_bundle(cfg.out, bundle)
        return bundle
