"""Shared-trunk region scoring, an opt-in fast mode (SPPnet / Fast R-CNN style, not the paper's method).

The paper's R-CNN warps every proposal to 224 x 224 and runs the whole network on each (``RegionScorer``). Here
each member's trunk, the layers up to its stride-16 feature map, runs once on the whole image; each proposal's
features are pooled from that map with ``torchvision.ops.roi_align`` to the grid the rest of the network sees at
its native input size (14 x 14 at 224), and only the remaining layers and the head run per region:

    image  ->  resized to each of ``short_sides`` (longer side at most ``max_side``), normalised, padded to /16
    ->  trunk (once per member and scale)  ->  roi_align per box (its R-CNN context included), from the scale
    where the box is nearest ``size`` px  ->  rest + head per box  ->  softmax averaged over members
    ->  DET scores (``RegionScorer.to_det``)

Where each architecture is split (``split_member``):

- GoogLeNet: the trunk ends at inception (4e) (stride 16, 14 x 14 x 832 at 224); the rest is max pool 4 ->
  (5a) -> (5b) -> average pool -> linear, about 8% of the network's multiply-adds at 224 (Table 1).
- EfficientNet-Lite: the trunk ends before the last stride-2 stage (stride 16, the 112-channel stage of Lite0);
  the rest is the remaining blocks, the head convolution, pooling and the linear layer (a larger share of the
  network than GoogLeNet's: its 1152- and 1280-channel layers at 7 x 7).

A box and its ``context`` (R-CNN's 16 px at 224, ``RegionScorer.context``) map to the feature map as the warped
region would: the dilated box ``detector.pipeline.warp.dilate_boxes`` in the resized image's pixels, times
``grid / size`` (1/16). On a ``size x size`` image at scale 1, a box whose dilation is the whole image pools the
whole map, so trunk + rest is the member itself (the tests hold it to that). Boxes are stretched to the square
grid regardless of aspect ratio, as the warp does; feature-map cells outside the image read as zero.

Why a pyramid of scales, each box pooled from one (SPPnet's multi-scale rule): the rest of a classifier that
was never fine-tuned on pooled features only sees what it saw in training when the dilated box spans about
``size`` px (224) of the image the trunk ran on, so a box is pooled at the scale where the geometric mean of its
dilated sides is nearest ``size`` (in log ratio). One scale does not fit ILSVRC's range of box sizes: at
Fast R-CNN's single shorter side 600 the whole cat of ``chelsea`` (300 px in a 451 x 300 photo) spans 700 px of
the trunk's input, 3x what the head expects, and its det200-from-cls1000 Lite0 score drops from 0.95 (warped) to
0.03 (background 0.48), while at shorter side 224 to 300 it scores 0.98. The default ``short_sides`` (224, 320,
448, 640), steps of sqrt(2), bring dilated boxes of about 110 to 450 px in a 375 x 500 photo within a factor 1.19
of 224 px (smaller ones pool fewer cells than the grid, upsampled; the whole photo is 1.35x too large); together
the four trunks cost about 20 crops of 224 x 224 for such a photo, against one full network pass per region when
warping. ``max_side`` (1000) bounds the largest scale's memory and time.

Context frames (``Detector``'s whole-objects step for ``det200-from-cls1000`` bundles) are pooled from the same
map (``frames="pool"``): the frame box enlarged ``frame_scale`` times, the cells covering the box set to zero,
the feature-space counterpart of ``detector.pipeline.warp.warp_frames``'s blanked box; or warped and scored by the full
networks as ``RegionScorer`` does (``frames="warp"``). The split members run in torch, in
``EnsembleConfig.precision``, or exported to ONNX Runtime (``engine="onnxruntime"``, fp32, the CPU);
``cascade_top_k`` does not apply (each trunk runs once anyway).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align

from detector.bundle.format import Bundle
from detector.config import DetectConfig, SharedTrunkConfig
from detector.nets.efficientnet_lite import EfficientNetLiteConfig
from detector.pipeline.scoring import RegionScorer
from detector.pipeline.warp import MAX_REGIONS, check_boxes, check_image, dilate_boxes
from detector.runtimes.base import cache_dir
from detector.runtimes.export import cached, export_key, write_onnx
from detector.runtimes.sessions import OrtSession

STRIDE = 16  # the trunk's output stride for both architectures


@dataclass(frozen=True)
class SplitMember:
    """One member cut at its stride-16 feature map: ``trunk(Tensor[1, 3, H, W]) -> Tensor[1, C, h, w]``,
    ``rest(Tensor[R, C, grid, grid]) -> logits Tensor[R, K]``; ``member(x) == rest(trunk(x))`` in eval mode."""

    trunk: Callable[[Tensor], Tensor]
    rest: Callable[[Tensor], Tensor]


def split_member(member: nn.Module) -> SplitMember:
    """The trunk / rest split of a GoogLeNet or EfficientNet-Lite member (module docstring for where)."""
    if isinstance(member.config, EfficientNetLiteConfig):
        return _split_lite(member)
    return _split_googlenet(member)


def _split_googlenet(m: nn.Module) -> SplitMember:
    def trunk(x: Tensor) -> Tensor:
        x = m.inception4a(m.maxpool3(m.inception3b(m.inception3a(m.stem(x)))))
        return m.inception4e(m.inception4d(m.inception4c(m.inception4b(x))))  # [N, 832 w, H/16, W/16]

    def rest(x: Tensor) -> Tensor:
        x = m.inception5b(m.inception5a(m.maxpool4(x)))
        return m.fc(m.dropout(torch.flatten(m.avgpool(x), 1)))

    return SplitMember(trunk, rest)


def _split_lite(m: nn.Module) -> SplitMember:
    # the last stride-2 block starts the rest; everything before it runs at stride <= 16
    cut = max(i for i, block in enumerate(m._blocks) if max(block._depthwise_conv.stride) > 1)

    def trunk(x: Tensor) -> Tensor:
        x = m._swish(m._bn0(m._conv_stem(x)))
        for block in m._blocks[:cut]:
            x = block(x)  # drop connect, the only per-index argument, is off in eval mode
        return x

    def rest(x: Tensor) -> Tensor:
        for block in m._blocks[cut:]:
            x = block(x)
        x = m._swish(m._bn1(m._conv_head(x)))
        return m._fc(m._dropout(m._avg_pooling(x).flatten(1)))

    return SplitMember(trunk, rest)


class _Part(nn.Module):
    """One side of a split, as a module that holds the member's parameters (what the ONNX exporter traces)."""

    def __init__(self, member: nn.Module, fn: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.member, self.fn = member, fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)


