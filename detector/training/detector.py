"""Detection fine-tuning (``ircnn train detector``): R-CNN's recipe (section 8) with GoogLeNet region classifiers,
or the members of a ``--from`` bundle (EfficientNet-Lite included).

The paper: "similar to the R-CNN ... augmented with the Inception model as the region classifier ... we use an
ensemble of 6 ConvNets when classifying each region", members of "the exact same topology (trained with different
sampling methods)" that "only differ in sampling methodologies and the random order in which they see input
images" (section 7). What is taken from R-CNN (Girshick et al. 2014, section 2.3 and its Caffe window data layer):

- **Labels**: a proposal whose IoU with a ground-truth box is >= 0.5 takes that box's class (the box with the
  highest IoU); every other proposal is background. Ground-truth boxes are added as positives. R-CNN's fine-tuning
  uses all of [0, 0.5) as background and so does member 0 here: on ILSVRC most proposals are pure background, and
  the network must learn to reject them, since at test time it scores them all. Fast R-CNN's [0.1, 0.5) (a cheap
  hard-negative mining) is one of the ways later members differ (``MEMBER_VARIANTS``).
- **Mini-batches**: 128 windows, 32 foreground and 96 background, each drawn over all training images (R-CNN's
  window data layer), not a fixed number of images per batch. An epoch is one pass over the foreground windows in
  a member-specific random order; background windows are drawn uniformly with replacement (there are ~100 times
  more of them). Each window is warped with ``detector.pipeline.warp.warp_regions`` (R-CNN's anisotropic warp with
  ``context`` pixels of context at the network's input scale) and flipped horizontally with probability ``flip``.
- **Optimiser**: SGD, momentum 0.9, weight decay 5e-4 on weights (R-CNN), learning rate 0.001 from a classifier
  (R-CNN: "1/10th of the initial pre-training rate"), 0.01 from random weights; the paper's schedule (-4% every 8
  epochs); Polyak averaging (``detector.training.engine.EMA``): the bundle gets the averaged weights.
- **Head**: K + 1 outputs, column 0 background, column j the DET class ``provenance["det_ids"][j - 1]``, the
  classes being the DET classes present in the training annotations. From a classifier bundle every tensor but
  the classifiers (``fc``, ``aux*.fc2``) is copied; the head starts fresh.

Proposals (coarsened selective search, plus MultiBox with ``multibox_from``) are computed once per image and kept
in ``detector.training.proposal_cache.ProposalCache``; windows and batches are ``detector.training.windows``'.
The loop, checkpoints (safetensors plus JSON; Ctrl-C writes one before stopping) and resume are
``detector.training.engine``'s: a resumed run, mid-epoch included, repeats the uninterrupted one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader

from detector.bundle.format import Bundle, Preprocess, load_bundle, read_manifest, save_bundle
from detector.files import file_sha256
from detector.bundle.multibox import load_multibox, multibox_provenance, save_multibox
from detector.cpus import default_workers
from detector.nets.googlenet import GoogLeNetConfig, googlenet_loss
from detector.nets.members import ArchConfig, build_member, is_head, with_classes
from detector.pipeline.scoring import fill_colour
from detector.progress import track
from detector.training.checkpoint import Checkpoint, load_members
from detector.training.engine import (EMA, Dist, EpochEnd, Job, RunConfig, check_network, check_non_negative,
                                      check_positive, fit, param_groups, processes, recipe, train_members)
from detector.training.proposal_cache import CachedProposals, ProposalCache
from detector.training.windows import (
    DetImage,
    WindowBatches,
    Windows,
    WindowSampler,
    build_windows,
    object_recall,
    read_detection_split,
)
from eval.classes import det200
from proposals.combine import ProposalGenerator
from proposals.config import MergeConfig, ProposalConfig, SelectiveSearchConfig

# How member i differs from the others (cycled past 6): the paper's members share the topology and differ in
# "sampling methodologies and the random order in which they see input images". The order comes from the seed
# (seed + i); these vary what a window looks like and which background it is drawn from. ``context`` is in pixels
# at a 224 px input (R-CNN's p = 16) and scales with ``size``; ``bg_low`` is the lowest IoU a background window
# may have (R-CNN 0, Fast R-CNN 0.1).
MEMBER_VARIANTS = (
    {"context": 16, "flip": 0.5, "bg_low": 0.0},  # R-CNN's recipe as published
    {"context": 8, "flip": 0.5, "bg_low": 0.0},  # tighter crops
    {"context": 16, "flip": 0.5, "bg_low": 0.1},  # background near objects only (Fast R-CNN)
    {"context": 24, "flip": 0.5, "bg_low": 0.0},  # wider context
    {"context": 16, "flip": 0.0, "bg_low": 0.0},  # no flips
    {"context": 8, "flip": 0.5, "bg_low": 0.1},
)


@dataclass(frozen=True)
class DetectorTrainConfig:
    data: str  # ILSVRC-format root: Data/DET, Annotations/DET, ImageSets/DET
    out: str  # bundle directory to write (task det200, K + 1 outputs)
    imageset: str = "ImageSets/DET/train.txt"  # training images, relative to data (or absolute)
    init: str | None = None  # --from: classifier (or detector) bundle whose weights start every member
    members: int = 6  # section 8: an ensemble of 6
    variant: str = "paper"  # a new network's GoogLeNet variant; --from takes the bundle's architecture
    width: float = 1.0  # a new network's channel multiplier
    aux_logits: bool = True  # a new network's auxiliary heads (their loss x0.3, section 5)
    size: int = 224  # network input side; warped windows are size x size
    epochs: int = 10  # passes over the foreground windows (per member)
    iterations: int = 0  # steps per member; 0: epochs decide
    batch_size: int = 128  # windows per step and process (R-CNN: 128)
    fg_per_batch: int = 32  # foreground windows among them (R-CNN: 32)
    fg_iou: float = 0.5  # a proposal with IoU >= this with a ground-truth box takes its class; below, background
    lr: float | None = None  # None: 0.001 with --from (R-CNN), 0.01 from random weights
    momentum: float = 0.9
    weight_decay: float = 5e-4  # R-CNN's; weights only, not biases
    lr_step_epochs: int = 8  # section 6: "decreasing the learning rate by 4% every 8 epochs"
    lr_gamma: float = 0.96
    vary_members: bool = True  # members take MEMBER_VARIANTS[i % 6]; False: all take member 0's
    # proposals as detection makes them (proposals.config's defaults: section 8's 2x coarser superpixels, R-CNN's
    # 500 px segmentation width, the 3,000 cap after merging)
    selective_search: bool = True
    coarsen: float = SelectiveSearchConfig.coarsen
    selective_search_width: int = SelectiveSearchConfig.resize_width
    multibox_from: str | None = None  # bundle whose MultiBox adds its boxes to the proposals (and is copied)
    max_proposals: int = MergeConfig.max_proposals
    proposals_cache: str | None = None  # default <out>/.proposals
    image_cache_mb: int = 512  # decoded images kept per loading process
    # seed (member i: seed + i), device, EMA, checkpoints (default <out>/.detector-checkpoint), max_minutes;
    # R-CNN's steps are short, so checkpoints come more often, and two window loaders keep up with them
    run: RunConfig = field(default_factory=lambda: RunConfig(checkpoint_every=200, workers=default_workers(2)))

    def __post_init__(self) -> None:
        check_positive(self, ("members", "size", "epochs", "batch_size", "fg_per_batch", "lr_step_epochs",
                              "lr_gamma", "max_proposals"))
        check_non_negative(self, ("iterations", "momentum", "weight_decay", "image_cache_mb"))
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        if self.fg_per_batch >= self.batch_size:
            raise ValueError(f"--fg-per-batch ({self.fg_per_batch}) must be below --batch ({self.batch_size}): "
                             "a batch needs background windows too")
        if not 0.0 < self.fg_iou <= 1.0:
            raise ValueError(f"fg_iou must be in (0, 1], got {self.fg_iou}")
        check_network(self.variant, self.size, self.members)
        if not self.selective_search and self.multibox_from is None:
            raise ValueError("no proposal source: keep selective search on or give --multibox-from")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (0.001 if self.init else 0.01)


def member_variant(cfg: DetectorTrainConfig, member: int) -> dict:
    """Member ``member``'s sampling: seed, context (pixels at ``cfg.size``), flip probability, background IoU floor."""
    v = MEMBER_VARIANTS[member % len(MEMBER_VARIANTS) if cfg.vary_members else 0]
    return {"member": member, "seed": cfg.run.seed + member, "context": round(v["context"] * cfg.size / 224),
            "context_at_224": v["context"], "flip": v["flip"], "bg_iou": [v["bg_low"], cfg.fg_iou]}




