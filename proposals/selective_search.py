"""Selective search (Uijlings et al., IJCV 2013) as R-CNN runs it, with the paper's 2x coarser superpixels.

Built on opencv-contrib's ``cv2.ximgproc.segmentation``. What is matched on purpose:

- **R-CNN's "fast" mode** (``selective_search_boxes.m``): the image resized to 500 px wide; HSV and Lab; Felzenszwalb
  graph segmentation at k = 50 and 100 with min size = k and sigma = 0.8; the strategies colour+texture+size+fill
  and texture+size+fill; boxes under 20 px wide or high *at that 500 px scale* dropped (R-CNN's
  ``FilterBoxesWidth(boxes, 20)``); duplicates removed; boxes mapped back to the original pixels.
- **"quality" mode** (Uijlings' and R-CNN's other setting): k = 50, 100, 150, 300; the strategies
  colour+texture+size+fill, texture+size+fill, fill+size and size alone; colour spaces HSV, Lab, rgI (normalised
  r and g plus intensity, computed here since OpenCV has no such conversion; OpenCV's own quality mode uses raw R
  and G instead), H (hue alone) and I (intensity).
- **The paper's change** (section 8, "the super-pixel size was increased by 2x"): every k and min size multiplied
  by ``coarsen``. On scikit-image's 11 bundled photos 2.0 keeps a median 0.45 of the boxes of 1.0 in fast mode
  (0.28..0.62 per image; 0.38 in quality mode; ``bench/selective_search.py`` prints the table). R-CNN's 20 px
  filter matters for that figure: without it the fast-mode median is 0.375, since coarser superpixels remove
  mostly small boxes, which the filter drops anyway.

Differences from OpenCV's own ``switchToSelectiveSearchFast``, which is not used: that one takes k = 150, 300,
450, uses hue over 0..179 (so 7 of the 25 colour-histogram bins stay empty; here hue spans 0..255 as in Uijlings'
``im2uint8(rgb2hsv(...))``) and shares one strategy object between its two strategies.

Order: OpenCV ranks every region by ``rand() / RAND_MAX * level`` (level 1 = an initial superpixel) and sorts
ascending, so small, early regions come first with random interleaving. It calls libc's ``rand()``, so
``srand(config.seed)`` right before ``process()`` makes the order reproducible: the same image and config give
the same boxes in the same order (glibc treats seed 0 as 1). That holds while no other thread calls ``rand()`` at the same moment, which is
one more reason to prefer ``SelectiveSearchRunner``, whose worker process does nothing else.

Robustness: OpenCV's code is quadratic in the number of superpixels (an ``n x n`` neighbour matrix, per-region
passes over all pixels) and crashes take the whole process with them, so the input is bounded before it gets
there (at most ``MAX_PIXELS``; any image is resized so that the working image is at most ``resize_width`` x
``2 * resize_width``) and ``SelectiveSearchRunner`` runs OpenCV in a child process with a timeout. Images whose
working short side would be under ``MIN_WORK_SIDE`` px (a 1 x 4000 strip) are stretched across to that size,
with x and y mapped back separately. A single-colour image gives one box, the whole image.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import signal
import threading

import cv2
import numpy as np

from proposals.config import MIN_WORK_SIDE, SelectiveSearchConfig

MAX_PIXELS = 100_000_000  # refuse larger inputs; a 100 MP uint8 RGB array is already 300 MB
SIGMA = 0.8  # Felzenszwalb's Gaussian pre-smoothing, as in R-CNN
KS = {"fast": (50, 100), "quality": (50, 100, 150, 300)}  # Felzenszwalb k before coarsening; min size = k

_libc = ctypes.CDLL(None)  # the process's C library: the rand() that OpenCV's ranking calls


class ProposalError(ValueError):
    """An image for which no proposals could be made (too large, no pixels, or OpenCV crashed or timed out)."""


def selective_search(image: np.ndarray, config: SelectiveSearchConfig = SelectiveSearchConfig()) -> np.ndarray:
    """Selective search boxes of one image, in this process.

    ``image``: ``uint8`` RGB ``[H, W, 3]`` (grayscale ``[H, W]`` / ``[H, W, 1]`` and RGBA ``[H, W, 4]``, composited
    over white, are converted). Returns ``float32 [N, 4]`` ``x1, y1, x2, y2`` in original pixels (no ``+1``), best
    ranked first, the same for the same image and config. An OpenCV crash here takes the process down: untrusted
    images belong in ``SelectiveSearchRunner``.
    """
    work, original = _prepare(image, config)
    return _to_boxes(_search(work, config), work.shape[:2], original, config)


class SelectiveSearchRunner:
    """``selective_search`` in a reusable worker process, so that an OpenCV crash or a runaway image never takes
    the caller down: such an image raises ``ProposalError`` and the next call gets a fresh worker.

    Checking and resizing the image happen in the caller (cheap, and only the small working image crosses the
    pipe); the worker runs OpenCV only. The worker is started with "spawn" (forking a process that runs torch
    threads is unsafe) as the runner is made, and reused. One call at a time: concurrent calls wait for each
    other (use one runner per thread for parallel work).
    """

    def __init__(self, config: SelectiveSearchConfig = SelectiveSearchConfig(), timeout: float = 60.0) -> None:
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        self.config, self.timeout = config, timeout
        self._context = multiprocessing.get_context("spawn")
        self._lock = threading.Lock()
        self._process = self._conn = None
        self._start()

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """Same contract as ``selective_search``; raises ``ProposalError`` if the worker crashed or timed out."""
        work, original = _prepare(image, self.config)
        rects = self._request(_search, (work, self.config))
        return _to_boxes(rects, work.shape[:2], original, self.config)

    def close(self) -> None:
        with self._lock:
            self._stop(graceful=True)

    def __enter__(self) -> SelectiveSearchRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _request(self, fn, args: tuple):
        """Run ``fn(*args)`` in the worker (``fn`` picklable by reference) and return its result."""
        with self._lock:
            if self._process is None or not self._process.is_alive():
                self._stop()
                self._start()
            try:
                self._conn.send((fn, args))
                reply = self._conn.recv() if self._conn.poll(self.timeout) else None
            except (EOFError, OSError):  # the worker died: the pipe is closed under us
                self._process.join(5)
                code = self._process.exitcode
                self._stop()
                how = (f"killed by {signal.Signals(-code).name}" if code is not None and code < 0
                       else f"exit code {code}")
                raise ProposalError(f"selective search crashed on this image (worker {how}); "
                                    "the next image gets a fresh worker") from None
            except BaseException:  # interrupted mid-request: a late reply would answer the next request
                self._stop()
                raise
            if reply is None:
                self._stop()
                raise ProposalError(f"selective search took longer than {self.timeout:g} s on this image and was "
                                    "stopped; the next image gets a fresh worker")
            ok, value = reply
            if not ok:
                raise ProposalError(f"selective search failed on this image: {value}")
            return value

    def _start(self) -> None:
        self._conn, child = self._context.Pipe()
        self._process = self._context.Process(target=_serve, args=(child,), daemon=True,
                                              name="selective-search")
        self._process.start()
        child.close()

    def _stop(self, graceful: bool = False) -> None:
        if self._process is None:
            return
        if graceful and self._process.is_alive():
            try:
                self._conn.send(None)
                self._process.join(2)
            except OSError:
                pass
        if self._process.is_alive():
            self._process.kill()
        self._process.join()
        self._conn.close()
        self._process = self._conn = None


def _serve(conn) -> None:
    """The worker's loop: ``(fn, args)`` in, ``(True, result)`` or ``(False, message)`` out, ``None`` to stop."""
    while True:
        try:
            request = conn.recv()
        except EOFError:  # the runner is gone
            return
        if request is None:
            return
        fn, args = request
        try:
            reply = (True, fn(*args))
        except Exception as e:  # cv2.error and friends: the worker itself is fine
            reply = (False, f"{type(e).__name__}: {e}")
        conn.send(reply)