def onnx_split(member: nn.Module, mean: tuple[float, ...], std: tuple[float, ...], size: int) -> SplitMember:
    """``split_member(member)`` exported to ONNX (trunk: any height and width that are multiples of 16; rest:
    any number of regions) and run by ONNX Runtime, fp32 on the CPU; same inputs and outputs as torch tensors."""
    split = split_member(member)
    key = export_key(member, mean, std, size)
    side = 4096  # trunk inputs up to 4096 px a side (max_side is at most 4000), multiples of STRIDE
    parts = {"trunk": (split.trunk, torch.zeros(1, 3, size, size),
                       {2: ("h", STRIDE, side, STRIDE), 3: ("w", STRIDE, side, STRIDE)}),
             "rest": (split.rest, None, {0: ("regions", 1, MAX_REGIONS)})}
    runners = {}
    for name, (fn, example, dynamic) in parts.items():
        if example is None:  # the rest's input: two trunk outputs at the native size
            with torch.inference_mode():
                example = split.trunk(torch.zeros(2, 3, size, size)).clone()
        path = cache_dir() / "onnx" / f"{key}-{name}{STRIDE}.onnx"
        if not cached(path):
            write_onnx(_Part(member, fn), example, path, ("x", "y"), dynamic)
        runners[name] = OrtSession(path, torch.get_num_threads())

    def run(name: str) -> Callable[[Tensor], Tensor]:
        return lambda x: torch.from_numpy(runners[name](x.float().contiguous().cpu().numpy()))

    return SplitMember(run("trunk"), run("rest"))


def resize_factors(height: int, width: int, config: SharedTrunkConfig) -> list[float]:
    """The factors the whole image is resized by, one per ``short_sides`` entry, each capped by ``max_side``
    (equal factors, which the cap can make, are kept once). Increasing."""
    cap = config.max_side / max(height, width)
    return sorted({min(side / min(height, width), cap) for side in config.short_sides})


def assign_scales(boxes: Tensor, factors: list[float], size: int) -> Tensor:
    """``boxes (Tensor[R, 4])`` (dilated, in the image's pixels) -> ``Tensor[R]`` int64, the index of the factor
    that brings the geometric mean of each box's sides nearest ``size`` px (in log ratio)."""
    side = ((boxes[:, 2] - boxes[:, 0]).clamp(min=1.0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=1.0)).sqrt()  # [R]
    f = torch.tensor(factors, dtype=torch.float32)
    return (side[:, None] * f[None, :] / size).log().abs().argmin(dim=1)  # [R]


