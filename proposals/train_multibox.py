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
- **Weights**: Polyak averaging (``detector.train.EMA``), as the classifier; the bundle gets the average.
- **Checkpoints**: ``detector.train.save_checkpoint`` (atomic) and ``load_checkpoint`` (``weights_only=True``,
  refuses a checkpoint of other settings), in ``<bundle>/.multibox-checkpoint`` by default.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from detector.bundle import load_bundle, read_manifest
from detector.cpus import default_workers
from detector.googlenet import VARIANTS, GoogLeNetConfig
from detector.image import read_image
from detector.multibox_bundle import GoogLeNetMultiBox as MultiBox, MultiBoxConfig, save_multibox
from detector.train import CHECKPOINT_FORMAT, EMA, load_checkpoint, restore_training, save_checkpoint
from eval.annotations import read_det_split
from proposals.multibox import ALPHA, kmeans_priors, multibox_loss, resize_image
from proposals.recall import best_overlaps

CHECKPOINT_NAME = "checkpoint.pt"
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
    ema_decay: float = 0.999  # Polyak averaging (detector.train.EMA); 0 keeps the live weights
    seed: int = 0
    init: str | None = None  # classifier bundle whose member 0 starts the trunk
    resume: bool = False  # continue from the checkpoint (or start afresh when there is none)
    checkpoint_dir: str | None = None  # default <out>/.multibox-checkpoint
    checkpoint_every: int = 2000  # steps between mid-epoch checkpoints (0: at epoch ends only)
    max_steps: int = 0  # stop after this many steps (0: no limit); the schedule still plans for all epochs
    workers: int = default_workers(4)  # DataLoader processes (cores, at most 4)
    device: str | None = None  # "cpu" or "cuda"; None picks cuda when available

    def __post_init__(self) -> None:
        for name in ("k", "epochs", "batch_size", "lr", "size", "grid"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name in ("weight_decay", "alpha", "seed", "checkpoint_every", "max_steps", "workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        for name in ("flip", "crop"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {getattr(self, name)}")
        if not 0.0 < self.min_crop <= 1.0:
            raise ValueError(f"min_crop must be in (0, 1], got {self.min_crop}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"--ema-decay must be in [0, 1), got {self.ema_decay}")
        if self.match not in MATCH_MODES:
            raise ValueError(f"--match must be one of {', '.join(MATCH_MODES)}, got {self.match!r}")
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown --variant {self.variant!r}; choose one of {', '.join(VARIANTS)}")
        if self.device not in (None, "cpu", "cuda"):
            raise ValueError(f"--device must be cpu or cuda, got {self.device!r}")


# ---- data ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    image: Path  # Data/DET/<name>.JPEG
    boxes: np.ndarray  # float32 [M, 4], x1, y1, x2, y2 normalised by the annotated width and height


def read_split(root: str | os.PathLike, imageset: str) -> list[Sample]:
    """The images of an imageset with their normalised ground truth, in imageset order."""
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
            rng = np.random.default_rng([self.cfg.seed, self.epoch, index])
            image, boxes = augment(image, boxes, rng, self.cfg.flip, self.cfg.crop, self.cfg.min_crop)
        return resize_image(image, self.size), torch.from_numpy(boxes)


def collate(batch: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, list[Tensor]]:
    return torch.stack([x for x, _ in batch]), [g for _, g in batch]


# ---- evaluation ------------------------------------------------------------------------------------------


def recall(model: MultiBox, samples: list[Sample], iou: float = 0.5, batch_size: int = 32) -> dict[str, float]:
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


def train_multibox(cfg: MultiBoxTrainConfig, on_epoch: Callable[[dict], None] = lambda record: None) -> MultiBox:
    """Train MultiBox on ``cfg.data`` and store the averaged weights in the bundle ``cfg.out``.

    ``on_epoch`` gets one record per epoch: epoch, epochs, step, complete, train_loss, location, confidence,
    matched, lr, images_per_s, seconds, val_recall, val_priors_recall. Returns the saved (averaged) model.
    """
    out = Path(cfg.out)
    read_manifest(out)  # refuse before any work when --out is no bundle (the message says how to make one)
    train_samples = read_split(cfg.data, cfg.imageset)
    val_samples = read_split(cfg.data, cfg.val_imageset) if cfg.val_imageset else None
    init = load_bundle(cfg.init) if cfg.init else None
    if init is not None:
        arch, pre = init.arch, init.preprocess
        if not isinstance(arch, GoogLeNetConfig):  # MultiBox's trunk is GoogLeNet's (Erhan et al., and section 8)
            raise ValueError(f"--init {cfg.init}: MultiBox starts from a GoogLeNet bundle; this one's first member "
                             "is EfficientNet-Lite. Train MultiBox from a GoogLeNet bundle (or none) and detect with "
                             "the EfficientNet-Lite bundle's own members")
        config = MultiBoxConfig(k=cfg.k, variant=arch.variant, width=arch.width, size=cfg.size, grid=cfg.grid,
                                mean=pre.mean, std=pre.std)
    else:
        config = MultiBoxConfig(k=cfg.k, variant=cfg.variant, width=cfg.width, size=cfg.size, grid=cfg.grid)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA device is available; use --device cpu")
    steps_per_epoch = len(train_samples) // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"the imageset has {len(train_samples)} images, fewer than one batch of {cfg.batch_size}; "
                         "lower --batch-size")
    ckpt_dir = Path(cfg.checkpoint_dir or out / ".multibox-checkpoint")
    ckpt_path = ckpt_dir / CHECKPOINT_NAME
    # detector.train.load_checkpoint compares these keys; MultiBox is one class-agnostic "object" class.
    run = {"classes": ["object"], "arch": config.to_dict(), "batch_size": cfg.batch_size, "world_size": 1,
           "seed": cfg.seed, "size": cfg.size, "members": 1, "epochs": cfg.epochs, "data": str(cfg.data),
           "imageset": cfg.imageset}
    doc = None
    if ckpt_path.exists():
        if not cfg.resume:
            raise ValueError(f"{ckpt_path} exists from an earlier run; pass --resume to continue it, or delete it "
                             "(or pick another --checkpoint-dir) to start afresh")
        doc = load_checkpoint(ckpt_path, run)
        if doc.get("kind") != "multibox":
            raise ValueError(f"{ckpt_path} is not a MultiBox checkpoint; pick another --checkpoint-dir")
    elif cfg.resume:
        print(f"ircnn: no checkpoint at {ckpt_path}; starting afresh", file=sys.stderr, flush=True)

    if doc is None:
        boxes = np.concatenate([s.boxes for s in train_samples])
        priors = kmeans_priors(boxes, cfg.k, seed=cfg.seed)
    else:
        priors = doc["model"]["priors"]
    torch.manual_seed(cfg.seed)
    model = MultiBox(config, priors)
    if init is not None:
        model.load_trunk(init.members[0])
    model.to(device)
    ema = EMA(model, cfg.ema_decay)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    total = cfg.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    epoch = step_in_epoch = step = 0
    sums = np.zeros(4)  # this epoch so far: loss, location, confidence, matched (sums over steps)
    history: list[dict] = []
    if doc is not None:
        epoch, step_in_epoch, step = restore_training(doc, model, ema, opt, sched)
        sums = doc["sums"].numpy().copy()
        history = list(doc["history"])

    def checkpoint() -> None:
        save_checkpoint(ckpt_path, {
            "format": CHECKPOINT_FORMAT, "kind": "multibox", "run": run, "epoch": epoch,
            "step_in_epoch": step_in_epoch, "step": step, "model": model.state_dict(), "ema": ema.model.state_dict(),
            "ema_updates": ema.updates, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "sums": torch.from_numpy(sums), "history": history})

    def stopped() -> bool:
        return bool(cfg.max_steps) and step >= cfg.max_steps

    data = DetectionImages(train_samples, cfg.size, cfg)
    priors_val = recall(ema.model, val_samples)["priors_recall"] if val_samples else None
    while epoch < cfg.epochs and not stopped():
        data.epoch = epoch
        indices = _order(cfg.seed, epoch, len(data))[step_in_epoch * cfg.batch_size: steps_per_epoch * cfg.batch_size]
        loader = DataLoader(data, batch_size=cfg.batch_size, sampler=indices, num_workers=cfg.workers,
                            collate_fn=collate, pin_memory=device.type == "cuda")
        lr = opt.param_groups[0]["lr"]
        model.train()
        start, seen = time.perf_counter(), 0
        bar = tqdm(total=steps_per_epoch, initial=step_in_epoch, desc=f"multibox epoch {epoch + 1}", unit="step",
                   disable=None, leave=False)
        for x, gt in loader:
            boxes, logits = model(model.normalize(x))
            loss, stats = multibox_loss(boxes, logits, [g.to(device) for g in gt], cfg.alpha,
                                        priors=model.priors if cfg.match == "priors" else None)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            ema.update(model)
            sums += [stats["loss"], stats["location"], stats["confidence"], stats["matched"]]
            step, step_in_epoch, seen = step + 1, step_in_epoch + 1, seen + len(x)
            bar.update()
            if step % 10 == 0 or step_in_epoch == steps_per_epoch:
                rate = seen / (time.perf_counter() - start)
                bar.set_postfix(loss=f"{sums[0] / step_in_epoch:.4f}", img_s=f"{rate:.0f}", refresh=False)
            if stopped():
                break
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step_in_epoch < steps_per_epoch:
                checkpoint()
        bar.close()
        seconds = time.perf_counter() - start
        means = sums / max(step_in_epoch, 1)
        if not np.isfinite(means[0]):
            raise ValueError(f"training diverged (loss {means[0]}) in epoch {epoch + 1}; lower --lr (now {cfg.lr})")
        record = {"epoch": epoch + 1, "epochs": cfg.epochs, "step": step, "complete": step_in_epoch == steps_per_epoch,
                  "train_loss": means[0], "location": means[1], "confidence": means[2], "matched": means[3],
                  "lr": lr, "images_per_s": seen / seconds, "seconds": seconds, "val_recall": None,
                  "val_priors_recall": priors_val}
        if record["complete"]:
            epoch, step_in_epoch = epoch + 1, 0
            sums = np.zeros(4)
        if val_samples:
            record["val_recall"] = recall(ema.model, val_samples)["recall"]
        record = {k: float(v) if isinstance(v, np.floating) else v for k, v in record.items()}
        history.append(record)
        checkpoint()
        on_epoch(record)

    averaged = ema.model.cpu().eval()
    provenance = {"source": "train-multibox", "data": str(cfg.data), "imageset": cfg.imageset,
                  "train_images": len(train_samples), "train_boxes": int(sum(len(s.boxes) for s in train_samples)),
                  "priors": f"k-means of the training boxes, seed {cfg.seed}", "init": cfg.init,
                  "recipe": dataclasses.asdict(cfg), "history": history,
                  "weights": "Polyak average (EMA) of the training weights"}
    save_multibox(out, averaged, provenance)
    return averaged

