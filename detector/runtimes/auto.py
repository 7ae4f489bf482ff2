"""``backend="auto"``: the fastest correct runtime for one member on this machine, measured once and cached.

The candidates are the runtimes of ``detector.runtimes.RUNTIMES`` that run on the device, fp32, in each layout the
table lists (today torch in default layout and channels_last, ONNX Runtime and OpenVINO); with ``precision="bf16"`` (reduced precision allowed, not required) also torch bf16
and OpenVINO bf16, but only where bfloat16 is native: a CPU with AVX512_BF16 or AMX, or a GPU that supports it.
Elsewhere bf16 is emulated and slower than fp32, so it is never a candidate there.
A runtime that is not installed is skipped; torch is always a candidate. On a GPU only torch runs there, so only
torch configurations are candidates.

Each candidate scores the same measurement batch (``MEASURE_BATCH`` smooth random images at the member's real
input size) once to warm up and then one to ``MEASURE_BATCHES`` more times, in rounds over all candidates (so that
a busy spell of a shared machine hits them alike), within about ``MEASURE_SECONDS`` each; its speed is its best
timed batch. Its probabilities must match torch fp32 (default layout, the reference) on that batch within
``TOLERANCE`` (1e-4 fp32, as the backend tests hold them; 2e-2 bf16), or it is rejected. The fastest accepted one
is chosen (within ``TIE``, the earlier candidate). The batch is the ensemble's (at most 32), since runtimes rank
differently at other batch sizes. It is paid once per key (seconds to tens of seconds on a CPU, the docs'
benchmarks page says how long).

The choice is cached in ``cache_dir()/autobackend/<sha256>.json``, keyed by everything that decides the speed:
the member's architecture (not its weights), input size, measurement batch, precision allowance, device, CPU
model and flags, thread count and the runtimes' versions. A second call with the same key measures nothing.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from detector.cpus import cpu_flags, cpu_model, native_bf16
from detector.files import write_text_atomic
from detector.runtimes import REFERENCE as REFERENCE_RUNTIME
from detector.runtimes import RUNTIMES, installed, runtime_class
from detector.runtimes.base import cache_dir
from detector.runtimes.export import EXPORT_VERSION

AUTO_VERSION = 1  # bump when candidates or the measurement change, so old cached choices are not reused
# Images per timed batch: the ensemble's batch size, at most this. The ranking must be measured at the batch the
# ensemble runs: runtimes rank differently at other batch sizes (OpenVINO and ONNX Runtime swapped places
# between batches of 8 and 32 for EfficientNet-Lite0 on one CPU).
MEASURE_BATCH = 32
MEASURE_SECONDS = 1.5  # timed seconds per candidate, after its first timed batch (which always counts)
MEASURE_BATCHES = 3  # timed batches at most, after the warm-up, one per round: rounds go over all candidates in
# turn, so that a busy spell of a shared machine slows all of them, not the one that happened to run then
TOLERANCE = {"fp32": 1e-4, "bf16": 2e-2}  # max abs probability difference from torch fp32 on the batch
# Candidates within this fraction of the fastest count as equally fast, and the first of them in the order of
# candidates() (torch, then ONNX Runtime, then OpenVINO; fp32 before bf16) is chosen: on a shared machine two runs
# differed by 15% on the same runtime, which would otherwise flip the choice between near-equal runtimes.
TIE = 0.05
_PACKAGES = tuple(dict.fromkeys(("torch",) + tuple(p for info in RUNTIMES.values() for p in info.packages)))


@dataclass(frozen=True)
class Candidate:
    backend: str  # a name of RUNTIMES
    precision: str = "fp32"
    channels_last: bool = False  # torch only (the exported runtimes choose their own layouts)

    @property
    def name(self) -> str:
        layout = " channels_last" if self.channels_last else ""
        return f"{self.backend} {self.precision}{layout}"


REFERENCE = Candidate(REFERENCE_RUNTIME)


@dataclass(frozen=True)
class Measurement:
    candidate: Candidate
    images_per_s: float | None = None  # None: not measured (not installed, failed)
    max_diff: float | None = None  # max abs probability difference from torch fp32 on the batch
    rejected: str | None = None  # why it was not a valid choice; None: accepted


@dataclass(frozen=True)
class Choice:
    """How one member runs: the runtime, precision and layout, and why (``measurements`` empty when asked for)."""

    backend: str
    precision: str = "fp32"
    channels_last: bool = False
    reason: str = "asked for"
    measurements: tuple[Measurement, ...] = ()
    cached: bool = False  # read from the cache (no measurement now)

    @property
    def name(self) -> str:
        return Candidate(self.backend, self.precision, self.channels_last and True in RUNTIMES[self.backend].layouts).name


def bf16_native(device: torch.device) -> bool:
    """Whether bfloat16 runs natively on ``device``: AVX512_BF16 or AMX on a CPU, bf16 support on a GPU."""
    if device.type == "cuda":  # this GPU, not the current one; emulated bf16 (T4, V100) is slower than fp32
        with torch.cuda.device(device):
            return torch.cuda.is_bf16_supported(including_emulation=False)
    return native_bf16()


def candidates(precision: str, device: torch.device) -> list[Candidate]:
    """What auto measures for ``precision`` ("fp32", or "bf16": bf16 allowed) on ``device``, the reference first:
    every runtime of ``RUNTIMES`` that runs on ``device``, in each layout it lists, fp32; then, where bf16 is
    allowed and native, bf16 on those that run it (the last layout each)."""
    usable = {name: info for name, info in RUNTIMES.items() if device.type in info.devices}
    out = [Candidate(name, "fp32", layout) for name, info in usable.items() for layout in info.layouts]
    if precision == "bf16" and bf16_native(device):
        out += [Candidate(name, "bf16", info.layouts[-1]) for name, info in usable.items()
                if "bf16" in info.precisions]
    return out


def measurement_pixels(n: int, size: int, seed: int = 0) -> Tensor:
    """``Tensor[n, 3, size, size]`` uint8 images that differ in layout and colour (a random 4x4 colour grid
    upsampled, plus noise), so that probabilities differ between rows and a wrong runtime shows."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.rand(n, 3, 4, 4, generator=g) * 255
    smooth = nn.functional.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False)
    return (smooth + torch.randn(n, 3, size, size, generator=g) * 20).round().clamp(0, 255).to(torch.uint8)


