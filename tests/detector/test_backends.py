"""ONNX Runtime and OpenVINO backends against the PyTorch reference, on tiny members and random pixels.

Tolerances (absolute, on averaged softmax probabilities): fp32 1e-4 (measured ~1e-6), OpenVINO bf16 2e-2
(measured ~1e-2). A backend skips, visibly, where its runtime is not installed (the dev extra installs both).
"""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from detector.bundle.format import UNIT_RANGE_MEAN, UNIT_RANGE_STD, Preprocess
from detector.bundle.importers import merge_bundles
from detector.pipeline.classify import Classifier
from detector.pipeline.ensemble import Ensemble, EnsembleConfig
from detector.runtimes import export as onnx_export
from detector.runtimes import ov
from detector.runtimes.base import BackendError
from detector.runtimes.export import PixelGraph, export_onnx
from detector.runtimes.ort import OnnxRuntimeRuntime
from detector.runtimes.ov import OpenVinoRuntime

SIZE = 64  # small inputs keep the exports and runs fast; the graph is the same at 224
TOLERANCE = {"fp32": 1e-4, "bf16": 2e-2}
CASES = [("onnxruntime", "fp32"), ("openvino", "fp32"), ("openvino", "bf16")]


def installed(backend: str) -> bool:
    try:
        __import__(backend)
        __import__("onnxscript")
    except ImportError:
        return False
    return True


def needs(backend: str):
    return pytest.mark.skipif(not installed(backend), reason=f"{backend} (or onnxscript) not installed")


def bf16_capable() -> bool:
    return installed("openvino") and ov.openvino_supports_bf16()


def case_params():
    for backend, precision in CASES:
        marks = [needs(backend)]
        if precision == "bf16":
            marks.append(pytest.mark.skipif(not bf16_capable(), reason="CPU without AVX512_BF16/AMX"))
        yield pytest.param(backend, precision, marks=marks, id=f"{backend}-{precision}")


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("ircnn-cache")


@pytest.fixture(autouse=True)
def cache(shared_cache, monkeypatch):
    """One export cache for the module: members with the same weights are exported once across tests."""
    monkeypatch.setenv("IRCNN_CACHE_DIR", str(shared_cache))
    return shared_cache