# ---- proposals -------------------------------------------------------------------------------------------


def proposal_config(cfg: DetectorTrainConfig) -> ProposalConfig:
    """The proposals the detector is trained on, as the detector's ``ProposalConfig``."""
    return ProposalConfig(selective_search=cfg.selective_search,
                          search=SelectiveSearchConfig(coarsen=cfg.coarsen, resize_width=cfg.selective_search_width),
                          merge=MergeConfig(max_proposals=cfg.max_proposals))


@contextmanager
def proposal_generator(cfg: DetectorTrainConfig) -> Iterator[ProposalGenerator]:
    """What the detector is trained on: coarsened selective search and/or the MultiBox of ``multibox_from``,
    merged; the selective search workers stop on the way out."""
    multibox = load_multibox(cfg.multibox_from) if cfg.multibox_from is not None else None
    generator = ProposalGenerator.from_config(proposal_config(cfg), multibox)  # the detector's one builder
    try:
        yield generator
    finally:
        generator.close()


def proposal_settings(cfg: DetectorTrainConfig) -> dict:
    """What the cached boxes depend on (the cache folder's hash); MultiBox by its weights' SHA-256."""
    config = proposal_config(cfg)
    ss, merge = (config.search if config.selective_search else None), config.merge
    multibox = None
    if cfg.multibox_from is not None:
        name = read_manifest(cfg.multibox_from).get("multibox")
        if name is None:
            raise ValueError(f"--multibox-from {cfg.multibox_from} has no MultiBox network; train one with "
                             f"`ircnn train multibox --out {cfg.multibox_from}`")
        multibox = {"sha256": file_sha256(Path(cfg.multibox_from) / name)}
    return {"format": 1, "selective_search": asdict(ss) if ss is not None else None, "multibox": multibox,
            "merge": asdict(merge)}


