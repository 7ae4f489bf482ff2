"""A runtime is one module plus one line in ``detector.runtimes.RUNTIMES``: a test double, added to the table and
nowhere else, reaches every caller (the config's checks, the CLI's choices, the service's settings, the ensemble
and ``backend="auto"``)."""

from __future__ import annotations

import pytest
import torch

from detector.config import EnsembleConfig
from detector.pipeline.ensemble import Ensemble
from detector.runtimes import RUNTIMES, RuntimeInfo, runtime_class
from detector.runtimes.auto import Candidate, candidates, measurement_pixels
from detector.runtimes.eager import TorchRuntime

SIZE = 64


class DoubleRuntime:
    """The interface of ``detector.runtimes.base.Runtime``: the member run by torch, each call counted."""

    calls = 0

    def __init__(self, member, mean, std, *, precision, size, channels_last, int8_model):
        self.inner = TorchRuntime(member, mean, std, precision=precision)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        DoubleRuntime.calls += 1
        return self.inner(pixels)


@pytest.fixture
def double(monkeypatch):
    monkeypatch.setitem(RUNTIMES, "double", RuntimeInfo(__name__, "DoubleRuntime", ("fp32",)))
    DoubleRuntime.calls = 0
    return "double"


def test_a_new_runtime_is_one_table_line(double, tiny_bundle):
    from service.cli import build_parser
    from service.settings import Settings

    assert runtime_class(double) is DoubleRuntime
    with pytest.raises(ValueError, match="backend double runs fp32; precision bf16 runs on backend torch or openvino"):
        EnsembleConfig(backend=double, precision="bf16")
    args = build_parser().parse_args(["detect", "x.jpg", "--backend", double])  # the CLI offers it
    assert args.backend == double and double in build_parser().format_help() + str(args)
    assert Settings(backend=double).backend == double  # IRCNN_BACKEND takes it
    assert Candidate(double) in candidates("fp32", torch.device("cpu"))  # auto measures it

    bundle = tiny_bundle(members=2)
    pre = bundle.preprocess
    ensemble = Ensemble(bundle.members, pre.mean, pre.std, EnsembleConfig(backend=double, batch_size=4), size=SIZE)
    assert all(isinstance(r, DoubleRuntime) for r in ensemble.runners)
    x = measurement_pixels(6, SIZE, seed=1)
    reference = Ensemble(bundle.members, pre.mean, pre.std, EnsembleConfig())(x)
    assert (ensemble(x) - reference).abs().max() < 1e-5
    assert DoubleRuntime.calls == 2 * 2  # two members, two batches of at most 4


def test_unknown_runtimes_are_refused_everywhere():
    from service.settings import Settings

    with pytest.raises(ValueError, match="backend must be one of auto, torch, onnxruntime, openvino"):
        EnsembleConfig(backend="tensorrt")
    with pytest.raises(ValueError, match="IRCNN_BACKEND must be one of"):
        Settings(backend="tensorrt")
    with pytest.raises(ValueError, match="got 'tensorrt'"):
        runtime_class("tensorrt")


def test_a_runtime_never_runs_silently_on_another_device_than_the_members(tiny_bundle, monkeypatch):
    """Members on one device and a runtime that runs on another (ONNX Runtime's CPU build with members on a GPU)
    would move every batch there and back unannounced: refused, saying what to use. Shown here the other way
    round, with a runtime that the table says runs on cuda only and members on the CPU."""
    from detector.runtimes.base import BackendError

    info = RUNTIMES["onnxruntime"]
    monkeypatch.setitem(RUNTIMES, "onnxruntime", RuntimeInfo(info.module, info.cls, info.precisions, info.packages,
                                                              info.install, devices=("cuda",)))
    bundle = tiny_bundle()
    pre = bundle.preprocess
    with pytest.raises(BackendError, match="backend onnxruntime \\(fp32\\) runs on cuda, and the members are on cpu"):
        Ensemble(bundle.members, pre.mean, pre.std, EnsembleConfig(backend="onnxruntime"), size=SIZE)


def test_a_gpu_this_machine_lacks_is_a_clear_error(tmp_path, tiny_bundle, monkeypatch):
    from detector.bundle.format import load_bundle, save_bundle
    from detector.config import DetectConfig
    from service.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    save_bundle(tmp_path / "m", tiny_bundle(width=0.125, task="det200-from-cls1000"))
    with pytest.raises(ValueError, match="device cuda asked for, but this machine has no usable CUDA GPU"):
        load_bundle(tmp_path / "m", device="cuda")
    with pytest.raises(ValueError, match="device must be cpu or cuda"):
        load_bundle(tmp_path / "m", device="tpu")
    (tmp_path / "a.jpg").write_bytes(b"")
    assert main(["detect", str(tmp_path / "a.jpg"), "--model", str(tmp_path / "m"), "--device", "cuda"]) == 2
    assert main(["classify", str(tmp_path / "a.jpg"), "--model", str(tmp_path / "m"), "--device", "cuda"]) == 2
    with pytest.raises(ValueError, match="shared-trunk scoring has no int8 models"):
        DetectConfig(scoring="shared-trunk", ensemble=EnsembleConfig(precision="int8", backend="onnxruntime"))
