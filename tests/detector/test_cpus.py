"""Default worker counts follow the cores this process may use, so that a 2-core machine gets no DataLoader
warnings about more workers than cores."""

import os

import pytest

from detector.cpus import default_workers


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="no CPU affinity on this OS")
def test_default_workers_follow_the_cores_this_process_may_use(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})  # taskset -c 0,1 on a 64-core host
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert default_workers(4) == 2 and default_workers(2) == 2 and default_workers(1) == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3})
    assert default_workers(4) == 1


def test_training_defaults_never_ask_for_more_workers_than_cores():
    from detector.training.classifier import ClassifierTrainConfig
    from detector.training.detector import DetectorTrainConfig
    from detector.training.multibox import MultiBoxTrainConfig
    from service.cli import build_parser

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    configs = [ClassifierTrainConfig(data="d", out="o"), DetectorTrainConfig(data="d", out="o"),
               MultiBoxTrainConfig(data="d", out="o")]
    assert all(1 <= c.run.workers <= cores for c in configs)
    parser = build_parser()
    for what in ("classifier", "detector", "multibox"):
        args = parser.parse_args(["train", what, "--data", "d", "--out", "o"])
        assert 1 <= args.workers <= cores


def test_machine_names_the_cpu_its_speed_flags_threads_and_load(monkeypatch):
    from detector import cpus
    from detector.nets import summary

    m = summary.machine()
    assert m["cpu"] and m["threads"] >= 1 and len(m["load_average"]) == 3
    assert set(m["flags"]) <= set(cpus.SPEED_FLAGS)
    monkeypatch.setattr(cpus, "_cpuinfo", lambda: ("AMD EPYC 7B13", frozenset({"avx2", "fma", "sse2"})))
    assert not cpus.native_bf16()  # AVX2 only: bf16 would be emulated
    m = summary.machine()
    assert m["cpu"] == "AMD EPYC 7B13" and m["flags"] == ["avx2", "fma"] and m["native_bf16"] is False
    line = summary.format_machine(m)
    assert line.startswith("AMD EPYC 7B13 (avx2 fma), ") and "load average" in line
    monkeypatch.setattr(cpus, "_cpuinfo", lambda: ("Xeon", frozenset({"avx2", "avx512f", "amx_bf16"})))
    assert cpus.native_bf16()