def compute_proposals(cfg: DetectorTrainConfig, images: list[DetImage], cache: ProposalCache, d: Dist,
                      show: bool = True) -> tuple[list[CachedProposals], dict]:
    """Every image's proposals, from the cache where present, and what this process found in the cache
    (``cached``, ``computed``, ``repaired``). Under torchrun, rank r computes images r::world, then all ranks
    read the cache."""
    todo = [im for i, im in enumerate(images) if i % d.world == d.rank]
    with proposal_generator(cfg) as generate:
        def compute(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            props, _ = generate(pixels)
            return props.boxes.numpy(), props.source.numpy()

        for im in track(todo, len(todo), "proposals", "img", show=show and d.main):
            cache.get_or_compute(im.path, compute)
    stats = {"cached": cache.hits, "computed": cache.misses, "repaired": cache.repaired}
    if d.world > 1:
        dist.barrier()
    return [cache.get_or_compute(im.path, _refuse_compute) for im in images], stats


def _refuse_compute(pixels: np.ndarray):
    raise ValueError("proposal cache lost a file that was just written; check the --proposals-cache folder")


# ---- training --------------------------------------------------------------------------------------------


def new_member(arch: ArchConfig, seed: int, init: Bundle | None, member: int, keep_head: bool) -> nn.Module:
    """A fresh member (seeded): the init bundle's member ``member mod n`` copied in except for the classifiers,
    which stay new unless ``keep_head`` (the init bundle is a detector over the same classes)."""
    torch.manual_seed(seed)
    model = build_member(arch)
    if init is not None:
        source = init.members[member % len(init.members)].state_dict()
        state = {k: v for k, v in source.items() if keep_head or not is_head(arch, k)}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or any(not is_head(arch, k) for k in missing):
            raise ValueError(f"--from bundle does not match the new network: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}")
    return model


@dataclass
class Member:
    """What one member's training needs beyond the config."""

    index: int
    variant: dict  # member_variant(...)
    arch: ArchConfig
    preprocess: Preprocess
    init: Bundle | None
    keep_head: bool


def member_job(cfg: DetectorTrainConfig, m: Member, images: list[DetImage], windows: Windows, d: Dist,
               run: dict) -> Job:
    """Member ``m``'s training: R-CNN's window batches, SGD with momentum, the paper's schedule."""
    seed = m.variant["seed"]
    sampler = WindowSampler(windows, cfg.batch_size, cfg.fg_per_batch, tuple(m.variant["bg_iou"]), seed, d.world)
    data = WindowBatches(images, windows, sampler, cfg.size, m.variant["context"], m.variant["flip"],
                         fill_colour(m.preprocess), d.rank, cfg.image_cache_mb)
    steps_per_epoch = sampler.steps_per_epoch
    total_steps = cfg.iterations or cfg.epochs * steps_per_epoch
    epochs = math.ceil(total_steps / steps_per_epoch)

    model = new_member(m.arch, seed, m.init, m.index, m.keep_head).to(d.device)
    channels_last = d.device.type == "cpu"  # NHWC convolutions: faster training on CPUs
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(param_groups(model, cfg.weight_decay), lr=cfg.learning_rate, momentum=cfg.momentum)
    sched = torch.optim.lr_scheduler.LambdaLR(  # -4% every lr_step_epochs epochs
        opt, lambda s: cfg.lr_gamma ** (s // steps_per_epoch // cfg.lr_step_epochs))
    scale = (1.0 / (255.0 * torch.tensor(m.preprocess.std))).view(1, 3, 1, 1).to(d.device)
    shift = (-torch.tensor(m.preprocess.mean) / torch.tensor(m.preprocess.std)).view(1, 3, 1, 1).to(d.device)

    def batches(epoch: int, first: int, end: int) -> DataLoader:
        data.epoch = epoch
        return DataLoader(data, batch_size=None, sampler=range(first, end), num_workers=cfg.run.workers,
                          pin_memory=d.device.type == "cuda", persistent_workers=False)

    def step(net: nn.Module, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, int]:
        x, y = batch
        x = x.to(d.device, non_blocking=True).float() * scale + shift
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = y.to(d.device, non_blocking=True)
        out = net(x)
        loss = googlenet_loss(out, y)
        with torch.no_grad():
            right = ((out[0] if isinstance(out, tuple) else out).argmax(1) == y).double()
            fg = y > 0
            stats = torch.stack([loss.detach().double(), right[fg].sum(), fg.sum().double(), right[~fg].sum(),
                                 (~fg).sum().double()])  # loss, fg right, fg count, bg right, bg count
        return loss, stats, len(y)

    def record(e: EpochEnd) -> dict:
        _, fg_right, fg_n, bg_right, bg_n, _ = e.sums
        return {"member": m.index, "epoch": e.epoch, "epochs": epochs, "step": e.step, "steps": total_steps,
                "complete": e.complete, "train_loss": e.mean(0), "fg_accuracy": fg_right / max(fg_n, 1),
                "bg_accuracy": bg_right / max(bg_n, 1), "lr": e.lr, "regions_per_s": e.rate, "seconds": e.seconds}

    return Job(kind="detector", name=f"member {m.index}", member=m.index, seed=seed, run=run, model=model,
               optimizer=opt, scheduler=sched, steps_per_epoch=steps_per_epoch, total_steps=total_steps,
               batches=batches, step=step, stats=5, record=record, unit="reg")


def train_detector(cfg: DetectorTrainConfig, on_epoch: Callable[[dict], None] = lambda record: None,
                   on_proposals: Callable[[dict], None] = lambda summary: None) -> Bundle | None:
    """Fine-tune ``cfg.members`` region classifiers on ``cfg.data`` and write a ``det200`` bundle to ``cfg.out``.

    ``on_proposals`` gets one summary of the proposal step (images, cache hits, boxes per image, recall at
    ``fg_iou``, windows); ``on_epoch`` one record per epoch: member, epoch, step, train_loss, fg_accuracy,
    bg_accuracy, lr, regions_per_s, seconds. Returns the bundle on rank 0, None on other processes.
    """
    images = read_detection_split(cfg.data, cfg.imageset)
    det_ids = sorted({int(c) for im in images for c in im.det_ids})
    if not det_ids:
        raise ValueError(f"{cfg.imageset} of {cfg.data} has no annotated objects; a detector needs some")
    column_of = {c: j + 1 for j, c in enumerate(det_ids)}
    init = load_bundle(cfg.init) if cfg.init else None
    if init is not None:  # R-CNN: the pretrained networks, each with a new background + K head
        archs = [with_classes(init.members[i % len(init.members)].config, len(det_ids) + 1, cfg.size)
                 for i in range(cfg.members)]
        mean, std = init.preprocess.mean, init.preprocess.std
        keep_head = (init.task == "det200" and init.num_classes == len(det_ids) + 1
                     and [int(v) for v in init.provenance.get("det_ids", range(1, 201))] == det_ids)
    else:
        archs = [GoogLeNetConfig(variant=cfg.variant, width=cfg.width, num_classes=len(det_ids) + 1,
                                 aux_logits=cfg.aux_logits)] * cfg.members
        mean, std, keep_head = Preprocess().mean, Preprocess().std, False
    pre = Preprocess(size=cfg.size, mean=mean, std=std)
    out = Path(cfg.out)
    settings = proposal_settings(cfg)

    with processes(cfg.run.device) as d:
        cache = ProposalCache(cfg.proposals_cache or out / ".proposals", settings)
        start = time.perf_counter()
        proposals, found = compute_proposals(cfg, images, cache, d)
        windows = build_windows(images, proposals, column_of, cfg.fg_iou)
        counts = np.array([len(p.boxes) for p in proposals])
        summary = {"images": len(images), "objects": int(windows.gt.sum()), "classes": len(det_ids),
                   "cache": str(cache.dir), **found, "seconds": time.perf_counter() - start,
                   "proposals_per_image": float(counts.mean()),
                   "recall": object_recall(windows, cfg.fg_iou), "windows": len(windows.label),
                   "foreground": int((windows.label > 0).sum()), "background": int((windows.label == 0).sum())}
        if d.main:
            on_proposals(summary)

        ckpt_dir = Path(cfg.run.checkpoint_dir or out / ".detector-checkpoint")
        run = {"det_ids": det_ids, "arch": [a.to_dict() for a in archs], "batch_size": cfg.batch_size,
               "fg_per_batch": cfg.fg_per_batch, "world_size": d.world, "seed": cfg.run.seed, "size": cfg.size,
               "members": cfg.members, "proposals": cache.key, "windows": len(windows.label)}

        def train_one(index: int, resume: Checkpoint | None) -> tuple[EMA, list[dict]]:
            member = Member(index, member_variant(cfg, index), archs[index], pre, init, keep_head)
            return fit(member_job(cfg, member, images, windows, d, run), cfg.run, d, ckpt_dir, resume, on_epoch)

        train_members("detector", cfg.members, run, cfg.run, d, ckpt_dir, train_one)
        if not d.main:
            return None
        members, records = [], []
        for index, (net, history) in enumerate(load_members(ckpt_dir, archs)):
            curve = [{k: r[k] for k in ("epoch", "step", "complete", "train_loss", "fg_accuracy", "bg_accuracy",
                                        "lr")} for r in history]
            records.append({**member_variant(cfg, index), "epochs": curve})
            members.append(net)
        vocab = det200()
        provenance = {
            "source": "train-detector", "data": str(cfg.data), "imageset": cfg.imageset,
            "det_ids": det_ids, "classes": [vocab.names[vocab.row_of_id[c]] for c in det_ids],
            "init": cfg.init, "members": records, "world_size": d.world,
            "differences": "members share the topology and the init; they differ in seed (window order, "
                           "background draws, dropout), context, flip probability and background IoU range",
            "proposals": {**settings, "cache_key": cache.key, "per_image": summary["proposals_per_image"],
                          "recall": summary["recall"]},
            "recipe": {**recipe(cfg), "lr": cfg.learning_rate},
            "weights": "Polyak average (EMA) of the training weights"}
        bundle = Bundle(task="det200", members=members, preprocess=pre, provenance=provenance)
        save_bundle(out, bundle)
        if cfg.multibox_from is not None:  # the detector proposes with the boxes it was trained on
            save_multibox(out, load_multibox(cfg.multibox_from), multibox_provenance(cfg.multibox_from))
            bundle.multibox = "multibox.safetensors"
        return bundle
