"""int8 members: post-training static quantisation with ONNX Runtime's quantiser, calibrated on the bundle's own
warped regions.

Each member's graph as the dynamo exporter writes it (``detector.runtimes.export.PixelGraph``: uint8 pixels in,
probabilities out; ``export_onnx(exporter="dynamo")``) is quantised
in the QDQ form: every convolution gets int8 weights (one scale per output channel) and uint8 activations (one
scale per tensor, the min/max seen over the calibration regions). The classifier layer (Gemm) and the softmax stay
float: a uint8 softmax would round every probability to a multiple of 1/256, and a DET score is a sum of such
probabilities. ONNX Runtime runs the result with its int8 kernels (VNNI or AMX where the CPU has them, AVX2
otherwise); OpenVINO runs the same file.

Calibration regions are what detection feeds the networks: the bundle's proposals on the calibration images
(selective search 2x, and MultiBox when the bundle has it), in priority order, warped with the bundle's context and
fill; for bundles that score context frames (``DetectConfig.whole_objects``) a quarter of them are frames.

``ircnn model quantize`` writes the models into the bundle, beside its members (``model.json`` is not changed):

    int8/member0.onnx ...   QDQ ONNX models (protobuf; nothing is unpickled)
    int8/int8.json          {"format": 1, "size": S, "members": [{"file", "sha256", "export_key"}, ...],
                             "calibration": {"images": [{"name", "sha256"}], "regions": N, "frames": F,
                                             "method": "minmax", "sha256": of the regions},
                             "onnxruntime": version}

``load_int8(bundle)`` checks each file's SHA-256 and that its ``export_key`` is that of the member as it is now
(weights, architecture, normalisation, input size), so a retrained member never runs with a stale int8 model.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from detector.bundle.format import Bundle
from detector.bundle.int8 import FORMAT, INT8_DIR, INT8_MANIFEST, Int8Error, check_one_size
from detector.files import file_sha256
from detector.progress import track
from detector.runtimes.export import export_onnx

DEFAULT_REGIONS = 300
CALIBRATION_BATCH = 20  # regions per calibration step; every step sees a full batch (the rest is dropped)
MIN_REGIONS, MAX_REGIONS = CALIBRATION_BATCH, 5000  # at least one full batch
KEEP_FLOAT = ("Gemm", "MatMul", "Softmax")  # ops left in float: the classifier and the probabilities
INSTALL_ORT = 'pip install onnxruntime (part of the plain install of inception-rcnn)'


@dataclass(frozen=True)
class Calibration:
    """The regions one quantisation is calibrated on: ``regions`` uint8 ``[N, 3, S, S]``, how many of them are
    context ``frames``, and the images they came from (``(name, sha256)`` pairs)."""

    regions: np.ndarray
    frames: int
    images: tuple[tuple[str, str], ...]

    @property
    def sha256(self) -> str:
        return hashlib.sha256(np.ascontiguousarray(self.regions).tobytes()).hexdigest()


def calibration_regions(bundle: Bundle, images: Sequence[tuple[str, np.ndarray]], regions: int = DEFAULT_REGIONS,
                        detector=None) -> Calibration:
    """About ``regions`` warped regions from ``images`` (``(name, uint8 RGB [H, W, 3])`` pairs), spread evenly
    over them, each image's best proposals first. ``detector``: a ``Detector`` for the bundle to take proposals
    and the warp from (default: one with the library defaults, closed afterwards)."""
    from detector.pipeline.detector import Detector
    from detector.pipeline.warp import warp_frames, warp_regions

    if not MIN_REGIONS <= regions <= MAX_REGIONS:
        raise ValueError(f"calibration regions must be in {MIN_REGIONS}..{MAX_REGIONS}, got {regions}")
    if not images:
        raise ValueError("calibration needs at least one image")
    check_one_size(bundle)
    own = detector is None
    detector = Detector.from_bundle(bundle) if own else detector
    try:
        scorer = detector.scorer
        # one in four a context frame, where the detector scores frames (context_frames > 0)
        frames_share = 4 if detector.whole_objects and detector.config.context_frames else 0
        out, frames, names = [], 0, []
        for i, (name, image) in enumerate(track(images, len(images), "calibration regions", "img")):
            want = regions // len(images) + (1 if i < regions % len(images) else 0)
            if want == 0:
                continue
            boxes = detector.regions(image, detector.propose(image))[:want]
            n_frames = len(boxes) // frames_share if frames_share else 0
            warped = warp_regions(image, boxes[: len(boxes) - n_frames], scorer.size, scorer.context, scorer.fill)
            parts = [warped]
            if n_frames:
                parts.append(warp_frames(image, boxes[:n_frames], scorer.size, scorer.config.frame_scale, scorer.fill))
            out.extend(np.ascontiguousarray(p.contiguous().numpy()) for p in parts)
            frames += n_frames
            names.append((str(name), hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()))
    finally:
        if own:
            detector.close()
    stacked = np.concatenate(out) if out else np.zeros((0, 3, scorer.size, scorer.size), np.uint8)
    usable = len(stacked) - len(stacked) % CALIBRATION_BATCH
    if usable < MIN_REGIONS:
        raise ValueError(f"the calibration images gave {len(stacked)} regions, too few to calibrate on: give "
                         "more (or larger, more varied) images")
    return Calibration(stacked[:usable], min(frames, usable), tuple(names))


class _Reader:
    """ONNX Runtime's calibration data reader over fixed batches of the regions."""

    def __init__(self, regions: np.ndarray, input_name: str) -> None:
        self._batches: Iterator[np.ndarray] = (regions[i:i + CALIBRATION_BATCH]
                                               for i in range(0, len(regions), CALIBRATION_BATCH))
        self.input_name = input_name

    def get_next(self) -> dict | None:
        batch = next(self._batches, None)
        return None if batch is None else {self.input_name: batch}


