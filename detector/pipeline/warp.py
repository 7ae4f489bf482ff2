"""R-CNN's region warp (Girshick et al. 2014, appendix A, "dilate" then "warp"), batched over the boxes of an image.

Each box is enlarged about its centre so that, once warped to ``size x size``, ``context`` pixels of image context
surround it at the warped scale (R-CNN: p = 16 at 227; here 16 at 224), i.e. its width and height are multiplied
by ``size / (size - 2 * context)``. The enlarged box is then stretched to ``size x size`` regardless of its aspect
ratio (anisotropic), with bilinear interpolation and no antialiasing, as R-CNN's ``rcnn_im_crop.m`` does with
``imresize(..., 'bilinear', 'antialiasing', false)``. Where the enlarged box leaves the image, the missing pixels
are ``fill`` (the mean colour, which is zero after normalisation), and samples near the edge blend the two.

Sampling convention: pixel ``i`` covers ``[i, i + 1)`` and output pixel ``j`` takes the image at
``x1' + (j + 0.5) * (x2' - x1') / size`` (half-pixel centres, as ``cv2.resize``, ``roi_align(aligned=True)`` and
``grid_sample(align_corners=False)`` use), for the enlarged box ``x1', x2'``.

Two implementations of that one mapping, picked by ``backend``:

- ``"opencv"`` (the CPU default): one ``cv2.warpAffine`` per box, straight into the output array. OpenCV's
  fixed-point SIMD bilinear (1/32 px positions, 15-bit weights) is within 1 grey level of exact float
  interpolation and several times faster on CPUs than the batched torch version below (``bench/warp.py``
  measures both), so the loop over boxes stays. Either way the warp is a small part of the time the networks
  take for the same regions.
  OpenCV stores source positions as 16-bit integers, so images with a side of ``CV2_MAX_SIDE`` or more go to
  the torch path.
- ``"torch"`` (images on a GPU, and very large images): ``grid_sample`` over the image minus ``fill`` with zero
  padding, one separable affine grid per box, ``chunk`` boxes per call so the float intermediate stays near
  40 MB.

The result is ``uint8 Tensor[R, 3, size, size]`` in channels-last memory layout (a permuted view of
``[R, size, size, 3]``), which is the layout ``detector.pipeline.ensemble.Ensemble`` feeds its networks.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from detector.config import MAX_REGIONS

MAX_COORD = 1e8  # |box coordinate| bound in pixels; beyond any image the decoder accepts (40 M pixels, any shape)
CV2_MAX_SIDE = 32_000  # cv2.warpAffine keeps source positions in int16
BACKENDS = ("auto", "opencv", "torch")
TORCH_CHUNK = 64  # boxes per grid_sample call: 64 x 3 x 224 x 224 float32 = 38 MB


def context_scale(size: int = 224, context: int = 16) -> float:
    """Factor on a box's width and height that leaves ``context`` px of context on each side after the warp."""
    return size / (size - 2 * context)


def dilate_boxes(boxes: Tensor, size: int = 224, context: int = 16) -> Tensor:
    """``boxes (Tensor[R, 4])`` -> the enlarged boxes that are warped, same centre, ``Tensor[R, 4]`` float32."""
    boxes = boxes.float()
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2  # [R, 2]
    half = (boxes[:, 2:] - boxes[:, :2]) * (context_scale(size, context) / 2)  # [R, 2]
    return torch.cat([centre - half, centre + half], dim=1)