def _prepare(image: np.ndarray, config: SelectiveSearchConfig) -> tuple[np.ndarray, tuple[int, int]]:
    """Check ``image`` and make the working image: ``uint8`` RGB ``[h, w, 3]``, C-contiguous, at most
    ``resize_width`` wide and ``2 * resize_width`` high, at least ``MIN_WORK_SIDE`` on both sides. Returns it and
    the original ``(H, W)``. The input is not modified."""
    if not isinstance(image, np.ndarray):
        raise TypeError(f"expected a numpy uint8 image, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise TypeError(f"expected a uint8 image, got dtype {image.dtype}")
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 3, 4))):
        raise ProposalError(f"expected an image [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], got shape {image.shape}")
    height, width = image.shape[:2]
    if height == 0 or width == 0:
        raise ProposalError(f"image has no pixels ({width}x{height})")
    if height * width > MAX_PIXELS:
        raise ProposalError(f"image is {width}x{height} = {height * width:,} pixels, more than the limit of "
                            f"{MAX_PIXELS:,} for selective search")
    h, w = _working_size(height, width, config.resize_width)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    # Huge inputs: keep every n-th pixel down to twice the working size, then average areas: a 30 MP photo costs
    # a few ms instead of a 90 MB copy and a full-resolution pass, with little more aliasing.
    image = np.ascontiguousarray(image[:: max(1, height // (2 * h)), :: max(1, width // (2 * w))])
    shrink = h <= image.shape[0] and w <= image.shape[1]
    work = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    if work.ndim == 2:
        return cv2.cvtColor(work, cv2.COLOR_GRAY2RGB), (height, width)
    if work.shape[2] == 4:  # over white, as detector.image does; after resizing, which only differs at edges
        alpha = work[..., 3:].astype(np.uint16)
        work = ((work[..., :3] * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)
    return np.ascontiguousarray(work), (height, width)


def _working_size(height: int, width: int, resize_width: int) -> tuple[int, int]:
    """``(h, w)`` of the image that is segmented: R-CNN's ``resize_width`` px wide, except that images taller than
    2:1 are made ``2 * resize_width`` high instead (so that a 1-px-wide strip does not become millions of pixels)
    and that a side under ``MIN_WORK_SIDE`` px is stretched to it (so that Felzenszwalb's min size and OpenCV's
    texture filters have room)."""
    scale = min(resize_width / width, 2 * resize_width / height)
    return max(MIN_WORK_SIDE, round(height * scale)), max(MIN_WORK_SIDE, round(width * scale))


def _search(work: np.ndarray, config: SelectiveSearchConfig) -> np.ndarray:
    """OpenCV's selective search on the working image ``uint8 [h, w, 3]`` RGB: ``int32 [M, 4]`` ``x, y, w, h`` in
    working pixels, OpenCV's rank order, duplicates already removed by OpenCV."""
    seg = cv2.ximgproc.segmentation
    ss = seg.createSelectiveSearchSegmentation()
    for channels in _colour_spaces(work, config.mode):
        ss.addImage(channels)
    for k in KS[config.mode]:
        k = k * config.coarsen
        ss.addGraphSegmentation(seg.createGraphSegmentation(SIGMA, k, max(1, round(k))))
    for strategy in _strategies(config.mode):
        ss.addStrategy(strategy)
    _libc.srand(config.seed)
    return np.asarray(ss.process(), dtype=np.int32).reshape(-1, 4)


def _colour_spaces(rgb: np.ndarray, mode: str) -> list[np.ndarray]:
    """The images that are segmented and grouped, ``uint8 [h, w, C]`` (C = 3 or 1) with values over 0..255:
    OpenCV's histograms bin every channel over 0..256."""
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV_FULL)  # hue over 0..255, not 0..179
    lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2Lab)
    if mode == "fast":
        return [hsv, lab]
    intensity = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    total = rgb.sum(axis=2, dtype=np.float32)
    rg = np.where(total[..., None] > 0, rgb[..., :2] * (255 / np.maximum(total, 1))[..., None], 255 / 3)
    rgi = np.dstack([np.rint(rg).astype(np.uint8), intensity])  # normalised r, g and intensity
    return [hsv, lab, rgi, np.ascontiguousarray(hsv[..., 0]), intensity]


def _strategies(mode: str) -> list:
    """R-CNN's grouping strategies: colour+texture+size+fill and texture+size+fill ("fast"), plus fill+size and
    size alone ("quality"). Each gets its own objects: they hold per-region state."""
    seg = cv2.ximgproc.segmentation
    colour = seg.createSelectiveSearchSegmentationStrategyColor
    texture = seg.createSelectiveSearchSegmentationStrategyTexture
    size, fill = seg.createSelectiveSearchSegmentationStrategySize, seg.createSelectiveSearchSegmentationStrategyFill
    multiple = seg.createSelectiveSearchSegmentationStrategyMultiple
    out = [multiple(colour(), texture(), size(), fill()), multiple(texture(), size(), fill())]
    if mode == "quality":
        out += [multiple(fill(), size()), size()]
    return out


def _to_boxes(rects: np.ndarray, work_shape: tuple[int, int], original: tuple[int, int],
             config: SelectiveSearchConfig) -> np.ndarray:
    """``int32 [M, 4]`` ``x, y, w, h`` working-image rectangles -> ``float32 [N, 4]`` ``x1, y1, x2, y2`` in original
    pixels: filtered, mapped back, clipped, de-duplicated, order kept, capped at ``max_boxes``.

    Neither size filter removes a box that spans the image along that axis, so a strip thinner than the
    threshold (a 1-px-high image) keeps its full-height boxes rather than losing every box.
    """
    (h, w), (height, width) = work_shape, original
    rects = rects.reshape(-1, 4).astype(np.float64)
    keep = (rects[:, 2] >= min(config.min_side_resized, w)) & (rects[:, 3] >= min(config.min_side_resized, h))
    x, y, rw, rh = rects[keep].T
    fx, fy = width / w, height / h  # separate: thin images are stretched across
    boxes = np.stack([x * fx, y * fy, (x + rw) * fx, (y + rh) * fy], axis=1)
    np.clip(boxes, 0, [width, height, width, height], out=boxes)
    eps = 1e-6 * max(height, width)  # (x + w) * fx - x * fx is not exactly w * fx
    keep = ((boxes[:, 2] - boxes[:, 0] >= min(config.min_side, width) - eps)
            & (boxes[:, 3] - boxes[:, 1] >= min(config.min_side, height) - eps))
    boxes = boxes[keep].astype(np.float32)
    _, first = np.unique(boxes, axis=0, return_index=True)
    boxes = boxes[np.sort(first)]
    return boxes[: config.max_boxes].reshape(-1, 4)
