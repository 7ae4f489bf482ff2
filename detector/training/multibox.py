"""Training MultiBox on ILSVRC-format detection data (``ircnn train multibox``); kept out of the inference path.

- **Data**: ``ROOT/ImageSets/DET/<split>.txt`` names images ``ROOT/Data/DET/<name>.JPEG`` with ground truth
  ``ROOT/Annotations/DET/<name>.xml`` (``eval.annotations``); boxes are normalised by the annotated image size.
- **Priors**: ``kmeans_priors`` of every training box, computed once per run (deterministic; a resumed run takes
  them from its checkpoint).
- **Matching**: ``match="priors"`` (default) assigns each image's ground truth to the priors by location alone,
  Erhan et al.'s training with priors; each output then learns the residual of a fixed prior and when that prior
  has an object. ``match="predictions"`` is the plain objective, matching to the current predictions by location
  and confidence: there a few outputs that became confident early win every match (their confidence term, up to
  several units, outweighs ``alpha / 2 * d^2``, at most 0.6 in normalised coordinates) and drift to average boxes.
  Measured on 36 synthetic training images (K = 32, torchvision variant of width 0.125, 300 steps, no
  augmentation): recall at IoU 0.5 of the K boxes 0.97 matching to priors, 0.47 matching to predictions, 0.57
  for the priors alone.
- **Augmentation**: horizontal flips and, with probability ``crop``, a random crop of ``min_crop``..100% of each
  side that keeps the boxes whose centre it contains (clipped to it), as SSD crops; then the anisotropic resize
  that inference uses. The augmentation of a sample is a function of (seed, epoch, index), the sampling order of
  (seed, epoch), so a resumed run, mid-epoch included, repeats the uninterrupted one.
- **Optimiser**: Adam (AdamW, decoupled weight decay on weights only) rather than the classifier's SGD. The two
  heads see gradients of very different sizes (an L2 term on coordinates in [0, 1] weighted by 0.3, against a
  logistic loss summed over K confidences), and Adam's per-parameter scaling lets the box head move without
  tuning a learning rate per head, where SGD would need one learning rate to suit both. Cosine decay of the
  learning rate over the planned steps, stepped every step.
- **Weights**: Polyak averaging (``detector.training.engine.EMA``), as the classifier; the bundle gets the average.
- **Loop and checkpoints**: ``detector.training.engine`` (safetensors plus JSON, refusing a checkpoint of other
  settings), in ``<bundle>/.multibox-checkpoint`` by default.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from detector.bundle.format import Bundle, load_bundle, read_manifest
from detector.bundle.multibox import GoogLeNetMultiBox, MultiBoxConfig, save_multibox
from detector.image import read_image
from detector.nets.googlenet import VARIANTS, GoogLeNetConfig
from detector.training.checkpoint import open_checkpoint
from detector.training.engine import (
    Dist,
    EpochEnd,
    Job,
    RunConfig,
    check_non_negative,
    check_positive,
    fit,
    param_groups,
    processes,
    recipe,
)
from eval.annotations import read_det_split
from proposals.multibox import ALPHA, kmeans_priors, multibox_loss, resize_image
from proposals.recall import best_overlaps

MATCH_MODES = ("priors", "predictions")
IMAGE_SUFFIX = ".JPEG"


@dataclass(frozen=True)
class MultiBoxTrainConfig:
    data: str  # ILSVRC-format root: Data/DET, Annotations/DET, ImageSets/DET
    out: str  # an existing model bundle; gets multibox.safetensors
    imageset: str = "ImageSets/DET/train.txt"  # training images, relative to data (or absolute)
    val_imageset: str | None = None  # recall at IoU 0.5 of the top K (averaged weights) after every epoch
    k: int = 200  # boxes per image (section 8: 200)
    epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-3  # Adam's usual step; cosine-decayed to 0 over the run
    weight_decay: float = 1e-4  # decoupled (AdamW), conv and linear weights only
    alpha: float = ALPHA  # Erhan et al.: location weight in the loss and the matching
    match: str = "priors"  # locations the matching measures: "priors" or "predictions" (see the docstring)
    variant: str = "paper"  # a new trunk's GoogLeNet variant; --init takes the bundle's
    width: float = 1.0  # a new trunk's channel multiplier
    size: int = 224  # network input side
    grid: int = 1  # 5b features pooled to grid x grid before the heads (1 = global average pool)
    flip: float = 0.5  # probability of a horizontal flip
    crop: float = 0.5  # probability of a random crop
    min_crop: float = 0.5  # a crop keeps at least this share of each side
    init: str | None = None  # classifier bundle whose member 0 starts the trunk
    # seed, device, workers, EMA, checkpoints (default <out>/.multibox-checkpoint); with max_steps the schedule
    # still plans for all epochs
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        check_positive(self, ("k", "epochs", "batch_size", "lr", "size", "grid"))
        check_non_negative(self, ("weight_decay", "alpha"))
        for name in ("flip", "crop"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {getattr(self, name)}")
        if not 0.0 < self.min_crop <= 1.0:
            raise ValueError(f"min_crop must be in (0, 1], got {self.min_crop}")
        if self.match not in MATCH_MODES:
            raise ValueError(f"--match must be one of {', '.join(MATCH_MODES)}, got {self.match!r}")
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown --variant {self.variant!r}; choose one of {', '.join(VARIANTS)}")


# ---- data ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    image: Path  # Data/DET/<name>.JPEG
    boxes: np.ndarray  # float32 [M, 4], x1, y1, x2, y2 normalised by the annotated width and height


def read_normalised_split(root: str | os.PathLike, imageset: str) -> list[Sample]:
    """The images of an imageset with their ground truth normalised by the annotated size, in imageset order."""
    samples = []
    for name, a in read_det_split(str(root), imageset):
        scale = np.array([a.width, a.height, a.width, a.height], dtype=np.float64)
        boxes = np.clip(a.boxes / scale, 0.0, 1.0).astype(np.float32).reshape(-1, 4)
        samples.append(Sample(Path(root) / "Data" / "DET" / (name + IMAGE_SUFFIX), boxes))
    return samples


def augment(image: np.ndarray, boxes: np.ndarray, rng: np.random.Generator, flip: float, crop: float,
            min_crop: float) -> tuple[np.ndarray, np.ndarray]:
    """Random crop (keeping the boxes whose centre it contains, clipped) and horizontal flip.

    ``image (uint8 [H, W, 3])``, ``boxes (float32 [M, 4])`` normalised; returns both for the new image.
    """
    h, w = image.shape[:2]
    if rng.random() < crop:
        cw, ch = rng.uniform(min_crop, 1.0, size=2)
        cx, cy = rng.uniform(0.0, 1.0 - cw), rng.uniform(0.0, 1.0 - ch)
        x0, x1 = int(round(cx * w)), max(int(round(cx * w)) + 1, int(round((cx + cw) * w)))
        y0, y1 = int(round(cy * h)), max(int(round(cy * h)) + 1, int(round((cy + ch) * h)))
        window = np.array([x0 / w, y0 / h, x1 / w, y1 / h])
        centre = (boxes[:, :2] + boxes[:, 2:]) / 2  # [M, 2]
        inside = ((centre >= window[:2]) & (centre < window[2:])).all(1)
        size = np.tile(window[2:] - window[:2], 2)
        boxes = (np.clip(boxes[inside], window[[0, 1, 0, 1]], window[[2, 3, 2, 3]]) - window[[0, 1, 0, 1]]) / size
        image = image[y0:y1, x0:x1]
    if rng.random() < flip:
        image = image[:, ::-1]
        boxes = np.stack([1 - boxes[:, 2], boxes[:, 1], 1 - boxes[:, 0], boxes[:, 3]], 1)
    return image, boxes.astype(np.float32).reshape(-1, 4)


class DetectionImages(Dataset):
    """Training samples resized for the network: ``(uint8 Tensor[3, S, S], Tensor[M, 4] normalised)``.

    With ``augment=True``, sample ``i`` in epoch ``e`` is augmented by ``numpy.random.default_rng([seed, e, i])``.
    """

    def __init__(self, samples: list[Sample], size: int, cfg: MultiBoxTrainConfig | None = None) -> None:
        self.samples, self.size, self.cfg = samples, size, cfg
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        s = self.samples[index]
        image, boxes = read_image(s.image), s.boxes
        if self.cfg is not None:
            rng = np.random.default_rng([self.cfg.run.seed, self.epoch, index])
            image, boxes = augment(image, boxes, rng, self.cfg.flip, self.cfg.crop, self.cfg.min_crop)
        return resize_image(image, self.size), torch.from_numpy(boxes)


def collate(batch: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, list[Tensor]]:
    return torch.stack([x for x, _ in batch]), [g for _, g in batch]


# ---- evaluation ------------------------------------------------------------------------------------------


def recall(model: GoogLeNetMultiBox, samples: list[Sample], iou: float = 0.5, batch_size: int = 32) -> dict[str, float]:
    """Recall at ``iou`` of the model's K boxes and of its K priors alone (the same boxes, not moved).

    Returns ``{"recall": r, "priors_recall": p, "objects": n}`` over all ground-truth boxes of ``samples``.
    """
    found = priors_found = objects = 0
    priors = model.priors.detach().cpu()
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        images = [read_image(s.image) for s in chunk]
        for s, image, (boxes, _) in zip(chunk, images, model.propose(images, batch_size)):
            h, w = image.shape[:2]
            scale = torch.tensor([w, h, w, h], dtype=torch.float32)
            gt = torch.from_numpy(s.boxes) * scale
            found += int((best_overlaps(boxes, gt)[0] >= iou).sum())
            priors_found += int((best_overlaps(priors * scale, gt)[0] >= iou).sum())
            objects += len(gt)
    return {"recall": found / max(objects, 1), "priors_recall": priors_found / max(objects, 1), "objects": objects}


# ---- training --------------------------------------------------------------------------------------------


def _order(seed: int, epoch: int, n: int) -> list[int]:
    return np.random.default_rng([seed, epoch, 1]).permutation(n).tolist()


def multibox_config(cfg: MultiBoxTrainConfig, init: Bundle | None) -> MultiBoxConfig:
    """The network to train: a new trunk's variant and width, or ``init``'s with its input normalisation."""
    if init is None:
        return MultiBoxConfig(k=cfg.k, variant=cfg.variant, width=cfg.width, size=cfg.size, grid=cfg.grid)
    arch, pre = init.arch, init.preprocess
    if not isinstance(arch, GoogLeNetConfig):  # MultiBox's trunk is GoogLeNet's (Erhan et al., and section 8)
        raise ValueError(f"--init {cfg.init}: MultiBox starts from a GoogLeNet bundle; this one's first member "
                         "is EfficientNet-Lite. Train MultiBox from a GoogLeNet bundle (or none) and detect with "
                         "the EfficientNet-Lite bundle's own members")
    return MultiBoxConfig(k=cfg.k, variant=arch.variant, width=arch.width, size=cfg.size, grid=cfg.grid,
                          mean=pre.mean, std=pre.std)


def new_multibox(config: MultiBoxConfig, priors: np.ndarray | Tensor, init: Bundle | None, seed: int) -> GoogLeNetMultiBox:
    """A fresh MultiBox (seeded) on ``priors (Tensor[K, 4])``, its trunk from ``init``'s member 0 if given."""
    torch.manual_seed(seed)
    model = GoogLeNetMultiBox(config, priors)
    if init is not None:
        model.load_trunk(init.members[0])
    return model


