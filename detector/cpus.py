"""What this machine's CPU is: its model name and instruction-set flags, and how many cores this process may use.

The flags decide which kernels the runtimes pick (AVX2, AVX-512, AVX512_BF16, AMX), so speed figures and the
cached backend choices (``detector/runtimes/auto.py``) are keyed on them; ``detector.nets.summary.machine`` prints them
beside every benchmark.
"""

from __future__ import annotations

import functools
import os
import platform

# the flags that change which kernels fp32 / bf16 / int8 inference runs (printed beside benchmark figures)
SPEED_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "avx_vnni")


@functools.cache
def _cpuinfo() -> tuple[str, frozenset[str]]:
    name, flags = "", frozenset()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not name:
                    name = value.strip()
                elif key in ("flags", "Features") and not flags:  # x86, arm64
                    flags = frozenset(value.split())
                if name and flags:
                    break
    except OSError:  # macOS, Windows: no flags known
        pass
    return name or platform.processor() or platform.machine() or "unknown CPU", flags


def cpu_model() -> str:
    """The CPU's model name, e.g. ``Intel(R) Xeon(R) Processor`` or ``AMD EPYC 7B13``."""
    return _cpuinfo()[0]


def cpu_flags() -> frozenset[str]:
    """All instruction-set flags the kernel reports (``/proc/cpuinfo``); empty where it cannot be read."""
    return _cpuinfo()[1]


def native_bf16() -> bool:
    """Whether the CPU computes bfloat16 natively (AVX512_BF16 or AMX). Elsewhere bf16 is emulated, and slower than
    fp32 (the docs' benchmarks page has the figures)."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def default_workers(most: int) -> int:
    """One worker process per core this process may use, at most ``most`` (and at least 1).

    ``os.sched_getaffinity`` counts the cores a CPU set (taskset, a container's cpuset) leaves, which
    ``os.cpu_count`` does not; PyTorch's DataLoader warns once per worker when given more workers than that.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    return max(1, min(most, cores))
