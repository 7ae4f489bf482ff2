"""Per-row weight and multiply-add counts of GoogLeNet, beside the figures of Table 1.

Counts are exact for the architecture as built: forward hooks record every convolution and linear layer
during one 224x224 forward pass. ``params`` counts weights only (no biases, no batch-norm), which is what
Table 1's column counts; ``params_all`` adds biases and batch-norm affine terms. ``macs`` counts one
multiply-add per weight per output position.
"""

from __future__ import annotations

import os
import time

import torch
from torch import nn

from detector.cpus import SPEED_FLAGS, cpu_flags, cpu_model, native_bf16
from detector.nets.googlenet import GoogLeNet, GoogLeNetConfig

# Table 1, one row per line: (name, [children of GoogLeNet], output HxWxC, depth, params, ops); None = blank cell.
TABLE1 = (
    ("convolution 7x7/2", ["conv1"], (112, 112, 64), 1, 2_700, 34_000_000),
    ("max pool 3x3/2", ["maxpool1", "lrn1"], (56, 56, 64), 0, None, None),
    ("convolution 3x3/1", ["conv2", "conv3", "lrn2"], (56, 56, 192), 2, 112_000, 360_000_000),
    ("max pool 3x3/2", ["maxpool2"], (28, 28, 192), 0, None, None),
    ("inception (3a)", ["inception3a"], (28, 28, 256), 2, 159_000, 128_000_000),
    ("inception (3b)", ["inception3b"], (28, 28, 480), 2, 380_000, 304_000_000),
    ("max pool 3x3/2", ["maxpool3"], (14, 14, 480), 0, None, None),
    ("inception (4a)", ["inception4a"], (14, 14, 512), 2, 364_000, 73_000_000),
    ("inception (4b)", ["inception4b"], (14, 14, 512), 2, 437_000, 88_000_000),
    ("inception (4c)", ["inception4c"], (14, 14, 512), 2, 463_000, 100_000_000),
    ("inception (4d)", ["inception4d"], (14, 14, 528), 2, 580_000, 119_000_000),
    ("inception (4e)", ["inception4e"], (14, 14, 832), 2, 840_000, 170_000_000),
    ("max pool 3x3/2", ["maxpool4"], (7, 7, 832), 0, None, None),
    ("inception (5a)", ["inception5a"], (7, 7, 832), 2, 1_072_000, 54_000_000),
    ("inception (5b)", ["inception5b"], (7, 7, 1024), 2, 1_388_000, 71_000_000),
    ("avg pool 7x7/1", ["avgpool"], (1, 1, 1024), 0, None, None),
    ("dropout (40%)", ["dropout"], (1, 1, 1024), 0, None, None),
    ("linear", ["fc"], (1, 1, 1000), 1, 1_000_000, 1_000_000),
    ("softmax", [], (1, 1, 1000), 0, None, None),
)
# Not in Table 1: the training-only side networks of section 5.
AUX_ROWS = (
    ("auxiliary head on (4a)", ["aux1"], 3),
    ("auxiliary head on (4d)", ["aux2"], 3),
)


def _counts(model: GoogLeNet, size: int) -> tuple[dict[str, dict], dict[str, tuple]]:
    """Per top-level child: weights, all parameters, multiply-adds; and each child's output shape."""
    per_child: dict[str, dict] = {name: {"params": 0, "params_all": 0, "macs": 0} for name, _ in model.named_children()}
    shapes: dict[str, tuple] = {}
    hooks = []

    def leaf_hook(child: str):
        def hook(mod: nn.Module, inputs, output) -> None:
            weight = mod.weight
            positions = output[0, 0].numel() if isinstance(mod, nn.Conv2d) else 1  # output H*W per channel
            per_child[child]["macs"] += weight.numel() * positions
        return hook

    def child_hook(child: str):
        def hook(mod: nn.Module, inputs, output) -> None:
            out = output[0] if isinstance(output, tuple) else output
            shapes[child] = tuple(out.shape[1:])
        return hook

    for child_name, child in model.named_children():
        if child is None:
            continue
        hooks.append(child.register_forward_hook(child_hook(child_name)))
        for mod in child.modules():
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                per_child[child_name]["params"] += mod.weight.numel()
                hooks.append(mod.register_forward_hook(leaf_hook(child_name)))
        per_child[child_name]["params_all"] = sum(p.numel() for p in child.parameters())
    model.train()  # so the auxiliary heads run and are counted
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size))
    finally:
        for h in hooks:
            h.remove()
    return per_child, shapes


