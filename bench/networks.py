"""Network throughput: images/s of one full-width GoogLeNet (random weights; or ``--model``'s first member) at
batch 32, per runtime, and what ``--backend auto`` picks here.

Rows: PyTorch eager (default layout fp32, channels_last fp32, channels_last bf16 autocast), ``torch.compile``
(inductor with freezing, channels_last bf16), and the exported backends of ``detector/runtimes/export.py`` (ONNX Runtime
fp32, OpenVINO fp32 and bf16) where installed, and ``auto`` (``detector/runtimes/auto.py``: its pick, measured once and
cached; its first setup includes that measurement). Every row runs through ``Ensemble`` (uint8 in, normalisation,
softmax), as region scoring does, except ``torch.compile``, which compiles the same normalise -> net -> softmax
graph (``PixelGraph``) directly. Each row also gives its fraction of the machine's measured matmul peak
(GoogLeNet's exact multiply-adds x 2 per image, from ``detector.nets.summary``) and its largest probability
difference from the fp32 eager reference on the same batch.

On a machine shared with other processes, one timing is noise: every configuration is timed ``--repeats`` times
(default 3), interleaved round-robin so that a busy minute hits all rows alike, and the best is reported. Each
timing runs in a fresh process, so that no other runtime's thread pool (OpenMP, TBB) is alive beside it.

    python bench/networks.py                    # the table (about 10 minutes on 2 cores, the compile included)
    python bench/networks.py --no-compile       # without torch.compile (its compile takes minutes)
    python bench/networks.py --json
    python bench/networks.py --no-compile --model models/lite0   # a bundle's first member (EfficientNet-Lite0)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch
from torch import nn

from detector.bundle.format import init_bundle, load_bundle
from detector.nets.googlenet import GoogLeNetConfig
from detector.nets.members import describe_arch
from detector.nets.summary import format_machine, machine, matmul_peak, summarize
from detector.pipeline.ensemble import Ensemble, EnsembleConfig
from detector.runtimes.export import PixelGraph

CONFIGS = {
    "torch fp32 (default layout)": EnsembleConfig(channels_last=False),
    "torch fp32 channels_last": EnsembleConfig(),
    "torch bf16 channels_last": EnsembleConfig(precision="bf16"),
    "onnxruntime fp32": EnsembleConfig(backend="onnxruntime"),
    "openvino fp32": EnsembleConfig(backend="openvino"),
    "openvino bf16": EnsembleConfig(backend="openvino", precision="bf16"),
    "auto (fp32)": EnsembleConfig(backend="auto"),
}
COMPILED = "torch.compile bf16 channels_last (freezing)"


def network_bundle(model: str | None = None):
    """``model``'s first member, or one full-width torchvision-variant member, random weights with a spread
    (Kaiming) so that outputs differ between inputs; seeded, so every process builds the same weights (and finds
    the same cached export)."""
    if model is not None:
        bundle = load_bundle(model)
        bundle.members = bundle.members[:1]
        return bundle
    torch.manual_seed(0)
    bundle = init_bundle(GoogLeNetConfig(variant="torchvision", aux_logits=False))
    for m in bundle.members[0].modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight)
    return bundle


def compiled(bundle) -> Callable[[torch.Tensor], torch.Tensor]:
    """``torch.compile`` (inductor, freezing) of normalise -> net -> softmax in channels_last bf16."""
    import torch._inductor.config as inductor

    inductor.freezing = True  # weights become constants: conv + batch-norm folding, prepacked oneDNN weights
    pre = bundle.preprocess
    graph = PixelGraph(bundle.members[0], pre.mean, pre.std).eval().to(memory_format=torch.channels_last)
    fn = torch.compile(graph)

    @torch.inference_mode()
    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fn(x.contiguous(memory_format=torch.channels_last)).float()

    return run


def time_config(name: str, batch: int, batches: int, model: str | None = None) -> dict:
    """One timing of one configuration, run in a fresh process (so no other runtime's idle threads are around):
    build (export and compile are cached after the first time), warm up, time ``batches`` batches."""
    bundle = network_bundle(model)
    size = bundle.preprocess.size
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (batch, 3, size, size), dtype=np.uint8))
    start = time.perf_counter()
    if name == COMPILED:
        run = compiled(bundle)
    else:
        cfg = CONFIGS[name]
        run = Ensemble.from_bundle(bundle, EnsembleConfig(batch_size=batch, channels_last=cfg.channels_last,
                                                          precision=cfg.precision, backend=cfg.backend))
    probs = run(images)  # warm-up (and the compile)
    setup = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(batches):
        run(images)
    picked = run.choices[0].name if name.startswith("auto") else None
    return {"images_per_s": batches * batch / (time.perf_counter() - start), "setup_s": setup, "probs": probs.numpy(),
            "picked": picked}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=3, help="batches per timing")
    parser.add_argument("--repeats", type=int, default=3, help="timings per configuration; the best is reported")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    parser.add_argument("--model", help="a bundle: time its first member instead of a random full-width GoogLeNet")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    bundle = network_bundle(args.model)
    arch = describe_arch(bundle.members[0].config)
    size = bundle.preprocess.size
    # exact multiply-adds are counted for GoogLeNet (detector.nets.summary); other members get no FLOP columns
    googlenet = arch.startswith("GoogLeNet") and size == 224
    macs = summarize(bundle.members[0].config.variant)["total"]["macs"] if googlenet else None
    names = list(CONFIGS) + ([] if args.no_compile else [COMPILED])
    picked: dict[str, str] = {}
    where = machine()
    best = {name: 0.0 for name in names}
    setup: dict[str, float] = {}
    outputs: dict[str, np.ndarray] = {}
    skipped: dict[str, str] = {}
    peak = {"fp32": 0.0, "bf16": 0.0}
    # a fresh process per timing: one spawn-context worker that serves a single task and exits
    context = multiprocessing.get_context("spawn")
    for _ in range(args.repeats):
        # the peaks too are best-of-repeats, measured between the rows, so all share the same busy and quiet spells
        peak = {"fp32": max(peak["fp32"], matmul_peak(torch.float32, seconds=1.0)),
                "bf16": max(peak["bf16"], matmul_peak(torch.bfloat16, seconds=1.0))}
        for name in names:
            if name in skipped:
                continue
            with ProcessPoolExecutor(1, mp_context=context, max_tasks_per_child=1) as pool:
                try:
                    result = pool.submit(time_config, name, args.batch, args.batches, args.model).result()
                except Exception as e:  # a backend that is not installed, a CPU without bf16: reported, not fatal
                    skipped[name] = str(e)[:300]
                    continue
            best[name] = max(best[name], result["images_per_s"])
            setup.setdefault(name, result["setup_s"])  # the first one includes the export or the compile
            outputs.setdefault(name, result["probs"])
            if result["picked"]:
                picked[name] = result["picked"]
    runs = [name for name in names if name not in skipped]
    reference = torch.from_numpy(outputs["torch fp32 (default layout)"])
    outputs = {name: torch.from_numpy(p) for name, p in outputs.items()}

    rows = []
    for name in runs:
        flops = best[name] * 2 * macs if macs else None
        dtype = "bf16" if "bf16" in name else "fp32"
        rows.append({"config": name, "picked": picked.get(name), "images_per_s": best[name], "dtype": dtype,
                     "gflops": flops / 1e9 if flops else None,
                     "fraction_of_own_peak": flops / peak[dtype] if flops else None,
                     "vs_torch_fp32": best[name] / best["torch fp32 (default layout)"],
                     "fraction_of_fp32_peak": flops / peak["fp32"] if flops else None,
                     "fraction_of_bf16_peak": flops / peak["bf16"] if flops else None,
                     "max_prob_diff_vs_fp32": float((outputs[name] - reference).abs().max()),
                     "same_top1_vs_fp32": float((outputs[name].argmax(1) == reference.argmax(1)).float().mean()),
                     "setup_s": setup.get(name, 0.0)})
    doc = {"machine_at_start": where, "machine": machine(), "arch": arch, "size": size, "model": args.model,
           "batch": args.batch, "batches_per_timing": args.batches, "repeats": args.repeats,
           "gmacs_per_image": macs / 1e9 if macs else None,
           "matmul_peak_gflops": {k: v / 1e9 for k, v in peak.items()}, "rows": rows, "skipped": skipped}
    if args.json:
        print(json.dumps(doc, indent=2))
        return
    work = f", {macs / 1e9:.3f} GMAC = {2 * macs / 1e9:.2f} GFLOP per image" if macs else ""
    print(f"one {arch} ({size} px{work}), batch {args.batch}, best of {args.repeats} x {args.batches} batches")
    print(f"on {format_machine(where)} at the start, {format_machine(doc['machine'])} at the end")
    print(f"matmul peak: fp32 {peak['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peak['bf16'] / 1e9:.0f} GFLOP/s")
    print("| configuration | images/s | x torch fp32 | GFLOP/s | of its dtype's matmul peak "
          "| max abs prob diff vs fp32 | same top-1 as fp32 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        config = f"{r['config']}: {r['picked']}" if r["picked"] else r["config"]
        gflops = f"{r['gflops']:.0f}" if r["gflops"] else "-"
        share = f"{100 * r['fraction_of_own_peak']:.0f}% ({r['dtype']})" if r["gflops"] else "-"
        print(f"| {config} | {r['images_per_s']:.1f} | {r['vs_torch_fp32']:.1f} | {gflops} | {share} "
              f"| {r['max_prob_diff_vs_fp32']:.1e} | {100 * r['same_top1_vs_fp32']:.0f}% |")
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")


if __name__ == "__main__":
    main()