def build_runner(candidate: Candidate, member: nn.Module, mean: tuple[float, ...], std: tuple[float, ...],
                 size: int, batch: int):
    """The runtime ``candidate`` names over the member: ``uint8 Tensor[n, 3, S, S] -> Tensor[n, K]``, in batches of
    ``batch``. The member is copied, so that the layout a torch candidate sets does not change the caller's."""
    runtime = runtime_class(candidate.backend)(copy.deepcopy(member).eval(), mean, std, precision=candidate.precision,
                                               size=size, channels_last=candidate.channels_last, int8_model=None)

    def run(pixels: Tensor) -> Tensor:
        return torch.cat([runtime(pixels[i:i + batch]) for i in range(0, len(pixels), batch)])

    return run


def time_batch(run, pixels: Tensor) -> float:
    """Seconds ``run`` takes for ``pixels`` (``.cpu()`` waits for a GPU)."""
    t = time.perf_counter()
    run(pixels).cpu()
    return time.perf_counter() - t


def measure(run, pixels: Tensor) -> tuple[Tensor, float]:
    """``run``'s probabilities on ``pixels`` (``Tensor[n, K]`` on the CPU) and its images/s on one timed batch,
    after one untimed warm-up batch (first-call allocations and kernel selection, which the process pays once)."""
    probs = run(pixels).float().cpu()
    return probs, pixels.shape[0] / time_batch(run, pixels)


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def choice_key(member: nn.Module, size: int, batch: int, precision: str, device: torch.device) -> dict:
    """Everything the measured choice depends on (the cache key)."""
    versions = {}
    for p in _PACKAGES:
        try:
            versions[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            versions[p] = None
    return {"version": AUTO_VERSION, "export_version": EXPORT_VERSION, "arch": member.config.to_dict(),
            "size": size, "batch": batch, "precision": precision, "device": _device_name(device),
            "cpu": cpu_model(), "flags": sorted(cpu_flags()), "threads": torch.get_num_threads(),
            "packages": versions, "candidates": [c.name for c in candidates(precision, device)]}


def _to_json(choice: Choice) -> dict:
    return dataclasses.asdict(dataclasses.replace(choice, cached=False))


def _from_json(doc: dict) -> Choice:
    measurements = tuple(Measurement(Candidate(**m["candidate"]), m["images_per_s"], m["max_diff"], m["rejected"])
                         for m in doc["measurements"])
    return Choice(doc["backend"], doc["precision"], doc["channels_last"], doc["reason"], measurements, cached=True)


def _read(path, key: dict) -> Choice | None:
    """The cached choice for ``key``; None (measure again) when absent, unreadable, written by another version,
    made for another key (a file copied or edited by hand) or naming a runtime or precision the table does not
    give."""
    try:
        with open(path) as f:
            doc = json.loads(f.read(1_000_000))
        choice = _from_json(doc["choice"])
        if doc["key"] != json.loads(json.dumps(key)) or choice.precision not in RUNTIMES[choice.backend].precisions:
            return None
        return choice
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _write(path, key: dict, choice: Choice) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps({"key": key, "choice": _to_json(choice)}, indent=1))


