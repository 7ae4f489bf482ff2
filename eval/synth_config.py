"""What a synthetic detection set is made of (``SynthConfig``): sizes, counts and the seed, checked when made;
``eval.synth`` writes the set and ``eval.synth_render`` draws its images."""

from __future__ import annotations

from dataclasses import dataclass

from eval.synth_photos import CLASSES

MAX_IMAGES = 1_000_000


@dataclass(frozen=True)
class SynthConfig:
    images: int = 100           # images in train + val together, 1..1,000,000
    seed: int = 0               # same seed -> byte-identical files
    classes: int = len(CLASSES)  # use the first K entries of CLASSES
    val_fraction: float = 0.2   # the last round(images * val_fraction) images (at least one if > 0) form val
    size: int = 500             # longer image side in px (ILSVRC DET images are mostly 500 x 333..500)
    min_object: int = 16        # smallest object, longer side of its whole pasted box in px
    min_visible: float = 0.3    # every annotated object keeps this share of its pasted pixels visible
    min_box: int = 16           # every annotated box (visible part) is at least this many px on its shorter side

    def __post_init__(self):
        for name in ("images", "seed", "classes", "size", "min_object"):
            if not isinstance(getattr(self, name), int) or isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be an int, got {getattr(self, name)!r}")
        if not 1 <= self.images <= MAX_IMAGES:
            raise ValueError(f"images (--images) must be in 1..{MAX_IMAGES:,}, got {self.images}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed (--seed) must be in 0..2**63-1, got {self.seed}")
        if not 1 <= self.classes <= len(CLASSES):
            raise ValueError(f"classes (--classes) must be in 1..{len(CLASSES)} (the synthetic set has photos for "
                             f"{len(CLASSES)} DET classes), got {self.classes}")
        if not 0.0 <= self.val_fraction <= 1.0:
            raise ValueError(f"val_fraction (--val-fraction) must be in 0..1, got {self.val_fraction}")
        if not 128 <= self.size <= 4096:
            raise ValueError(f"size (--size) must be in 128..4096 px, got {self.size}")
        if not 4 <= self.min_object <= self.size // 2:
            raise ValueError(f"min_object must be in 4..size/2 = {self.size // 2} px, got {self.min_object}")
        if not 0.0 < self.min_visible <= 1.0:
            raise ValueError(f"min_visible must be in (0, 1], got {self.min_visible}")
        if not 1 <= self.min_box <= self.min_object * 2:
            raise ValueError(f"min_box must be in 1..2 * min_object, got {self.min_box}")

    @property
    def val_images(self) -> int:
        if self.val_fraction == 0:
            return 0
        return min(self.images, max(1, round(self.images * self.val_fraction)))
