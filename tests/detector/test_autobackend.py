"""``backend="auto"``: the measured choice, its cache, the torch check and the bf16 rule.

Most tests replace the runners and the timer with fakes (``build_runner``, ``measure``), so that they decide which
candidate is fastest or wrong; no test depends on how fast anything actually ran here. One test runs the real
measurement on a tiny member and holds the resulting ensemble to torch.
"""

from __future__ import annotations

import json

import pytest
import torch

from detector.bundle.format import Preprocess
from detector.bundle.importers import merge_bundles
from detector.pipeline import ensemble
from detector.pipeline.ensemble import Ensemble, EnsembleConfig
from detector.runtimes import auto as autobackend
from detector.runtimes.auto import REFERENCE, Candidate, Choice, choose_backend

SIZE = 64


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("IRCNN_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def member(tiny_bundle):
    bundle = tiny_bundle(variant="torchvision")
    return bundle.members[0], bundle.preprocess


class Fakes:
    """Runners that are just their candidate, and a ``measure`` that answers from ``speed`` and ``offset``:
    probabilities = a fixed softmax + ``offset[candidate name]``."""

    def __init__(self, speed: dict[str, float], offset: dict[str, float] | None = None) -> None:
        self.speed, self.offset = speed, offset or {}
        self.measured: list[str] = []
        self.timed: list[str] = []
        self.batches: set[int] = set()
        self.probs = torch.softmax(torch.randn(8, 1000, generator=torch.Generator().manual_seed(0)), 1)

    def build_runner(self, candidate, member, mean, std, size, batch):
        return candidate

    def measure(self, candidate, pixels):
        self.measured.append(candidate.name)
        self.batches.add(pixels.shape[0])
        return self.probs + self.offset.get(candidate.name, 0.0), self.speed.get(candidate.name, 1.0)

    def time_batch(self, candidate, pixels):
        self.timed.append(candidate.name)
        return pixels.shape[0] / self.speed.get(candidate.name, 1.0)

    def install(self, monkeypatch) -> Fakes:
        monkeypatch.setattr(autobackend, "build_runner", self.build_runner)
        monkeypatch.setattr(autobackend, "measure", self.measure)
        monkeypatch.setattr(autobackend, "time_batch", self.time_batch)
        monkeypatch.setattr(autobackend, "installed", lambda backend: True)
        return self


def test_fastest_correct_candidate_is_chosen_then_reused_from_the_cache(member, cache, monkeypatch):
    net, pre = member
    fakes = Fakes({"torch fp32": 5.0, "torch fp32 channels_last": 7.5, "onnxruntime fp32": 21.4,
                   "openvino fp32": 12.3}).install(monkeypatch)
    first = choose_backend(net, pre.mean, pre.std, SIZE, batch=8)
    assert (first.backend, first.precision, first.channels_last, first.cached) == ("onnxruntime", "fp32", False,
                                                                                   False)
    assert fakes.measured == ["torch fp32", "torch fp32 channels_last", "onnxruntime fp32", "openvino fp32"]
    # two more rounds, interleaved (a busy spell slows every candidate), within each one's 1.5 s: torch fp32's
    # 8-image batch at 5 images/s took 1.6 s, its whole budget; channels_last's 1.07 s left room for one more
    assert fakes.timed == ["torch fp32 channels_last", "onnxruntime fp32", "openvino fp32",
                           "onnxruntime fp32", "openvino fp32"]
    assert "21.4 images/s" in first.reason and "4.28x torch fp32" in first.reason and "batch 8 of" in first.reason
    assert [m.images_per_s for m in first.measurements] == [5.0, 7.5, 21.4, 12.3]
    files = list((cache / "autobackend").glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["key"]["size"] == SIZE

    def no_measuring(*args, **kwargs):
        raise AssertionError("measured again although the choice is cached")

    monkeypatch.setattr(autobackend, "measure", no_measuring)
    monkeypatch.setattr(autobackend, "build_runner", no_measuring)
    monkeypatch.setattr(autobackend, "time_batch", no_measuring)
    again = choose_backend(net, pre.mean, pre.std, SIZE, batch=8)
    assert again.cached and again.name == first.name and again.measurements == first.measurements
    # another input size, thread count or precision allowance is another machine state: measured anew
    for call in (lambda: choose_backend(net, pre.mean, pre.std, SIZE + 32),
                 lambda: choose_backend(net, pre.mean, pre.std, SIZE, precision="bf16")):
        with pytest.raises(AssertionError, match="measured again"):
            call()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        with pytest.raises(AssertionError, match="measured again"):
            choose_backend(net, pre.mean, pre.std, SIZE, batch=8)
    finally:
        torch.set_num_threads(threads)
    # an unreadable cache entry is measured again, not trusted
    files[0].write_text("{not json")
    with pytest.raises(AssertionError, match="measured again"):
        choose_backend(net, pre.mean, pre.std, SIZE, batch=8)


def test_a_candidate_that_disagrees_with_torch_is_rejected(member, monkeypatch):
    net, pre = member
    Fakes({"torch fp32": 5.0, "torch fp32 channels_last": 7.5, "onnxruntime fp32": 21.4, "openvino fp32": 12.3},
          offset={"onnxruntime fp32": 3e-4}).install(monkeypatch)
    choice = choose_backend(net, pre.mean, pre.std, SIZE)
    assert choice.name == "openvino fp32"  # the fastest is wrong, the next fastest right one is chosen
    rejected = {m.candidate.name: m.rejected for m in choice.measurements if m.rejected}
    assert list(rejected) == ["onnxruntime fp32"] and "differs from torch fp32 by 3.0e-04 > 0.0001" in rejected[
        "onnxruntime fp32"]
    # near-equal speeds (within 5%) are a tie, and the earlier candidate wins, so that noise does not flip choices
    Fakes({"torch fp32": 5.0, "onnxruntime fp32": 21.4, "openvino fp32": 22.0}).install(monkeypatch)
    tie = choose_backend(net, pre.mean, pre.std, SIZE + 64)
    assert tie.name == "onnxruntime fp32" and "a tie" in tie.reason
    # NaN never passes, whatever its speed
    Fakes({"torch fp32 channels_last": 100.0}, offset={"torch fp32 channels_last": float("nan")}).install(monkeypatch)
    assert choose_backend(net, pre.mean, pre.std, SIZE + 32).name == "torch fp32"


def test_measured_at_the_ensembles_batch_size_at_most_32(member, monkeypatch):
    """Runtimes rank differently at other batch sizes (OpenVINO ran 2x faster per image in batches of 8 than of
    32 here), so the measurement uses the batch the ensemble will run."""
    net, pre = member
    fakes = Fakes({}).install(monkeypatch)
    choose_backend(net, pre.mean, pre.std, SIZE, batch=16)
    assert fakes.batches == {16}
    fakes.batches.clear()
    choose_backend(net, pre.mean, pre.std, SIZE, batch=256)
    assert fakes.batches == {32}


def test_a_failing_or_missing_runtime_is_skipped_and_torch_remains(member, monkeypatch):
    net, pre = member
    fakes = Fakes({"onnxruntime fp32": 50.0, "openvino fp32": 40.0}).install(monkeypatch)
    monkeypatch.setattr(autobackend, "installed", lambda backend: backend != "openvino")

    def broken(candidate, *args):
        if candidate.backend == "onnxruntime":
            raise RuntimeError("export failed")
        return candidate

    monkeypatch.setattr(autobackend, "build_runner", broken)
    choice = choose_backend(net, pre.mean, pre.std, SIZE)
    assert choice.backend == "torch" and "openvino fp32" not in fakes.measured
    why = {m.candidate.name: m.rejected for m in choice.measurements}
    assert why["openvino fp32"] == "not installed" and "export failed" in why["onnxruntime fp32"]
    assert "not installed" in autobackend.format_choice("x", choice)


def test_bf16_only_where_native_and_only_when_allowed(member, monkeypatch):
    net, pre = member
    speeds = {"torch fp32": 5.0, "onnxruntime fp32": 20.0, "torch bf16 channels_last": 90.0, "openvino bf16": 200.0}
    fakes = Fakes(speeds, offset={"torch bf16 channels_last": 1e-2, "openvino bf16": 1e-2}).install(monkeypatch)
    monkeypatch.setattr(autobackend, "native_bf16", lambda: False)  # an AVX2-only CPU
    choice = choose_backend(net, pre.mean, pre.std, SIZE, precision="bf16")
    assert choice.precision == "fp32" and choice.backend == "onnxruntime"
    assert not any("bf16" in name for name in fakes.measured)
    monkeypatch.setattr(autobackend, "native_bf16", lambda: True)  # AVX512_BF16 / AMX
    fakes.measured.clear()
    assert choose_backend(net, pre.mean, pre.std, SIZE).precision == "fp32"  # fp32 asked for: fp32 only
    assert not any("bf16" in name for name in fakes.measured)
    choice = choose_backend(net, pre.mean, pre.std, SIZE, precision="bf16")  # bf16 allowed, native: measured
    assert choice.name == "openvino bf16" and "bf16" in " ".join(fakes.measured)
    # bf16 is held to torch fp32 within 2e-2, not 1e-4
    Fakes(speeds, offset={"torch bf16 channels_last": 3e-2, "openvino bf16": 3e-2}).install(monkeypatch)
    assert choose_backend(net, pre.mean, pre.std, SIZE + 32, precision="bf16").name == "onnxruntime fp32"


def test_candidates_on_a_gpu_are_torch_only():
    names = [c.name for c in autobackend.candidates("fp32", torch.device("cuda"))]
    assert names == ["torch fp32", "torch fp32 channels_last"]
    assert autobackend.candidates("fp32", torch.device("cpu"))[0] == REFERENCE


def test_auto_ensemble_runs_each_member_on_its_measured_choice(tiny_bundle, monkeypatch):
    """The real measurement on a tiny member: the auto ensemble's probabilities are torch's (fp32, 1e-4), every
    member of one architecture shares one measurement, and the second ensemble measures nothing."""
    bundle = tiny_bundle(members=2, variant="torchvision")
    bundle.preprocess = Preprocess(size=SIZE, mean=bundle.preprocess.mean, std=bundle.preprocess.std)
    x = autobackend.measurement_pixels(12, SIZE, seed=1)
    built = []
    real_build = autobackend.build_runner
    monkeypatch.setattr(autobackend, "build_runner", lambda c, *a: built.append(c.name) or real_build(c, *a))
    auto = Ensemble.from_bundle(bundle, EnsembleConfig(batch_size=8, backend="auto"))
    reference = Ensemble.from_bundle(bundle, EnsembleConfig(batch_size=8))(x)
    assert len(auto.choices) == 2 and auto.choices[0].name == auto.choices[1].name
    assert built[0] == "torch fp32" and len(built) == len(set(built))  # one measurement per candidate, not per member
    assert (auto(x) - reference).abs().max() < 1e-4
    assert (reference - reference.mean(0)).abs().max() > 1e-2  # rows differ: agreement means something
    # each member runs on what was chosen for it, not on whatever agrees with torch
    assert [(r.name, r.precision) for r in auto.runners] == [(c.backend, c.precision) for c in auto.choices]
    forced = Ensemble.from_bundle(bundle, EnsembleConfig(batch_size=8, backend="onnxruntime"))
    assert [r.name for r in forced.runners] == ["onnxruntime", "onnxruntime"]
    built.clear()
    again = Ensemble.from_bundle(bundle, EnsembleConfig(batch_size=8, backend="auto"))
    assert built == [] and all(c.cached for c in again.choices)
    assert (again(x) - reference).abs().max() < 1e-4


def test_each_member_is_measured_at_its_own_input_size(tiny_bundle, monkeypatch):
    mixed = merge_bundles([tiny_bundle(width=0.125, size=SIZE), tiny_bundle(width=0.125, size=SIZE + 32, seed=1)])
    sizes = []
    monkeypatch.setattr(ensemble, "choose_backend", lambda member, mean, std, size, *args: sizes.append(size)
                        or Choice("torch"))
    Ensemble.from_bundle(mixed, EnsembleConfig(backend="auto"))
    assert sizes == [SIZE, SIZE + 32]


@pytest.mark.skipif(not autobackend.installed("onnxruntime"), reason="onnxruntime (or onnxscript) not installed")
def test_mixed_choices_are_averaged_like_torch(tiny_bundle, monkeypatch):
    """Members on different runtimes and layouts in one ensemble (what auto gives a mixed-architecture bundle)
    still average to torch's probabilities."""
    bundle = tiny_bundle(members=2, variant="torchvision")
    picks = iter([Choice("torch", channels_last=True), Choice("onnxruntime")])
    monkeypatch.setattr(ensemble, "choose_backend", lambda *args: next(picks))
    pre = bundle.preprocess
    mixed = Ensemble(bundle.members, pre.mean, pre.std, EnsembleConfig(backend="auto"), size=SIZE)
    assert [c.name for c in mixed.choices] == ["torch fp32 channels_last", "onnxruntime fp32"]
    assert [type(r).__name__ for r in mixed.runners] == ["TorchRuntime", "OnnxRuntimeRuntime"]
    x = autobackend.measurement_pixels(6, SIZE, seed=2)
    reference = Ensemble(bundle.members, pre.mean, pre.std, EnsembleConfig())(x)
    assert (mixed(x) - reference).abs().max() < 1e-4
    assert (mixed(x, members=[1]) - Ensemble(bundle.members, pre.mean, pre.std)(x, members=[1])).abs().max() < 1e-4
    with pytest.raises(ValueError, match="pass size"):
        Ensemble(bundle.members, pre.mean, pre.std, EnsembleConfig(backend="auto"))
    assert Candidate("torch", channels_last=True).name == "torch fp32 channels_last"


def test_processes_starting_together_measure_once(member, monkeypatch):
    """Two callers at once (Ray workers, service replicas): one measures, the other waits for its result instead
    of timing the candidates while they run beside it."""
    import threading
    import time

    net, pre = member
    fakes = Fakes({"onnxruntime fp32": 20.0}).install(monkeypatch)
    slow_measure = fakes.measure

    def measure(candidate, pixels):
        time.sleep(0.05)
        return slow_measure(candidate, pixels)

    monkeypatch.setattr(autobackend, "measure", measure)
    results = []
    threads = [threading.Thread(target=lambda: results.append(choose_backend(net, pre.mean, pre.std, SIZE)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(fakes.measured) == 4  # one set of candidates, not two
    assert sorted(r.cached for r in results) == [False, True] and {r.name for r in results} == {"onnxruntime fp32"}


def test_a_cached_choice_for_another_key_or_runtime_is_measured_again(member, cache, monkeypatch):
    """A choice file copied from another key, or edited to name a runtime or precision the table does not give,
    is not trusted: the member is measured again."""
    net, pre = member
    fakes = Fakes({"onnxruntime fp32": 9.0}).install(monkeypatch)
    first = choose_backend(net, pre.mean, pre.std, SIZE, batch=8)
    (file,) = (cache / "autobackend").glob("*.json")
    doc = json.loads(file.read_text())
    for spoil in (lambda d: d["key"].update(size=SIZE + 1), lambda d: d["choice"].update(backend="tensorrt"),
                  lambda d: d["choice"].update(backend="onnxruntime", precision="bf16")):
        spoiled = json.loads(json.dumps(doc))
        spoil(spoiled)
        file.write_text(json.dumps(spoiled))
        fakes.measured.clear()
        again = choose_backend(net, pre.mean, pre.std, SIZE, batch=8)
        assert fakes.measured and not again.cached and again.name == first.name


def test_bf16_counts_as_native_only_without_emulation_on_the_gpu_in_use(monkeypatch):
    """torch.cuda.is_bf16_supported() is True on GPUs that only emulate bf16 (T4, V100), where it is slower than
    fp32, and it asks about the current device: auto asks about the device in use, emulation excluded."""
    import contextlib

    asked = []
    monkeypatch.setattr(torch.cuda, "device", lambda d: asked.append(str(d)) or contextlib.nullcontext())
    # a GPU that emulates bf16: supported with emulation counted, not without
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert autobackend.bf16_native(torch.device("cuda:1")) is False and asked == ["cuda:1"]


def test_candidates_are_compared_in_true_fp32(monkeypatch):
    """cuDNN's TF32 (on by default on Ampere and newer) would make the fp32 reference miss the 1e-4 agreement:
    off while auto measures, as it was afterwards."""
    seen = []
    monkeypatch.setattr(autobackend, "_measure", lambda *a: seen.append(
        (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)) or "choice")
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = True
    try:
        assert autobackend._measure_candidates(None, (0.5,) * 3, (0.5,) * 3, SIZE, "fp32", 8, None) == "choice"
        assert seen == [(False, False)] and torch.backends.cudnn.allow_tf32 is True
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