def pixels(n: int, seed: int = 0) -> torch.Tensor:
    """Random images that differ in layout and colour (i.i.d. noise images all look alike to a network):
    ``Tensor[n, 3, SIZE, SIZE]`` uint8, a random 4x4 colour grid upsampled, plus pixel noise."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.rand(n, 3, 4, 4, generator=g) * 255
    smooth = torch.nn.functional.interpolate(grid, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    noise = torch.randn(n, 3, SIZE, SIZE, generator=g) * 20
    return (smooth + noise).round().clamp(0, 255).to(torch.uint8)


def small(bundle):
    bundle.preprocess = Preprocess(size=SIZE, mean=bundle.preprocess.mean, std=bundle.preprocess.std)
    return bundle


def test_pixel_graph_is_normalise_then_network(tiny_bundle):
    """The folded graph (scale in conv1's weights, mean subtracted from the pixels) equals normalise -> net ->
    softmax, border included: at 64 px a third of conv1's outputs touch the zero padding, where folding the mean
    into the bias would be wrong."""
    for variant in ("paper", "torchvision"):
        bundle = tiny_bundle(variant=variant)
        member, pre = bundle.members[0], bundle.preprocess
        x = pixels(4)
        mean = torch.tensor(pre.mean).view(1, 3, 1, 1)
        std = torch.tensor(pre.std).view(1, 3, 1, 1)
        with torch.inference_mode():
            want = member((x.float() / 255 - mean) / std).softmax(1)
            got = PixelGraph(member, pre.mean, pre.std)(x)
        assert (got - want).abs().max() < 1e-5
        assert want.max() > 5 / want.shape[1]  # not a near-uniform softmax, so a mismatch would show
        # the member itself is untouched
        assert torch.allclose(member((x.float() / 255 - mean) / std).softmax(1), want)


@pytest.mark.parametrize("backend,precision", list(case_params()))
@pytest.mark.parametrize("variant,members", [("paper", 1), ("torchvision", 2)])
def test_backend_matches_torch(tiny_bundle, backend, precision, variant, members):
    bundle = small(tiny_bundle(members=members, variant=variant))
    x = pixels(24)
    ref = Ensemble.from_bundle(bundle, EnsembleConfig(batch_size=8))(x)
    got = Ensemble.from_bundle(bundle, EnsembleConfig(batch_size=8, backend=backend, precision=precision))(x)
    assert got.shape == ref.shape == (24, 1000) and got.dtype == torch.float32
    # rows differ by far more than the tolerance, so a preprocessing or averaging bug cannot hide in it
    assert (ref - ref.mean(0)).abs().max() > 100 * TOLERANCE["fp32"]
    if variant == "torchvision":  # (the narrow paper variant's top-1 is the same class for every input)
        assert len(set(ref.argmax(1).tolist())) >= 3, "top-1 varies across rows, so agreement means something"
    diff = (got - ref).abs().max().item()
    assert diff < TOLERANCE[precision], f"{backend} {precision}: max |p - p_torch| = {diff:.2e}"
    agree = (got.argmax(1) == ref.argmax(1)).float().mean().item()
    assert agree >= (1.0 if precision == "fp32" else 0.75), f"top-1 agreement {agree:.2f}"
    assert torch.allclose(got.sum(1), torch.ones(24), atol=1e-3)


@pytest.mark.parametrize("backend", [pytest.param(b, marks=needs(b)) for b in ("onnxruntime", "openvino")])
def test_normalisation_mismatch_is_caught(tiny_bundle, backend):
    """Normalising with another mean and std (unit range instead of ImageNet's) moves the probabilities far
    outside the fp32 tolerance, so the comparison above fails on a backend with the wrong preprocessing."""
    bundle = small(tiny_bundle())
    x = pixels(8)
    got = Ensemble.from_bundle(bundle, EnsembleConfig(backend=backend))(x)
    ref = Ensemble.from_bundle(bundle, EnsembleConfig())(x)
    wrong = Ensemble(bundle.members, UNIT_RANGE_MEAN, UNIT_RANGE_STD, EnsembleConfig())(x)
    assert (got - ref).abs().max() < TOLERANCE["fp32"]
    assert (got - wrong).abs().max() > 100 * TOLERANCE["fp32"]
    # the mean alone (a graph that scaled but forgot to subtract it) is also caught
    no_mean = Ensemble(bundle.members, (0.0, 0.0, 0.0), bundle.preprocess.std, EnsembleConfig())(x)
    assert (got - no_mean).abs().max() > 100 * TOLERANCE["fp32"]


@needs("onnxruntime")
def test_members_of_different_sizes_run_exports_of_their_own_size(tiny_bundle):
    mixed = merge_bundles([tiny_bundle(size=SIZE), tiny_bundle(seed=1, size=SIZE + 32)])
    got = Ensemble.from_bundle(mixed, EnsembleConfig(backend="onnxruntime"))
    assert [list(r.sessions) for r in got.runners] == [[SIZE], [SIZE + 32]]  # prepared up front, each its own
    x = pixels(6)
    views = {SIZE: x, SIZE + 32: nn.functional.interpolate(x.float(), size=SIZE + 32).round().to(torch.uint8)}
    ref = Ensemble.from_bundle(mixed, EnsembleConfig()).by_size(views)
    assert (got.by_size(views) - ref).abs().max() < TOLERANCE["fp32"]
    assert [list(r.sessions) for r in got.runners] == [[SIZE], [SIZE + 32]]  # nothing exported at another size


@needs("onnxruntime")
def test_export_happens_once_per_weights_and_normalisation(tiny_bundle, cache, monkeypatch):
    bundle = small(tiny_bundle())
    member, pre = bundle.members[0], bundle.preprocess
    first = export_onnx(member, pre.mean, pre.std, SIZE)  # exported here, or by an earlier test
    assert first.parent == cache / "onnx" and first.stat().st_size > 100_000
    files = sorted((cache / "onnx").iterdir())
    x = pixels(4)
    expected = Ensemble.from_bundle(bundle, EnsembleConfig(backend="onnxruntime"))(x)

    def no_export(*args, **kwargs):
        raise AssertionError("exported again although the cache holds this member")

    monkeypatch.setattr(torch.onnx, "export", no_export)
    assert export_onnx(member, pre.mean, pre.std, SIZE) == first
    again = Ensemble.from_bundle(bundle, EnsembleConfig(backend="onnxruntime"))(x)
    assert torch.equal(again, expected)
    same_weights = small(tiny_bundle())  # another model object with the same weights: same entry
    assert export_onnx(same_weights.members[0], pre.mean, pre.std, SIZE) == first
    # other normalisation, size or weights are other entries (they would need an export)
    with pytest.raises(BackendError, match="exported again"):  # (write_onnx reports what each exporter raised)
        export_onnx(member, UNIT_RANGE_MEAN, UNIT_RANGE_STD, SIZE)
    with pytest.raises(BackendError, match="exported again"):  # (write_onnx reports what each exporter raised)
        export_onnx(member, pre.mean, pre.std, SIZE + 32)
    with torch.no_grad():
        member.fc.bias.add_(1.0)
    with pytest.raises(BackendError, match="exported again"):  # (write_onnx reports what each exporter raised)
        export_onnx(member, pre.mean, pre.std, SIZE)
    assert sorted((cache / "onnx").iterdir()) == files  # nothing written, no temporary files left


@needs("onnxruntime")
def test_members_subset_and_classifier(tiny_bundle):
    """``members=[i]`` (a cascade's stage) and the Classifier pick the backend up through EnsembleConfig."""
    bundle = small(tiny_bundle(members=2, variant="torchvision"))
    x = pixels(6)
    torch_ens = Ensemble.from_bundle(bundle, EnsembleConfig())
    ort_ens = Ensemble.from_bundle(bundle, EnsembleConfig(backend="onnxruntime"))
    first = torch_ens(x, members=[0])
    assert (ort_ens(x, members=[0]) - first).abs().max() < TOLERANCE["fp32"]
    assert (ort_ens(x, members=[1]) - first).abs().max() > 100 * TOLERANCE["fp32"]  # members differ
    both = (first + torch_ens(x, members=[1])) / 2
    assert (torch_ens(x) - both).abs().max() < 1e-6
    with pytest.raises(ValueError, match="members"):
        ort_ens(x, members=[2])
    with pytest.raises(ValueError, match="members"):
        torch_ens(x, members=[])
    photo = pixels(1, seed=3)[0].permute(1, 2, 0).numpy()
    p_torch = Classifier(bundle, EnsembleConfig()).probabilities([photo], crops=10)
    p_ort = Classifier(bundle, EnsembleConfig(backend="onnxruntime")).probabilities([photo], crops=10)
    assert (p_ort - p_torch).abs().max() < TOLERANCE["fp32"]


def test_bad_configuration_is_named(tiny_bundle, monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of"):
        EnsembleConfig(backend="tensorrt")
    with pytest.raises(ValueError, match="backend onnxruntime runs fp32 or int8; precision bf16 runs on backend torch or openvino"):
        EnsembleConfig(backend="onnxruntime", precision="bf16")
    member = tiny_bundle().members[0]
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    with pytest.raises(BackendError, match=r"inception-rcnn\[onnx\]"):
        OnnxRuntimeRuntime(member, (0.5,) * 3, (0.5,) * 3, size=SIZE)
    with pytest.raises(ValueError, match="size must be in"):
        export_onnx(member, (0.5,) * 3, (0.5,) * 3, 16)


@needs("openvino")
def test_bf16_refused_without_cpu_support(tiny_bundle, monkeypatch):
    monkeypatch.setattr(ov, "openvino_supports_bf16", lambda: False)
    bundle = small(tiny_bundle())
    with pytest.raises(BackendError, match="AVX512_BF16 or AMX"):
        Ensemble.from_bundle(bundle, EnsembleConfig(backend="openvino", precision="bf16"))
    with pytest.raises(BackendError, match="AVX512_BF16 or AMX"):  # also when nothing is exported up front
        Ensemble(bundle.members, bundle.preprocess.mean, bundle.preprocess.std,
                 EnsembleConfig(backend="openvino", precision="bf16"))


@needs("openvino")
def test_backend_rejects_bad_pixels(tiny_bundle):
    bundle = small(tiny_bundle())
    runner = OpenVinoRuntime(bundle.members[0], bundle.preprocess.mean, bundle.preprocess.std, size=SIZE)
    with pytest.raises(ValueError, match="uint8"):
        runner.run(pixels(2).float().numpy())
    with pytest.raises(ValueError, match="expected uint8"):
        Ensemble.from_bundle(bundle, EnsembleConfig(backend="openvino"))(pixels(2).float())


class _Flat(nn.Module):
    """Traces to the same graph at any batch size."""

    def forward(self, x):
        return x.float().flatten(1).softmax(dim=1)


class _Baked(nn.Module):
    """A trace keeps the height it saw (``float()`` of a size is a constant to it)."""

    def forward(self, x):
        return x.mean(dim=(2, 3)) * float(x.shape[2])


def _ort(path, x):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


@needs("onnxruntime")
def test_write_onnx_takes_the_trace_that_runs_as_the_module(tmp_path, monkeypatch):
    def no_dynamo(*args):
        raise AssertionError("the dynamo exporter ran although the trace was right")

    monkeypatch.setitem(onnx_export._EXPORT, "dynamo", no_dynamo)
    path = tmp_path / "flat.onnx"
    onnx_export.write_onnx(_Flat(), torch.zeros(2, 3, 4, 4, dtype=torch.uint8), path, ("x", "y"), {0: ("n", 1, 64)})
    for n in (1, 5):
        x = torch.randint(0, 256, (n, 3, 4, 4), dtype=torch.uint8)
        torch.testing.assert_close(_ort(path, x), _Flat()(x), atol=1e-6, rtol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flat.onnx", "flat.onnx.sha256"]  # no temporary left
    assert onnx_export.cached(path)


@needs("onnxruntime")
def test_write_onnx_falls_back_to_dynamo_when_the_trace_fails(tmp_path, monkeypatch):
    export = torch.onnx.export

    def no_torchscript(*args, dynamo, **kwargs):
        if not dynamo:
            raise RuntimeError("this torch has no TorchScript exporter")
        return export(*args, dynamo=dynamo, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", no_torchscript)
    path = tmp_path / "flat.onnx"
    onnx_export.write_onnx(_Flat(), torch.zeros(2, 3, 4, 4, dtype=torch.uint8), path, ("x", "y"), {0: ("n", 1, 64)})
    x = torch.randint(0, 256, (3, 3, 4, 4), dtype=torch.uint8)
    torch.testing.assert_close(_ort(path, x), _Flat()(x), atol=1e-6, rtol=0)


@needs("onnxruntime")
def test_write_onnx_caches_no_graph_that_keeps_a_size_it_saw(tmp_path):
    with pytest.raises(BackendError, match=r"TorchScript exporter's: the graph differs from the module by .* at "
                       r"input \(1, 3, 48, 32\); the dynamo exporter's: the graph differs"):
        onnx_export.write_onnx(_Baked(), torch.zeros(1, 3, 32, 32), tmp_path / "baked.onnx", ("x", "y"),
                            {2: ("h", 16, 256, 16)})
    assert list(tmp_path.iterdir()) == []  # nothing cached, no temporary file left


@needs("onnxruntime")
def test_dynamo_export_is_its_own_cache_entry(tiny_bundle, cache):
    """int8 quantisation asks for the dynamo exporter's graph; it is cached beside the default export, not for it."""
    bundle = small(tiny_bundle(seed=3))
    member, pre = bundle.members[0], bundle.preprocess
    default = export_onnx(member, pre.mean, pre.std, SIZE)
    dynamo = export_onnx(member, pre.mean, pre.std, SIZE, exporter="dynamo")
    assert dynamo.name == default.name.replace(".onnx", ".dynamo.onnx") and default.is_file()
    x = pixels(3)
    expected = PixelGraph(member, pre.mean, pre.std)(x)
    for path in (default, dynamo):
        torch.testing.assert_close(_ort(path, x), expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="exporter must be one of torchscript, dynamo"):
        export_onnx(member, pre.mean, pre.std, SIZE, exporter="jit")


@needs("onnxruntime")
def test_a_bad_cache_entry_is_rebuilt_never_used(tiny_bundle, tmp_path, monkeypatch):
    """An export cache file replaced by another valid model, truncated or emptied is found out by the content
    hash written with it, and exported again: the answers are this member's, and no run fails on it."""
    monkeypatch.setenv("IRCNN_CACHE_DIR", str(tmp_path))
    bundle = small(tiny_bundle())
    other = small(tiny_bundle(seed=5))
    member, pre = bundle.members[0], bundle.preprocess
    x = pixels(3)
    expected = Ensemble.from_bundle(bundle, EnsembleConfig())(x)
    path = export_onnx(member, pre.mean, pre.std, SIZE)
    foreign = export_onnx(other.members[0], pre.mean, pre.std, SIZE)
    for spoil in (lambda: path.write_bytes(foreign.read_bytes()),  # another bundle's valid graph
                  lambda: path.write_bytes(path.read_bytes()[:1000]),  # truncated
                  lambda: path.write_bytes(b"")):  # emptied
        spoil()
        for backend in ("onnxruntime", "auto"):
            got = Ensemble.from_bundle(bundle, EnsembleConfig(backend=backend))(x)
            assert (got - expected).abs().max() < 1e-4, backend
    (tmp_path / "onnx" / (path.name + ".sha256")).unlink()  # an entry without its hash (an older cache)
    assert export_onnx(member, pre.mean, pre.std, SIZE) == path and (tmp_path / "onnx" / (path.name + ".sha256")).exists()
