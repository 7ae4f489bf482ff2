"""Detection fine-tuning (``ircnn train detector``): R-CNN's recipe with GoogLeNet region classifiers (section 8).

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
  more of them). Each window is warped with ``detector.warp.warp_regions`` (R-CNN's anisotropic warp with
  ``context`` pixels of context at the network's input scale) and flipped horizontally with probability ``flip``.
- **Optimiser**: SGD, momentum 0.9, weight decay 5e-4 on weights (R-CNN), learning rate 0.001 from a classifier
  (R-CNN: "1/10th of the initial pre-training rate"), 0.01 from random weights; the paper's schedule (-4% every 8
  epochs); Polyak averaging (``detector.train.EMA``): the bundle gets the averaged weights.
- **Head**: K + 1 outputs, column 0 background, column j the DET class ``provenance["det_ids"][j - 1]``, the
  classes being the DET classes present in the training annotations. From a classifier bundle every tensor but
  the classifiers (``fc``, ``aux*.fc2``) is copied; the head starts fresh.

Proposals (coarsened selective search, plus MultiBox with ``multibox_from``) are computed once per image and kept
in ``ProposalCache``: one ``.npz`` per image (float32 boxes, no pickle), in a folder named by a hash of the
proposal settings, so other settings never read stale boxes.

Randomness is a pure function of (member seed, epoch, batch index, rank): which windows a batch takes, its flips,
and (by ``torch.manual_seed`` per step) its dropout masks. So a checkpoint needs no RNG state, and a resumed run,
mid-epoch included, repeats the uninterrupted one. Checkpoints are safetensors (weights, averaged weights,
momentum buffers) plus a JSON state file; Ctrl-C writes one before stopping.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from torchvision.ops import box_iou
from tqdm import tqdm

from detector.bundle import MAX_MEMBERS, Bundle, Preprocess, file_sha256, load_bundle, save_bundle
from detector.cpus import default_workers
from detector.googlenet import VARIANTS, GoogLeNetConfig, googlenet_loss
from detector.members import ArchConfig, build_member, is_head, with_classes
from detector.image import read_image
from detector.rcnn import fill_colour
from detector.train import EMA, Dist, _seed, _sum_over_processes, load_members, save_member, setup_dist
from eval.classes import det200
from eval.annotations import read_det_split

STATE_FORMAT = 1
STATE_NAME = "state.json"
IMAGE_SUFFIX = ".JPEG"  # ILSVRC DET images: Data/DET/<name>.JPEG
# Checkpoints from a run with other values of these cannot continue this run.
RUN_KEYS = ("det_ids", "arch", "batch_size", "fg_per_batch", "world_size", "seed", "size", "members", "proposals",
            "windows")

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
    max_minutes: float = 0.0  # stop each member after this many minutes of training (0: no limit)
    batch_size: int = 128  # windows per step and process (R-CNN: 128)
    fg_per_batch: int = 32  # foreground windows among them (R-CNN: 32)
    fg_iou: float = 0.5  # a proposal with IoU >= this with a ground-truth box takes its class; below, background
    lr: float | None = None  # None: 0.001 with --from (R-CNN), 0.01 from random weights
    momentum: float = 0.9
    weight_decay: float = 5e-4  # R-CNN's; weights only, not biases
    lr_step_epochs: int = 8  # section 6: "decreasing the learning rate by 4% every 8 epochs"
    lr_gamma: float = 0.96
    ema_decay: float = 0.999  # Polyak averaging (detector.train.EMA, with its warm-up)
    vary_members: bool = True  # members take MEMBER_VARIANTS[i % 6]; False: all take member 0's
    seed: int = 0  # member i uses seed + i
    selective_search: bool = True
    coarsen: float = 2.0  # section 8: superpixels 2x larger than R-CNN's
    selective_search_width: int = 500  # R-CNN segments images resized to this width
    multibox_from: str | None = None  # bundle whose MultiBox adds its boxes to the proposals (and is copied)
    max_proposals: int = 3000  # per image, after merging (DetectConfig.max_regions' default)
    proposals_cache: str | None = None  # default <out>/.proposals
    resume: bool = False
    checkpoint_dir: str | None = None  # default <out>/.detector-checkpoint
    checkpoint_every: int = 200  # steps between mid-epoch checkpoints (0: epoch ends only)
    workers: int = default_workers(2)  # processes that read, warp and flip windows
    image_cache_mb: int = 512  # decoded images kept per loading process
    device: str | None = None  # "cpu" or "cuda"; None picks cuda when available

    def __post_init__(self) -> None:
        for name in ("members", "size", "epochs", "batch_size", "fg_per_batch", "lr_step_epochs", "lr_gamma",
                     "max_proposals"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name in ("iterations", "max_minutes", "momentum", "weight_decay", "seed", "checkpoint_every", "workers",
                     "image_cache_mb"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        if self.fg_per_batch >= self.batch_size:
            raise ValueError(f"--fg-per-batch ({self.fg_per_batch}) must be below --batch ({self.batch_size}): "
                             "a batch needs background windows too")
        if not 0.0 < self.fg_iou <= 1.0:
            raise ValueError(f"fg_iou must be in (0, 1], got {self.fg_iou}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"--ema-decay must be in [0, 1), got {self.ema_decay}")
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown --variant {self.variant!r}; choose one of {', '.join(VARIANTS)}")
        if self.members > MAX_MEMBERS:
            raise ValueError(f"--members must be at most {MAX_MEMBERS}, got {self.members}")
        if not 32 <= self.size <= 1024:
            raise ValueError(f"--size must be in 32..1024, got {self.size}")
        if not self.selective_search and self.multibox_from is None:
            raise ValueError("no proposal source: keep selective search on or give --multibox-from")
        if self.device not in (None, "cpu", "cuda"):
            raise ValueError(f"--device must be cpu or cuda, got {self.device!r}")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (0.001 if self.init else 0.01)


def member_variant(cfg: DetectorTrainConfig, member: int) -> dict:
    """Member ``member``'s sampling: seed, context (pixels at ``cfg.size``), flip probability, background IoU floor."""
    v = MEMBER_VARIANTS[member % len(MEMBER_VARIANTS) if cfg.vary_members else 0]
    return {"member": member, "seed": cfg.seed + member, "context": round(v["context"] * cfg.size / 224),
            "context_at_224": v["context"], "flip": v["flip"], "bg_iou": [v["bg_low"], cfg.fg_iou]}