def train_multibox(cfg: MultiBoxTrainConfig, on_epoch: Callable[[dict], None] = lambda record: None) -> GoogLeNetMultiBox:
    """Train MultiBox on ``cfg.data`` and store the averaged weights in the bundle ``cfg.out``.

    ``on_epoch`` gets one record per epoch: epoch, epochs, step, complete, train_loss, location, confidence,
    matched, lr, images_per_s, seconds, val_recall, val_priors_recall. Returns the saved (averaged) model.
    """
    out = Path(cfg.out)
    read_manifest(out)  # refuse before any work when --out is no bundle (the message says how to make one)
    train_samples = read_normalised_split(cfg.data, cfg.imageset)
    val_samples = read_normalised_split(cfg.data, cfg.val_imageset) if cfg.val_imageset else None
    init = load_bundle(cfg.init) if cfg.init else None
    with processes(cfg.run.device) as d:  # one process, or each of torchrun's (--batch-size is per process)
        return _train(cfg, out, train_samples, val_samples, init, d, on_epoch)


def _train(cfg: MultiBoxTrainConfig, out: Path, train_samples: list, val_samples: list | None, init: Bundle | None,
           d: Dist, on_epoch: Callable[[dict], None]) -> GoogLeNetMultiBox:
    steps_per_epoch = len(train_samples) // (cfg.batch_size * d.world)
    if steps_per_epoch == 0:
        per = f" per process ({d.world} processes)" if d.world > 1 else ""
        raise ValueError(f"the imageset has {len(train_samples)} images, fewer than one batch of {cfg.batch_size}"
                         f"{per}; lower --batch-size")
    ckpt_dir = Path(cfg.run.checkpoint_dir or out / ".multibox-checkpoint")
    config = multibox_config(cfg, init)
    run = {"arch": config.to_dict(), "batch_size": cfg.batch_size, "seed": cfg.run.seed,
           "size": cfg.size, "world_size": d.world}
    resume = open_checkpoint(ckpt_dir, "multibox", run, cfg.run.resume, d.main)
    if resume is None:  # k-means of the training boxes, or the priors of the run that continues
        priors = kmeans_priors(np.concatenate([s.boxes for s in train_samples]), cfg.k, seed=cfg.run.seed)
    else:
        priors = resume.tensors["model.priors"]
    model = new_multibox(config, priors, init, cfg.run.seed).to(d.device)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
    total = cfg.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    data = DetectionImages(train_samples, cfg.size, cfg)

    def batches(epoch: int, first: int, end: int) -> DataLoader:
        data.epoch = epoch
        # each step takes batch_size x world images in the epoch's order; this process the rank-th share of them
        span = _order(cfg.run.seed, epoch, len(data))[first * cfg.batch_size * d.world: end * cfg.batch_size * d.world]
        indices = [i for k, i in enumerate(span) if (k // cfg.batch_size) % d.world == d.rank]
        return DataLoader(data, batch_size=cfg.batch_size, sampler=indices, num_workers=cfg.run.workers,
                          collate_fn=collate, pin_memory=d.device.type == "cuda")

    def step(net: nn.Module, batch: tuple[Tensor, list[Tensor]]) -> tuple[Tensor, Tensor, int]:
        x, gt = batch
        inner = getattr(net, "module", net)  # under torchrun, net is the DistributedDataParallel wrapper
        boxes, logits = net(inner.normalize(x))
        loss, stats = multibox_loss(boxes, logits, [g.to(d.device) for g in gt], cfg.alpha,
                                    priors=inner.priors if cfg.match == "priors" else None)
        values = [stats["loss"], stats["location"], stats["confidence"], stats["matched"]]
        return loss, torch.tensor(values, dtype=torch.float64, device=d.device), len(x)

    def record(e: EpochEnd) -> dict:
        return {"epoch": e.epoch, "epochs": cfg.epochs, "step": e.step, "complete": e.complete,
                "train_loss": e.mean(0), "location": e.mean(1), "confidence": e.mean(2), "matched": e.mean(3),
                "lr": e.lr, "images_per_s": e.rate, "seconds": e.seconds, "val_recall": None,
                "val_priors_recall": priors_val}

    val = val_samples if d.main else None  # the first process evaluates and reports
    priors_val = recall(model, val)["priors_recall"] if val else None
    evaluate = (lambda averaged: {"val_recall": recall(averaged, val)["recall"]}) if val else None
    job = Job(kind="multibox", name="multibox", member=0, seed=cfg.run.seed, run=run, model=model, optimizer=opt,
              scheduler=sched, steps_per_epoch=steps_per_epoch, total_steps=total, batches=batches, step=step,
              stats=4, record=record, evaluate=evaluate)
    ema, history = fit(job, cfg.run, d, ckpt_dir, resume, on_epoch if d.main else lambda record: None)
    averaged = ema.model.cpu().eval()
    if not d.main:  # the first process writes the bundle
        return averaged
    provenance = {"source": "train-multibox", "data": str(cfg.data), "imageset": cfg.imageset,
                  "train_images": len(train_samples), "train_boxes": int(sum(len(s.boxes) for s in train_samples)),
                  "priors": f"k-means of the training boxes, seed {cfg.run.seed}", "init": cfg.init,
                  "recipe": recipe(cfg), "history": history, "world_size": d.world,
                  "weights": "Polyak average (EMA) of the training weights"}
    save_multibox(out, averaged, provenance)
    return averaged