@contextlib.contextmanager
def _exclusive(lock_path):
    """One process at a time measures a key (Ray workers, service replicas starting together would otherwise time
    each other's load); the others wait, then read its result from the cache. No lock where fcntl is missing."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def choose_backend(member: nn.Module, mean: tuple[float, ...], std: tuple[float, ...], size: int,
                   precision: str = "fp32", batch: int = MEASURE_BATCH) -> Choice:
    """The fastest candidate (module docstring) for ``member`` at ``size`` x ``size`` input, from the cache or
    measured now (a few seconds per candidate) and cached. ``precision="bf16"`` allows bf16 candidates.
    ``batch``: images per measured batch (the ensemble's batch size, at most ``MEASURE_BATCH``)."""
    if precision not in TOLERANCE:
        raise ValueError(f"precision must be one of {', '.join(TOLERANCE)}, got {precision!r}")
    batch = max(1, min(batch, MEASURE_BATCH))
    device = next(member.parameters()).device
    key = choice_key(member, size, batch, precision, device)
    path = cache_dir() / "autobackend" / (hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
                                          + ".json")
    cached = _read(path, key)
    if cached is not None:
        return cached
    with _exclusive(path.with_suffix(".lock")):
        cached = _read(path, key)  # measured by another process while this one waited
        if cached is not None:
            return cached
        choice = _measure_candidates(member, mean, std, size, precision, batch, device)
        _write(path, key, choice)
    return choice


def _measure_candidates(member: nn.Module, mean: tuple[float, ...], std: tuple[float, ...], size: int,
                        precision: str, batch: int, device: torch.device) -> Choice:
    with _no_tf32():
        return _measure(member, mean, std, size, precision, batch, device)


@contextlib.contextmanager
def _no_tf32():
    """fp32 as fp32 on GPUs while the candidates are compared: cuDNN's TF32 convolutions (on by default on Ampere
    and newer) differ from fp32 by about 1e-3, which would fail the 1e-4 agreement for reasons of the reference."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def _measure(member: nn.Module, mean: tuple[float, ...], std: tuple[float, ...], size: int, precision: str,
             batch: int, device: torch.device) -> Choice:
    pixels = measurement_pixels(batch, size)
    found: dict[Candidate, Measurement] = {}
    runs, seconds = {}, {}  # the correct candidates' runners, and their best and total timed seconds
    reference = None
    for candidate in candidates(precision, device):  # build, warm up, check against torch, time one batch
        if not installed(candidate.backend):
            found[candidate] = Measurement(candidate, rejected="not installed")
            continue
        try:
            run = build_runner(candidate, member, mean, std, size, batch)
            probs, speed = measure(run, pixels)
        except Exception as e:  # an export or runtime that fails here is not a choice; the reference must work
            if candidate == REFERENCE:
                raise
            found[candidate] = Measurement(candidate, rejected=f"failed: {type(e).__name__}: {str(e)[:200]}")
            continue
        if reference is None:
            reference = probs
        diff = float((probs - reference).abs().max())
        tolerance = TOLERANCE[candidate.precision]
        if not diff <= tolerance:  # NaN fails too
            found[candidate] = Measurement(candidate, speed, diff,
                                           f"differs from torch fp32 by {diff:.1e} > {tolerance:g}")
            continue
        found[candidate] = Measurement(candidate, speed, diff)
        runs[candidate] = run
        seconds[candidate] = [batch / speed, batch / speed]
    for _ in range(MEASURE_BATCHES - 1):  # more rounds, interleaved, within each candidate's time budget
        for candidate, run in runs.items():
            if seconds[candidate][1] < MEASURE_SECONDS:
                took = time_batch(run, pixels)
                seconds[candidate] = [min(seconds[candidate][0], took), seconds[candidate][1] + took]
    for candidate in runs:
        found[candidate] = dataclasses.replace(found[candidate], images_per_s=batch / seconds[candidate][0])
    runs.clear()  # the runtimes' threads and memory go now
    measurements = list(found.values())
    accepted = [m for m in measurements if m.rejected is None]
    fastest = max(m.images_per_s for m in accepted)
    best = next(m for m in accepted if m.images_per_s >= (1 - TIE) * fastest)
    base = measurements[0].images_per_s
    tie = "" if best.images_per_s == fastest else f" (within {TIE:.0%} of the fastest, {fastest:.1f}: a tie)"
    reason = (f"fastest of {len(accepted)} correct candidates{tie}: {best.images_per_s:.1f} images/s, "
              f"{best.images_per_s / base:.2f}x torch fp32 ({base:.1f} images/s), batch {batch} of {size} px, "
              f"{torch.get_num_threads()} threads")
    c = best.candidate
    return Choice(c.backend, c.precision, c.channels_last, reason, tuple(measurements))


def format_choice(label: str, choice: Choice) -> str:
    """Human lines: what was chosen for ``label`` and every candidate's figures."""
    source = " (cached)" if choice.cached else ""
    lines = [f"{label}: {choice.name}{source}", f"  {choice.reason}"]
    for m in choice.measurements:
        mark = "*" if m.candidate.name == choice.name else " "
        if m.images_per_s is None:
            lines.append(f"  {mark} {m.candidate.name:<26} {'-':>8}            {m.rejected}")
            continue
        status = m.rejected or "ok"
        lines.append(f"  {mark} {m.candidate.name:<26} {m.images_per_s:8.1f} images/s  max diff {m.max_diff:.1e}"
                     f"  {status}")
    return "\n".join(lines)