# ---- data ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DetImage:
    path: Path  # Data/DET/<name>.JPEG
    width: int  # as annotated
    height: int
    boxes: np.ndarray  # float32 [M, 4] x1, y1, x2, y2 in annotated pixels
    det_ids: np.ndarray  # int64 [M]


def read_detection_split(root: str | os.PathLike, imageset: str) -> list[DetImage]:
    """The images of an ILSVRC-format imageset with their ground truth, in imageset order."""
    root = Path(root)
    return [DetImage(root / "Data" / "DET" / (name + IMAGE_SUFFIX), a.width, a.height,
                     a.boxes.astype(np.float32).reshape(-1, 4), a.det_ids.astype(np.int64))
            for name, a in read_det_split(str(root), imageset)]


# ---- proposal cache --------------------------------------------------------------------------------------


@dataclass
class CachedProposals:
    boxes: np.ndarray  # float32 [N, 4] x1, y1, x2, y2 in image pixels
    source: np.ndarray  # int8 [N]: 0 selective search, 1 MultiBox (proposals.combine)
    size: tuple[int, int]  # (height, width) of the decoded image


class ProposalCache:
    """Proposals of each image on disk: ``<root>/<settings hash>/<ab>/<path hash>.npz``.

    ``settings`` (JSON-able) describe how proposals are made; any change gives another folder. An image is keyed
    by its resolved path, size and modification time. Files are read with ``np.load(allow_pickle=False)`` and
    checked (shapes, dtypes, finite boxes inside the image, the path they were made for); a file that fails is
    reported as unusable, and ``get_or_compute`` makes it again.
    """

    def __init__(self, root: str | os.PathLike, settings: dict) -> None:
        text = json.dumps(settings, sort_keys=True)
        self.key = hashlib.sha256(text.encode()).hexdigest()[:16]
        self.dir = Path(root) / self.key
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "settings.json").write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
        self.hits = self.misses = self.repaired = 0

    @staticmethod
    def _identity(image: Path) -> str:
        st = image.stat()
        return f"{image.resolve()}|{st.st_size}|{st.st_mtime_ns}"

    def file_of(self, image: str | os.PathLike) -> Path:
        digest = hashlib.sha256(self._identity(Path(image)).encode()).hexdigest()
        return self.dir / digest[:2] / f"{digest}.npz"

    def load(self, image: str | os.PathLike) -> CachedProposals | None:
        """The cached proposals of ``image``; None when there are none. Raises ValueError for an unusable file."""
        file = self.file_of(image)
        if not file.is_file():
            return None
        try:
            with np.load(file, allow_pickle=False) as z:
                boxes, source, size, ident = z["boxes"], z["source"], z["size"], str(z["image"])
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:
            raise ValueError(f"{file}: unreadable proposal cache file ({type(e).__name__}: {e})") from None
        ok = (boxes.dtype == np.float32 and boxes.ndim == 2 and boxes.shape[1] == 4 and source.dtype == np.int8
              and source.shape == (len(boxes),) and size.shape == (2,) and (size > 0).all()
              and ident == self._identity(Path(image)) and np.isfinite(boxes).all()
              and (boxes >= 0).all() and (boxes[:, [0, 2]] <= size[1]).all() and (boxes[:, [1, 3]] <= size[0]).all())
        if not ok:
            raise ValueError(f"{file}: proposal cache file has the wrong content for {image}")
        return CachedProposals(boxes, source, (int(size[0]), int(size[1])))

    def store(self, image: str | os.PathLike, value: CachedProposals) -> None:
        file = self.file_of(image)
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(file.stem + f".{os.getpid()}.tmp.npz")
        np.savez(tmp, boxes=value.boxes.astype(np.float32).reshape(-1, 4), source=value.source.astype(np.int8),
                 size=np.array(value.size, dtype=np.int64), image=np.array(self._identity(Path(image))))
        os.replace(tmp, file)

    def get_or_compute(self, image: str | os.PathLike,
                       compute: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]) -> CachedProposals:
        """Cached proposals, or ``compute(decoded image) -> (boxes float32 [N, 4], source int8 [N])`` stored."""
        try:
            value = self.load(image)
        except ValueError as e:
            print(f"ircnn: {e}; computing the proposals again", file=sys.stderr, flush=True)
            self.repaired += 1
            value = None
        if value is not None:
            self.hits += 1
            return value
        self.misses += 1
        pixels = read_image(image)
        boxes, source = compute(pixels)
        value = CachedProposals(np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(source, np.int8),
                                pixels.shape[:2])
        self.store(image, value)
        return value