def check_image(image: np.ndarray | Tensor) -> tuple[int, int]:
    """Returns ``(height, width)``; raises on anything but uint8 ``[H, W, 3]`` numpy or ``Tensor[3, H, W]``."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image must be a uint8 RGB array [H, W, 3], got {image.dtype} {list(image.shape)}")
        h, w = image.shape[:2]
    elif isinstance(image, Tensor):
        if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"image must be a uint8 Tensor[3, H, W], got {image.dtype} {list(image.shape)}")
        h, w = image.shape[1:]
    else:
        raise TypeError(f"image must be a numpy array or a Tensor, got {type(image).__name__}")
    if min(h, w) < 1:
        raise ValueError(f"image has no pixels ({w}x{h})")
    return int(h), int(w)


def check_boxes(boxes: Tensor | np.ndarray) -> Tensor:
    """``Tensor[R, 4]`` float32 on the CPU (an empty input becomes ``[0, 4]``); raises on bad values."""
    if not isinstance(boxes, (Tensor, np.ndarray)):
        raise TypeError(f"boxes must be a Tensor[R, 4] (or numpy [R, 4]), got {type(boxes).__name__}")
    boxes = torch.as_tensor(boxes)
    if boxes.dtype == torch.bool or boxes.is_complex():
        raise ValueError(f"boxes must be real numbers, got {boxes.dtype}")
    if boxes.numel() == 0:
        return torch.zeros(0, 4)
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must have shape [R, 4] (x1, y1, x2, y2), got {list(boxes.shape)}")
    if len(boxes) > MAX_REGIONS:
        raise ValueError(f"{len(boxes)} boxes in one call; at most {MAX_REGIONS} (warp them in chunks)")
    boxes = boxes.detach().to("cpu", torch.float32)
    if not torch.isfinite(boxes).all():
        raise ValueError("boxes contain NaN or infinite coordinates")
    if boxes.abs().max() > MAX_COORD:
        raise ValueError(f"box coordinates must lie within +-{MAX_COORD:g} px, got {boxes.abs().max().item():g}")
    bad = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ValueError(f"box {i} {boxes[i].tolist()} has x2 < x1 or y2 < y1 (boxes are x1, y1, x2, y2)")
    return boxes


def warp_regions(image: np.ndarray | Tensor, boxes: Tensor, size: int = 224, context: int = 16,
                 fill: tuple[int, int, int] = (124, 116, 104), backend: str = "auto") -> Tensor:
    """Warp each box of one image to ``size x size`` with ``context`` px of context (module docstring).

    Args:
        image: uint8 RGB ``[H, W, 3]`` (numpy) or uint8 ``Tensor[3, H, W]`` (any device).
        boxes: ``Tensor[R, 4]`` x1, y1, x2, y2 in the image's pixels, R <= ``MAX_REGIONS``; may cross the border.
        size: output side; context: px of context on each side at the output scale, ``0 <= context < size / 2``.
        fill: RGB colour of the area outside the image (the bundle's mean x 255).
        backend: ``"auto"`` (OpenCV for CPU images below ``CV2_MAX_SIDE``, else torch), ``"opencv"``, ``"torch"``.
    Returns:
        uint8 ``Tensor[R, 3, size, size]``, channels-last memory layout, on the image's device.
    """
    h, w = check_image(image)
    boxes = check_boxes(boxes)
    if not isinstance(size, int) or not 16 <= size <= 1024:
        raise ValueError(f"size must be an int in 16..1024, got {size!r}")
    if not isinstance(context, int) or not 0 <= 2 * context < size:
        raise ValueError(f"context must be an int with 0 <= 2 * context < size ({size}), got {context!r}")
    if len(fill) != 3 or not all(isinstance(v, (int, np.integer)) and 0 <= v <= 255 for v in fill):
        raise ValueError(f"fill must be three ints in 0..255 (an RGB colour), got {fill!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    on_cpu = isinstance(image, np.ndarray) or image.device.type == "cpu"
    if backend == "auto":
        backend = "opencv" if on_cpu and max(h, w) < CV2_MAX_SIDE else "torch"
    elif backend == "opencv" and not (on_cpu and max(h, w) < CV2_MAX_SIDE):
        raise ValueError(f"the opencv backend needs a CPU image with sides under {CV2_MAX_SIDE} px; use 'torch'")
    dilated = dilate_boxes(boxes, size, context)
    fill = tuple(int(v) for v in fill)
    if backend == "opencv":
        if isinstance(image, Tensor):
            image = image.permute(1, 2, 0).numpy()
        return _warp_opencv(np.ascontiguousarray(image), dilated, size, fill)
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    return _warp_torch(image, dilated, size, fill)


def _warp_opencv(image: np.ndarray, dilated: Tensor, size: int, fill: tuple[int, int, int]) -> Tensor:
    """``image`` uint8 C-contiguous ``[H, W, 3]``, ``dilated (Tensor[R, 4])`` -> ``Tensor[R, 3, size, size]``."""
    out = np.empty((len(dilated), size, size, 3), np.uint8)
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    for k, (x1, y1, x2, y2) in enumerate(dilated.tolist()):
        sx, sy = (x2 - x1) / size, (y2 - y1) / size
        # output pixel index j -> source pixel index x1 + (j + 0.5) * sx - 0.5 (half-pixel centres both sides)
        m = np.array([[sx, 0.0, x1 + 0.5 * sx - 0.5], [0.0, sy, y1 + 0.5 * sy - 0.5]])
        cv2.warpAffine(image, m, (size, size), dst=out[k], flags=flags, borderMode=cv2.BORDER_CONSTANT,
                       borderValue=fill)
    return torch.from_numpy(out).permute(0, 3, 1, 2)  # [R, 3, size, size], channels-last strides


def _warp_torch(image: Tensor, dilated: Tensor, size: int, fill: tuple[int, int, int],
                chunk: int = TORCH_CHUNK) -> Tensor:
    """``image`` uint8 ``Tensor[3, H, W]``, ``dilated (Tensor[R, 4])`` -> ``Tensor[R, 3, size, size]``."""
    device = image.device
    h, w = image.shape[1:]
    fill_t = torch.tensor(fill, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    x = image.float()[None] - fill_t  # [1, 3, H, W]; zero padding outside is then the fill colour
    out = torch.empty(len(dilated), size, size, 3, dtype=torch.uint8, device=device).permute(0, 3, 1, 2)
    t = (torch.arange(size, dtype=torch.float32, device=device) + 0.5) / size  # output pixel centres in [0, 1]
    dilated = dilated.to(device)
    for start in range(0, len(dilated), chunk):
        b = dilated[start:start + chunk]
        n = len(b)
        gx = (b[:, 0:1] + t * (b[:, 2:3] - b[:, 0:1])) * (2.0 / w) - 1.0  # [n, size], grid_sample's [-1, 1]
        gy = (b[:, 1:2] + t * (b[:, 3:4] - b[:, 1:2])) * (2.0 / h) - 1.0  # [n, size]
        grid = torch.stack([gx[:, None, :].expand(n, size, size), gy[:, :, None].expand(n, size, size)], dim=-1)
        warped = F.grid_sample(x.expand(n, -1, -1, -1), grid, mode="bilinear", padding_mode="zeros",
                               align_corners=False)  # [n, 3, size, size]
        warped += fill_t + 0.5  # back to pixel values; + 0.5 so that the truncating cast rounds
        out[start:start + n] = warped.clamp_(0, 255.5)
    return out



def warp_frames(image: np.ndarray | Tensor, boxes: Tensor, size: int = 224, scale: float = 1.8,
                fill: tuple[int, int, int] = (124, 116, 104)) -> Tensor:
    """Each box's context frame (ContextLocNet, Kantorov et al. 2016): the box enlarged ``scale`` times in width
    and height around its centre, warped to ``size x size``, with the box itself filled with ``fill`` (zero after
    normalisation), so that the network sees only what surrounds the box.

    ``boxes (Tensor[R, 4])`` -> uint8 ``Tensor[R, 3, size, size]`` (as ``warp_regions``).
    """
    if not 1.0 < scale <= 4.0:
        raise ValueError(f"scale must be in (1, 4], got {scale}")
    boxes = check_boxes(boxes)
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2  # [R, 2]
    half = (boxes[:, 2:] - boxes[:, :2]) * (scale / 2)  # [R, 2]
    frames = warp_regions(image, torch.cat([centre - half, centre + half], dim=1), size, 0, fill)
    inner = round(size * (1 - 1 / scale) / 2)  # the box's margin inside the warped frame
    frames[:, :, inner:size - inner, inner:size - inner] = torch.tensor(fill, dtype=torch.uint8,
                                                                         device=frames.device).view(1, 3, 1, 1)
    return frames