def quantize_model(fp32: Path, out: Path, regions: np.ndarray) -> None:
    """Quantise the exported fp32 graph ``fp32`` into ``out`` (QDQ, module docstring), calibrated on ``regions``
    (uint8 ``[N, 3, S, S]``, ``N`` a multiple of ``CALIBRATION_BATCH``)."""
    try:
        import onnx
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError:
        raise Int8Error(f"int8 quantisation needs onnxruntime and onnx: {INSTALL_ORT}") from None

    class Reader(_Reader, CalibrationDataReader):
        pass

    with tempfile.TemporaryDirectory(dir=out.parent) as tmp, warnings.catch_warnings(), \
            contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        graph = onnx.load(str(prepared))
        keep_float = [n.name for n in graph.graph.node if n.op_type in KEEP_FLOAT]
        input_name = graph.graph.input[0].name
        staged = Path(tmp) / "int8.onnx"
        quantize_static(str(prepared), str(staged), Reader(regions, input_name), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=keep_float,
                        extra_options={"CalibTensorRangeSymmetric": False})
        os.replace(staged, out)


def quantize_bundle(bundle: Bundle, calibration: Calibration) -> Path:
    """Quantise every member of ``bundle`` (saved on disk) on ``calibration`` and write ``int8/`` into it,
    replacing an older one only once all members are done. Returns the int8 directory."""
    import onnxruntime

    check_one_size(bundle)
    if bundle.path is None:
        raise ValueError("quantize a bundle loaded from disk (int8 models are written into its directory)")
    pre = bundle.preprocess
    size = calibration.regions.shape[2]
    if size != pre.size:
        raise ValueError(f"calibration regions are {size} px, the bundle's input is {pre.size} px")
    root = Path(bundle.path)
    staging = Path(tempfile.mkdtemp(dir=root, prefix=".int8-"))
    try:
        entries = []
        for i, member in enumerate(bundle.members):
            # The dynamo exporter's graph, not the TorchScript one that fp32 inference runs: that one keeps
            # EfficientNet's padding as separate Pad nodes, and quantised around them the Lite0 transfer detector
            # scored 0.375 mAP on the real photos instead of fp32's 0.500 (the dynamo graph: 0.500), same calibration
            fp32 = export_onnx(member, pre.mean, pre.std, pre.size, exporter="dynamo")
            name = f"member{i}.onnx"
            quantize_model(fp32, staging / name, calibration.regions)
            entries.append({"file": name, "sha256": file_sha256(staging / name),
                            "export_key": fp32.name.split(".")[0]})  # <export_key>.dynamo.onnx
        doc = {"format": FORMAT, "size": pre.size, "members": entries,
               "calibration": {"images": [{"name": n, "sha256": h} for n, h in calibration.images],
                               "regions": len(calibration.regions), "frames": int(calibration.frames),
                               "method": "minmax", "sha256": calibration.sha256},
               "onnxruntime": onnxruntime.__version__}
        (staging / INT8_MANIFEST).write_text(json.dumps(doc, indent=2) + "\n")
        target = root / INT8_DIR
        old = None
        if target.exists():
            old = root / f".int8-old-{os.getpid()}"
            os.replace(target, old)
        os.replace(staging, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return target
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def int8_agreement(fp32: np.ndarray, int8: np.ndarray, confident: float = 0.5) -> dict:
    """How the int8 probabilities ``[N, C]`` agree with fp32's: top-1 agreement over all regions and over those
    fp32 is at least ``confident`` about, and the mean and largest absolute probability difference."""
    fp32, int8 = np.asarray(fp32, np.float64), np.asarray(int8, np.float64)
    same = fp32.argmax(1) == int8.argmax(1)
    sure = fp32.max(1) >= confident
    return {"regions": len(fp32), "top1_agreement": float(same.mean()) if len(same) else float("nan"),
            "confident_regions": int(sure.sum()),
            "confident_top1_agreement": float(same[sure].mean()) if sure.any() else float("nan"),
            "mean_abs_diff": float(np.abs(fp32 - int8).mean()) if len(same) else float("nan"),
            "max_abs_diff": float(np.abs(fp32 - int8).max()) if len(same) else float("nan")}