def proposal_settings(cfg: DetectorTrainConfig) -> dict:
    """What the cached boxes depend on (the cache folder's hash); MultiBox by its weights' SHA-256."""
    from proposals.combine import MergeConfig
    from proposals.selective_search import SelectiveSearchConfig

    ss = (dataclasses.asdict(SelectiveSearchConfig(coarsen=cfg.coarsen, resize_width=cfg.selective_search_width))
          if cfg.selective_search else None)
    multibox = None
    if cfg.multibox_from is not None:
        from detector.bundle import read_manifest

        name = read_manifest(cfg.multibox_from).get("multibox")
        if name is None:
            raise ValueError(f"--multibox-from {cfg.multibox_from} has no MultiBox network; train one with "
                             f"`ircnn train multibox --out {cfg.multibox_from}`")
        multibox = {"sha256": file_sha256(Path(cfg.multibox_from) / name)}
    return {"format": 1, "selective_search": ss, "multibox": multibox,
            "merge": dataclasses.asdict(MergeConfig(max_proposals=cfg.max_proposals))}


def compute_proposals(cfg: DetectorTrainConfig, images: list[DetImage], cache: ProposalCache, d: Dist,
                      show: bool = True) -> tuple[list[CachedProposals], dict]:
    """Every image's proposals, from the cache where present, and what this process found in the cache
    (``cached``, ``computed``, ``repaired``). Under torchrun, rank r computes images r::world, then all ranks
    read the cache."""
    from proposals.combine import MergeConfig, ProposalGenerator
    from proposals.selective_search import SelectiveSearchConfig, SelectiveSearchRunner

    todo = [im for i, im in enumerate(images) if i % d.world == d.rank]
    runner = multibox = None
    try:
        if cfg.selective_search:
            runner = SelectiveSearchRunner(SelectiveSearchConfig(coarsen=cfg.coarsen,
                                                                 resize_width=cfg.selective_search_width))
        if cfg.multibox_from is not None:
            from detector.multibox_bundle import load_multibox

            multibox = load_multibox(cfg.multibox_from)
        generate = ProposalGenerator(runner, multibox, MergeConfig(max_proposals=cfg.max_proposals))

        def compute(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            props, _ = generate(pixels)
            return props.boxes.numpy(), props.source.numpy()

        for im in tqdm(todo, desc="proposals", unit="img", disable=None if (show and d.main) else True,
                       leave=False):
            cache.get_or_compute(im.path, compute)
    finally:
        if runner is not None:
            runner.close()
    stats = {"cached": cache.hits, "computed": cache.misses, "repaired": cache.repaired}
    if d.world > 1:
        dist.barrier()
    return [cache.get_or_compute(im.path, _refuse_compute) for im in images], stats


def _refuse_compute(pixels: np.ndarray):
    raise ValueError("proposal cache lost a file that was just written; check the --proposals-cache folder")


# ---- windows and sampling --------------------------------------------------------------------------------


@dataclass
class Windows:
    """Every candidate window of the training set, flat (one row each)."""

    image: np.ndarray  # int32 [W]: index into the image list
    boxes: np.ndarray  # float32 [W, 4] in decoded-image pixels
    label: np.ndarray  # int64 [W]: 0 background, j = column of the class (1..K)
    iou: np.ndarray  # float32 [W]: highest IoU with a ground-truth box (1 for the ground truth itself)
    gt: np.ndarray  # bool [W]: a ground-truth box added as a positive


def label_windows(proposals: np.ndarray, gt_boxes: np.ndarray, gt_columns: np.ndarray,
                  fg_iou: float = 0.5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """R-CNN's labels for one image. ``proposals (float32 [N, 4])``, ``gt_boxes (float32 [M, 4])``,
    ``gt_columns (int64 [M])`` the head column of each object (1..K).

    Returns ``(boxes [N + M, 4], label int64 [N + M], iou float32 [N + M])`` with the ground truth appended:
    a window takes the column of the object it overlaps most when that IoU is >= ``fg_iou``, else 0.
    """
    proposals = np.asarray(proposals, np.float32).reshape(-1, 4)
    gt_boxes = np.asarray(gt_boxes, np.float32).reshape(-1, 4)
    boxes = np.concatenate([proposals, gt_boxes])
    if len(gt_boxes) == 0:
        return boxes, np.zeros(len(boxes), np.int64), np.zeros(len(boxes), np.float32)
    iou = box_iou(torch.from_numpy(boxes), torch.from_numpy(gt_boxes)).numpy()  # [N + M, M]
    best, which = iou.max(1), iou.argmax(1)
    best[len(proposals):] = 1.0  # a ground-truth box is its own object (even where two objects coincide)
    which[len(proposals):] = np.arange(len(gt_boxes))
    label = np.where(best >= fg_iou, np.asarray(gt_columns, np.int64)[which], 0)
    return boxes, label, best.astype(np.float32)


def build_windows(images: list[DetImage], proposals: list[CachedProposals], column_of: dict[int, int],
                  fg_iou: float) -> Windows:
    """All windows of all images; ground truth scaled to the decoded size where the annotation's differs."""
    parts = []
    for i, (im, props) in enumerate(zip(images, proposals)):
        h, w = props.size
        scale = np.array([w / im.width, h / im.height] * 2, np.float32)
        gt = im.boxes * scale
        boxes, label, iou = label_windows(props.boxes, gt, np.array([column_of[int(c)] for c in im.det_ids],
                                                                    np.int64), fg_iou)
        is_gt = np.zeros(len(boxes), bool)
        is_gt[len(props.boxes):] = True
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        parts.append((np.full(int(keep.sum()), i, np.int32), boxes[keep], label[keep], iou[keep], is_gt[keep]))
    cat = [np.concatenate([p[k] for p in parts]) for k in range(5)]
    return Windows(cat[0], cat[1].reshape(-1, 4), cat[2], cat[3], cat[4])


class WindowSampler:
    """R-CNN's mini-batches: ``fg`` foreground windows in a per-epoch random order (one pass over them per epoch)
    and ``batch - fg`` background windows drawn uniformly with replacement from those with IoU in
    ``[bg_low, bg_high)``; batch ``b`` of epoch ``e`` on rank ``r`` depends only on (seed, e, b, r)."""

    def __init__(self, windows: Windows, batch_size: int, fg_per_batch: int, bg_iou: tuple[float, float],
                 seed: int, world: int = 1) -> None:
        self.fg = np.flatnonzero(windows.label > 0)
        bg = windows.label == 0
        self.bg = np.flatnonzero(bg & (windows.iou >= bg_iou[0]) & (windows.iou < bg_iou[1]))
        if len(self.fg) == 0:
            raise ValueError("no foreground windows: the training images have no ground-truth objects")
        if len(self.bg) == 0:
            raise ValueError(f"no background windows with IoU in [{bg_iou[0]}, {bg_iou[1]}): the proposals all "
                             "overlap objects; check the proposal settings")
        self.batch_size, self.fg_per_batch, self.seed, self.world = batch_size, fg_per_batch, seed, world
        self.steps_per_epoch = max(1, math.ceil(len(self.fg) / (fg_per_batch * world)))

    def batch(self, epoch: int, step: int, rank: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Window indices ``int64 [batch]`` (foreground first) and horizontal-flip draws ``float64 [batch]``."""
        order = np.random.default_rng([self.seed, epoch, 0]).permutation(len(self.fg))
        g = step * self.world + rank  # the global batch number
        take = np.arange(g * self.fg_per_batch, (g + 1) * self.fg_per_batch) % len(order)
        rng = np.random.default_rng([self.seed, epoch, g + 1])
        bg = self.bg[rng.integers(0, len(self.bg), self.batch_size - self.fg_per_batch)]
        return np.concatenate([self.fg[order[take]], bg]), rng.random(self.batch_size)


class WindowBatches(Dataset):
    """Item ``b``: batch ``b`` of the current epoch as ``(uint8 Tensor[B, 3, S, S], labels int64 Tensor[B])``:
    windows warped by ``detector.warp.warp_regions`` with ``context`` and flipped where the draw is < ``flip``."""

    def __init__(self, images: list[DetImage], windows: Windows, sampler: WindowSampler, size: int, context: int,
                 flip: float, fill: tuple[int, int, int], rank: int = 0, image_cache_mb: int = 512) -> None:
        self.images, self.windows, self.sampler = images, windows, sampler
        self.size, self.context, self.flip, self.fill, self.rank = size, context, flip, fill, rank
        self.epoch = 0
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cache_bytes, self._cache_limit = 0, image_cache_mb << 20

    def __len__(self) -> int:
        return self.sampler.steps_per_epoch

    def _image(self, i: int) -> np.ndarray:
        pixels = self._cache.pop(i, None)
        if pixels is None:
            pixels = read_image(self.images[i].path)
            self._cache_bytes += pixels.nbytes
        self._cache[i] = pixels
        while self._cache_bytes > self._cache_limit and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cache_bytes -= old.nbytes
        return pixels

    def __getitem__(self, step: int) -> tuple[Tensor, Tensor]:
        from detector.warp import warp_regions

        index, draws = self.sampler.batch(self.epoch, step, self.rank)
        out = torch.empty(len(index), 3, self.size, self.size, dtype=torch.uint8)
        img_of = self.windows.image[index]
        for i in np.unique(img_of):
            rows = np.flatnonzero(img_of == i)
            boxes = torch.from_numpy(self.windows.boxes[index[rows]])
            out[torch.from_numpy(rows)] = warp_regions(self._image(int(i)), boxes, self.size, self.context,
                                                       self.fill)
        flip = torch.from_numpy(draws < self.flip)
        out[flip] = out[flip].flip(-1)
        return out, torch.from_numpy(self.windows.label[index])


# ---- model and checkpoints -------------------------------------------------------------------------------


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


def _save_checkpoint(ckpt_dir: Path, state: dict, tensors: dict[str, Tensor]) -> None:
    """Weights first under a new name, then the JSON state that names them (atomically), then old weights go:
    a crash at any point leaves a consistent checkpoint."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    name = f"weights-m{state['member']}-s{state['step']}.safetensors"
    tmp = ckpt_dir / (name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, ckpt_dir / name)
    state = {**state, "weights": name}
    tmp = ckpt_dir / (STATE_NAME + ".tmp")
    tmp.write_text(json.dumps(state) + "\n")
    os.replace(tmp, ckpt_dir / STATE_NAME)
    for old in ckpt_dir.glob("weights-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)


def _load_checkpoint(ckpt_dir: Path, run: dict) -> tuple[dict, dict[str, Tensor]]:
    path = ckpt_dir / STATE_NAME
    try:
        state = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a readable checkpoint state ({e}); delete {ckpt_dir} to start "
                         "afresh") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or not isinstance(state.get("run"), dict):
        raise ValueError(f"{path}: not a detector checkpoint of format {STATE_FORMAT}; delete {ckpt_dir} to start "
                         "afresh")
    for key in RUN_KEYS:
        if state["run"].get(key) != run[key]:
            shown = "(differs)" if key in ("det_ids", "proposals", "arch") else (
                f"{state['run'].get(key)!r}, this run has {run[key]!r}")
            raise ValueError(f"{path} was made with a different {key}: {shown}; resume with the same settings, or "
                             "pass another --checkpoint-dir")
    name = str(state.get("weights", ""))
    if "/" in name or not name.endswith(".safetensors") or not (ckpt_dir / name).is_file():
        raise ValueError(f"{path} names weights {name!r} that are not in {ckpt_dir}; delete it to start afresh")
    try:
        tensors = load_file(str(ckpt_dir / name))
    except Exception as e:  # safetensors' own error types
        raise ValueError(f"{ckpt_dir / name} is not a readable checkpoint: {str(e)[:300]}") from None
    return state, tensors


def _lr_at(cfg: DetectorTrainConfig, epoch: int) -> float:
    return cfg.learning_rate * cfg.lr_gamma ** (epoch // cfg.lr_step_epochs)


# ---- training --------------------------------------------------------------------------------------------


@dataclass
class Member:
    """What one member's training needs beyond the config."""

    index: int
    variant: dict  # member_variant(...)
    arch: ArchConfig
    preprocess: Preprocess
    init: Bundle | None
    keep_head: bool


def train_member(cfg: DetectorTrainConfig, m: Member, images: list[DetImage], windows: Windows, d: Dist, run: dict,
                 ckpt_dir: Path, resume: tuple[dict, dict[str, Tensor]] | None,
                 on_epoch: Callable[[dict], None]) -> tuple[dict[str, Tensor], list[dict]]:
    """Train one member; returns its averaged weights (a GoogLeNet state dict) and its per-epoch records."""
    seed = m.variant["seed"]
    sampler = WindowSampler(windows, cfg.batch_size, cfg.fg_per_batch, tuple(m.variant["bg_iou"]), seed, d.world)
    fill = fill_colour(m.preprocess)
    data = WindowBatches(images, windows, sampler, cfg.size, m.variant["context"], m.variant["flip"], fill,
                         d.rank, cfg.image_cache_mb)
    total_steps = cfg.iterations or cfg.epochs * sampler.steps_per_epoch
    epochs = math.ceil(total_steps / sampler.steps_per_epoch)

    model = new_member(m.arch, seed, m.init, m.index, m.keep_head).to(d.device)
    channels_last = d.device.type == "cpu"  # NHWC convolutions: ~1.2x faster training on this CPU
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = EMA(model, cfg.ema_decay)
    params = list(model.parameters())
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": cfg.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}], lr=_lr_at(cfg, 0), momentum=cfg.momentum)
    epoch = step_in_epoch = step = 0
    sums = torch.zeros(6, dtype=torch.float64)  # loss, fg right, fg count, bg right, bg count, steps (this epoch)
    history: list[dict] = []
    if resume is not None:
        state, tensors = resume
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        ema.model.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
        for i, p in enumerate(params):  # SGD's only state: the momentum buffers, in parameter order
            if f"momentum.{i}" in tensors:
                opt.state[p]["momentum_buffer"] = tensors[f"momentum.{i}"].to(d.device)
        ema.updates = state["ema_updates"]
        epoch, step_in_epoch, step = state["epoch"], state["step_in_epoch"], state["step"]
        history = list(state["history"])
        if d.main:  # the other processes' shares are in the saved sums already
            sums = torch.tensor(state["sums"], dtype=torch.float64)
    live = model
    if d.world > 1:
        model = DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    scale = (1.0 / (255.0 * torch.tensor(m.preprocess.std))).view(1, 3, 1, 1).to(d.device)
    shift = (-torch.tensor(m.preprocess.mean) / torch.tensor(m.preprocess.std)).view(1, 3, 1, 1).to(d.device)

    def checkpoint() -> None:
        global_sums = _sum_over_processes(sums, d)
        if not d.main:
            return
        tensors = {f"model.{k}": v for k, v in live.state_dict().items()}
        tensors.update({f"ema.{k}": v for k, v in ema.model.state_dict().items()})
        for i, p in enumerate(params):
            buf = opt.state[p].get("momentum_buffer")
            if buf is not None:
                tensors[f"momentum.{i}"] = buf
        _save_checkpoint(ckpt_dir, {"format": STATE_FORMAT, "run": run, "member": m.index, "epoch": epoch,
                                    "step_in_epoch": step_in_epoch, "step": step, "ema_updates": ema.updates,
                                    "sums": global_sums.tolist(), "history": history}, tensors)

    began, out_of_time = time.perf_counter(), False
    while step < total_steps and not out_of_time:
        data.epoch = epoch
        last = min(sampler.steps_per_epoch, step_in_epoch + total_steps - step)
        loader = DataLoader(data, batch_size=None, sampler=range(step_in_epoch, last), num_workers=cfg.workers,
                            pin_memory=d.device.type == "cuda", persistent_workers=False)
        lr = _lr_at(cfg, epoch)
        for group in opt.param_groups:
            group["lr"] = lr
        model.train()
        start, seen = time.perf_counter(), 0
        bar = tqdm(total=sampler.steps_per_epoch, initial=step_in_epoch, desc=f"member {m.index} epoch {epoch + 1}",
                   unit="step", disable=None if d.main else True, leave=False)
        try:
            for x, y in loader:
                torch.manual_seed(_seed(seed, step, d.rank))  # dropout masks: a function of (seed, step, rank)
                x = x.to(d.device, non_blocking=True).float() * scale + shift
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                y = y.to(d.device, non_blocking=True)
                out = model(x)
                loss = googlenet_loss(out, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                ema.update(live)
                with torch.no_grad():
                    right = ((out[0] if isinstance(out, tuple) else out).argmax(1) == y).double().cpu()
                    fg = (y > 0).cpu()
                    sums += torch.stack([loss.detach().double().cpu(), right[fg].sum(), fg.sum().double(),
                                         right[~fg].sum(), (~fg).sum().double(), torch.tensor(1.0).double()])
                step, step_in_epoch, seen = step + 1, step_in_epoch + 1, seen + len(y)
                bar.update()
                if step % 5 == 0 or step_in_epoch == last:
                    bar.set_postfix(loss=f"{(sums[0] / sums[5]).item():.4f}",
                                    fg_acc=f"{(sums[1] / max(sums[2], 1)).item():.2f}",
                                    reg_s=f"{seen * d.world / (time.perf_counter() - start):.0f}", refresh=False)
                if cfg.max_minutes and time.perf_counter() - began >= 60 * cfg.max_minutes:
                    out_of_time = True
                    break
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step_in_epoch < last:
                    checkpoint()
        except KeyboardInterrupt:
            bar.close()
            checkpoint()  # the last completed step; a resumed run repeats from the next one
            if d.main:
                print(f"ircnn: stopped at member {m.index} step {step}; the checkpoint in {ckpt_dir} continues it "
                      "with --resume", file=sys.stderr, flush=True)
            raise
        bar.close()
        seconds = time.perf_counter() - start
        loss_sum, fg_right, fg_n, bg_right, bg_n, count = _sum_over_processes(sums, d).tolist()
        if not np.isfinite(loss_sum):
            raise ValueError(f"training diverged (loss {loss_sum}) in member {m.index} epoch {epoch + 1}; lower "
                             f"--lr (now {cfg.learning_rate})")
        complete = step_in_epoch == sampler.steps_per_epoch
        record = {"member": m.index, "epoch": epoch + 1, "epochs": epochs, "step": step, "steps": total_steps,
                  "complete": complete, "train_loss": loss_sum / max(count, 1.0),
                  "fg_accuracy": fg_right / max(fg_n, 1), "bg_accuracy": bg_right / max(bg_n, 1), "lr": lr,
                  "regions_per_s": seen * d.world / seconds, "seconds": seconds}
        history.append(record)
        if complete:
            epoch, step_in_epoch = epoch + 1, 0
            sums.zero_()
        checkpoint()
        if d.main:
            on_epoch(record)
    return {k: v.detach().cpu().contiguous() for k, v in ema.model.state_dict().items()}, history


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

    d = setup_dist(cfg.device)
    try:
        cache = ProposalCache(cfg.proposals_cache or out / ".proposals", settings)
        start = time.perf_counter()
        proposals, found = compute_proposals(cfg, images, cache, d)
        windows = build_windows(images, proposals, column_of, cfg.fg_iou)
        counts = np.array([len(p.boxes) for p in proposals])
        summary = {"images": len(images), "objects": int(windows.gt.sum()), "classes": len(det_ids),
                   "cache": str(cache.dir), **found, "seconds": time.perf_counter() - start,
                   "proposals_per_image": float(counts.mean()),
                   "recall": _recall(windows, cfg.fg_iou), "windows": len(windows.label),
                   "foreground": int((windows.label > 0).sum()), "background": int((windows.label == 0).sum())}
        if d.main:
            on_proposals(summary)

        ckpt_dir = Path(cfg.checkpoint_dir or out / ".detector-checkpoint")
        run = {"det_ids": det_ids, "arch": [a.to_dict() for a in archs], "batch_size": cfg.batch_size,
               "fg_per_batch": cfg.fg_per_batch, "world_size": d.world, "seed": cfg.seed, "size": cfg.size,
               "members": cfg.members, "proposals": cache.key, "windows": len(windows.label)}
        resume = None
        if (ckpt_dir / STATE_NAME).exists():
            if not cfg.resume:
                raise ValueError(f"{ckpt_dir / STATE_NAME} exists from an earlier run; pass --resume to continue "
                                 "it, or delete it (or pick another --checkpoint-dir) to start afresh")
            resume = _load_checkpoint(ckpt_dir, run)
        elif cfg.resume and d.main:
            print(f"ircnn: no checkpoint at {ckpt_dir}; starting afresh", file=sys.stderr, flush=True)
        first = resume[0]["member"] if resume else 0
        for index in range(first, cfg.members):
            member = Member(index, member_variant(cfg, index), archs[index], pre, init, keep_head)
            weights, history = train_member(cfg, member, images, windows, d, run, ckpt_dir,
                                            resume if index == first else None, on_epoch)
            if d.main:  # finished members wait here for the bundle
                save_member(ckpt_dir, index, weights, history)
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
            "recipe": {**dataclasses.asdict(cfg), "lr": cfg.learning_rate},
            "weights": "Polyak average (EMA) of the training weights"}
        bundle = Bundle(task="det200", members=members, preprocess=pre, provenance=provenance)
        save_bundle(out, bundle)
        if cfg.multibox_from is not None:  # the detector proposes with the boxes it was trained on
            from detector.multibox_bundle import load_multibox, multibox_provenance, save_multibox

            save_multibox(out, load_multibox(cfg.multibox_from), multibox_provenance(cfg.multibox_from))
            bundle.multibox = "multibox.safetensors"
        return bundle
    finally:
        if d.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _recall(windows: Windows, iou: float) -> float:
    """Share of ground-truth objects that some proposal (not the ground truth itself) covers at ``iou``."""
    found = total = 0
    for i in np.unique(windows.image[windows.gt]):
        rows = windows.image == i
        gt = torch.from_numpy(windows.boxes[rows & windows.gt])
        props = torch.from_numpy(windows.boxes[rows & ~windows.gt])
        total += len(gt)
        if len(props):
            found += int((box_iou(gt, props).max(1).values >= iou).sum())
    return found / max(total, 1)