class SharedTrunkScorer:
    """``RegionScorer``'s interface (``score_regions``, ``score_frames``, ``det_ids``, ``cls_to_det``, ``config``)
    with each member's trunk run once per image and scale, so ``Detector(SharedTrunkScorer(bundle, config),
    proposals, config)`` detects with it. ``score_regions(image, boxes) -> (Tensor[R, K + 1], seconds)``;
    ``seconds``: ``warp`` (resizing the image, pooling the regions), ``networks`` (trunks and rests), ``trunk``
    (of those). The trunks' feature maps of the last image are kept, so that ``score_frames`` after
    ``score_regions`` on the same pixels does not run them again."""

    def __init__(self, bundle: Bundle, config: DetectConfig = DetectConfig(),
                 trunk: SharedTrunkConfig = SharedTrunkConfig()) -> None:
        if config.cascade_top_k is not None:
            raise ValueError("cascade_top_k does not apply to shared-trunk scoring (each member's trunk runs "
                             "once per image); leave it None")
        if len(set(bundle.input_sizes)) > 1:  # one pyramid and one pooled grid for all members
            raise ValueError(f"shared-trunk scoring runs members of one input size; this bundle's members take "
                             f"{', '.join(map(str, bundle.input_sizes))} px: use warped scoring (--scoring warped, "
                             "the default) for it, or shared-trunk scoring on a bundle of one input size")
        self.warped = RegionScorer(bundle, config)  # DET mapping, context, ensemble; scores warped frames
        self.config, self.trunk_config = config, trunk
        self.det_ids, self.cls_to_det = self.warped.det_ids, self.warped.cls_to_det
        self.size, self.context = self.warped.size, self.warped.context
        ensemble = self.warped.ensemble
        self.device, self.normalize = ensemble.device, ensemble.transform
        if trunk.engine == "onnxruntime":
            if self.device.type != "cpu":
                raise ValueError(f"the onnxruntime engine runs on the CPU; the bundle's members are on {self.device}")
            pre = bundle.preprocess
            self.splits = [onnx_split(m, pre.mean, pre.std, self.size) for m in ensemble.members]
        else:
            self.splits = [split_member(m) for m in ensemble.members]
        self.precision = config.ensemble.precision
        self.channels_last = config.ensemble.channels_last
        self._cached: tuple[tuple, list[float], list[list[Tensor]]] | None = None  # (image key, factors, maps)
        with torch.inference_mode():  # the grid the rest sees at the native input size: 14 at 224
            self.grid = self.splits[0].trunk(torch.zeros(1, 3, self.size, self.size, device=self.device)).shape[-1]

    def runtimes(self) -> list[str]:
        """What each member runs on: its trunk and rest on the shared trunk's engine, in the precision asked."""
        layout = " channels_last" if self.trunk_config.engine == "torch" and self.channels_last else ""
        return [f"shared trunk, {self.trunk_config.engine} {self.precision}{layout}"] * len(self.splits)

    def __call__(self, image: np.ndarray, boxes: Tensor) -> Tensor:
        return self.score_regions(image, boxes)[0]

    @torch.inference_mode()
    def score_regions(self, image: np.ndarray | Tensor, boxes: Tensor) -> tuple[Tensor, dict[str, float]]:
        """``image`` uint8 RGB ``[H, W, 3]`` (or ``Tensor[3, H, W]``), ``boxes (Tensor[R, 4])`` in its pixels ->
        ``Tensor[R, K + 1]`` DET probabilities on the CPU, column 0 background, and the seconds per stage."""
        boxes = self._check(image, boxes)
        seconds = {"warp": 0.0, "networks": 0.0, "trunk": 0.0}
        return self._run(image, dilate_boxes(boxes, self.size, self.context), seconds), seconds

    def score_image(self, image: np.ndarray, crops: int = 10) -> Tensor:
        """The whole image's DET probabilities ``Tensor[K + 1]``, through the whole networks (``RegionScorer``)."""
        return self.warped.score_image(image, crops)

    @torch.inference_mode()
    def score_frames(self, image: np.ndarray | Tensor, boxes: Tensor,
                     seconds: dict[str, float] | None = None) -> Tensor:
        """``boxes (Tensor[R, 4])`` -> ``Tensor[R, K + 1]``, the DET probabilities of each box's context frame
        (``config.frame_scale`` times the box, the box blanked): pooled, or warped (``SharedTrunkConfig.frames``)."""
        seconds = {"warp": 0.0, "networks": 0.0, "trunk": 0.0} if seconds is None else seconds
        boxes = self._check(image, boxes)
        if self.trunk_config.frames == "warp":
            if isinstance(image, Tensor):
                image = image.permute(1, 2, 0).cpu().numpy()
            return self.warped.score_frames(image, boxes, seconds)
        centre = (boxes[:, :2] + boxes[:, 2:]) / 2  # [R, 2]
        half = (boxes[:, 2:] - boxes[:, :2]) * (self.config.frame_scale / 2)
        inner = round(self.grid * (1 - 1 / self.config.frame_scale) / 2)  # the box's margin in the pooled grid
        return self._run(image, torch.cat([centre - half, centre + half], dim=1), seconds, blank=inner)

    def _check(self, image: np.ndarray | Tensor, boxes: Tensor) -> Tensor:
        check_image(image)
        boxes = check_boxes(boxes)
        if len(boxes) > self.config.max_regions:
            raise ValueError(f"{len(boxes)} regions; at most max_regions = {self.config.max_regions} per image")
        return boxes

    def _features(self, image: np.ndarray | Tensor,
                  seconds: dict[str, float]) -> tuple[list[float], list[list[Tensor]]]:
        """``(factors, maps)``: ``maps[member][scale]`` is ``Tensor[1, C, h, w]``, the trunk's output on the image
        resized by ``factors[scale]`` (normalised, then padded to /16 with zeros: every stride-2 layer then sees an
        even side, as at 224, for which EfficientNet's "same" paddings are fixed; zero is the warp's fill colour)."""
        pixels = image if isinstance(image, Tensor) else torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
        key = (tuple(pixels.shape), str(pixels.device), hash(pixels.cpu().numpy().tobytes()))
        if self._cached is not None and self._cached[0] == key:
            return self._cached[1], self._cached[2]
        t0 = time.perf_counter()
        h, w = pixels.shape[1:]
        factors = resize_factors(h, w, self.trunk_config)
        x = self.normalize(pixels[None])  # [1, 3, H, W] float32 on the members' device
        inputs = []
        for factor in factors:
            y = x
            if factor != 1.0:
                y = F.interpolate(x, size=(max(1, round(h * factor)), max(1, round(w * factor))), mode="bilinear",
                                  align_corners=False, antialias=factor < 1.0)
            y = F.pad(y, (0, -y.shape[3] % STRIDE, 0, -y.shape[2] % STRIDE))
            inputs.append(y.contiguous(memory_format=torch.channels_last) if self.channels_last else y)
        t1 = time.perf_counter()
        seconds["warp"] += t1 - t0
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            maps = [[split.trunk(y).float() for y in inputs] for split in self.splits]
        elapsed = time.perf_counter() - t1
        seconds["trunk"] += elapsed
        seconds["networks"] += elapsed
        self._cached = (key, factors, maps)
        return factors, maps

    def _run(self, image: np.ndarray | Tensor, rois: Tensor, seconds: dict[str, float], blank: int = 0) -> Tensor:
        """``rois (Tensor[R, 4])``: the pixel boxes pooled to ``grid x grid`` (context included), before resizing;
        ``blank``: cells on each side of the pooled grid kept, the inside set to zero (frames)."""
        if not len(rois):
            return torch.zeros(0, len(self.det_ids) + 1)
        factors, maps = self._features(image, seconds)
        scale = assign_scales(rois, factors, self.size)  # [R]
        order = scale.argsort(stable=True)  # regions grouped by scale, so a chunk pools from few maps
        total = None
        for member, split in enumerate(self.splits):
            probs = []
            for start in range(0, len(rois), self.config.warp_chunk):
                t0 = time.perf_counter()
                rows = order[start:start + self.config.warp_chunk]
                pooled = []
                for k in scale[rows].unique().tolist():
                    these = rows[scale[rows] == k]
                    boxes = torch.cat([torch.zeros(len(these), 1), rois[these] * factors[k]], dim=1)  # [n, 5]
                    # sampling_ratio -1: ceil(cell span / grid) samples per bin, averaging a large box's cells
                    pooled.append(roi_align(maps[member][k], boxes.to(self.device), self.grid,
                                            spatial_scale=self.grid / self.size, sampling_ratio=-1, aligned=True))
                pooled = torch.cat(pooled)  # [n, C, grid, grid]
                if blank:
                    pooled[:, :, blank:self.grid - blank, blank:self.grid - blank] = 0.0
                if self.channels_last:
                    pooled = pooled.contiguous(memory_format=torch.channels_last)
                t1 = time.perf_counter()
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
                    probs.append(split.rest(pooled).float().softmax(dim=1))  # [n, C_head]
                seconds["warp"] += t1 - t0
                seconds["networks"] += time.perf_counter() - t1
            p = torch.cat(probs)
            total = p if total is None else total + p
        out = torch.empty_like(total)
        out[order] = total / len(self.splits)  # back to the boxes' order
        return self.warped.to_det(out).float().cpu()