def summarize(variant: str = "paper", size: int = 224) -> dict:
    """The ``ircnn model summary --json`` document: one row per Table 1 line, plus the aux heads."""
    model = GoogLeNet(GoogLeNetConfig(variant=variant, aux_logits=True))
    per_child, shapes = _counts(model, size)
    rows = []
    for name, children, table_out, depth, table_params, table_macs in TABLE1:
        children = [c for c in children if c in shapes]  # lrn1/lrn2 exist only in the paper variant
        out = shapes[children[-1]] if children else shapes["fc"]
        if out is not None and len(out) == 3:
            out = (out[1], out[2], out[0])  # Table 1 writes H x W x C
        elif out is not None:
            out = (1, 1, out[0])
        rows.append({
            "name": name,
            "output": list(out),
            "table_output": list(table_out),
            "depth": depth,
            "params": sum(per_child[c]["params"] for c in children),
            "params_all": sum(per_child[c]["params_all"] for c in children),
            "macs": sum(per_child[c]["macs"] for c in children),
            "table_params": table_params,
            "table_macs": table_macs,
        })
    total = {key: sum(r[key] for r in rows) for key in ("params", "params_all", "macs")}
    total["depth"] = sum(r["depth"] for r in rows)
    aux = []
    for name, children, depth in AUX_ROWS:
        aux.append({"name": name, "depth": depth, "training_only": True,
                    **{key: sum(per_child[c][key] for c in children) for key in ("params", "params_all", "macs")}})
    return {"variant": variant, "input": [size, size, 3], "rows": rows, "total": total, "auxiliary": aux,
            "table_total": {"params": sum(r["table_params"] or 0 for r in rows),
                            "macs": sum(r["table_macs"] or 0 for r in rows)}}


def _short(n: int | None, unit: str = "") -> str:
    if n is None:
        return ""
    for div, suffix, digits in ((1e9, "G", 3), (1e6, "M", 1), (1e3, "K", 1)):
        if abs(n) >= div:
            return f"{n / div:.{digits}f}{suffix}{unit}"
    return f"{n}{unit}"


def format_summary(doc: dict) -> str:
    """Table 1 as text: ours beside the paper's, with the relative difference where the paper gives a figure."""
    head = f"{'layer':<24}{'output':>14}{'depth':>6}{'params':>12}{'table':>9}{'diff':>8}{'MACs':>10}{'table':>9}{'diff':>8}"
    lines = [f"GoogLeNet ({doc['variant']} variant), {doc['input'][0]}x{doc['input'][1]} input", head, "-" * len(head)]

    def diff(ours: int, table: int | None) -> str:
        return f"{100.0 * (ours - table) / table:+.1f}%" if table else ""

    for r in doc["rows"] + [dict(r, output=None, table_params=None, table_macs=None) for r in doc["auxiliary"]]:
        out = "x".join(str(v) for v in r["output"]) if r.get("output") else "(training)"
        lines.append(f"{r['name']:<24}{out:>14}{r['depth']:>6}{r['params']:>12,}{_short(r['table_params']):>9}"
                     f"{diff(r['params'], r['table_params']):>8}{_short(r['macs']):>10}{_short(r['table_macs']):>9}"
                     f"{diff(r['macs'], r['table_macs']):>8}")
    t, tt = doc["total"], doc["table_total"]
    lines.append("-" * len(head))
    lines.append(f"{'total (inference)':<24}{'':>14}{t['depth']:>6}{t['params']:>12,}{_short(tt['params']):>9}"
                 f"{diff(t['params'], tt['params']):>8}{_short(t['macs']):>10}{_short(tt['macs']):>9}"
                 f"{diff(t['macs'], tt['macs']):>8}")
    lines.append(f"params = weights only (Table 1's convention); with biases and batch norm: {t['params_all']:,}")
    return "\n".join(lines)


def matmul_peak(dtype: torch.dtype, n: int = 2048, seconds: float = 2.0) -> float:
    """Best FLOP/s of an n x n matmul: the machine's practical peak for that dtype, which the benchmarks report
    their throughput against."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * n**3 / (time.perf_counter() - t))
    return best


def machine() -> dict:
    """Where a benchmark ran, for its output: CPU model, the flags that decide the kernels (of ``SPEED_FLAGS``:
    avx2, avx512f, avx512_bf16, amx_bf16, ...), torch's thread count, the CPUs, and the load average now."""
    flags = cpu_flags()
    return {"cpu": cpu_model(), "flags": [f for f in SPEED_FLAGS if f in flags], "native_bf16": native_bf16(),
            "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "load_average": [round(v, 2) for v in os.getloadavg()]}


def format_machine(m: dict) -> str:
    """``machine()`` as one line: ``Intel(R) Xeon(R) Processor (avx2 fma avx512f ...), 2 threads of 2 CPUs, load
    average 1.2 / 1.5 / 2.0``."""
    load = " / ".join(f"{v:.1f}" for v in m["load_average"])
    return (f"{m['cpu']} ({' '.join(m['flags']) or 'none of ' + ' '.join(SPEED_FLAGS)}), {m['threads']} threads "
            f"of {m['cpus']} CPUs, load average {load}")
