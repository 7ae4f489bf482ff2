"""The REST service under load: throughput and latency of POST /v1/classify at concurrency 1, 4 and 16, with
dynamic micro-batching on (IRCNN_MAX_BATCH=16, 5 ms wait) and off (IRCNN_MAX_BATCH=1), and the overhead of the
HTTP path over a direct call of the same functions (decode_image + Classifier.classify) in one process.

Each mode runs a real `ircnn serve` process on 127.0.0.1 (random-weight bundle of the given width; the
weights do not change the cost), driven by an asyncio httpx client from this process; requests are closed-loop
(each client sends its next request when the previous one is answered).

    python bench/service.py                    # GoogLeNet width 1.0 (the paper's), 1 crop, best of 3 rounds
    python bench/service.py --width 0.5 --requests 48 --crops 1
    python bench/service.py --json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
from PIL import Image

from detector.bundle.format import init_bundle, save_bundle
from detector.image import decode_image
from detector.nets.googlenet import GoogLeNetConfig
from detector.nets.summary import format_machine, machine
from detector.pipeline.classify import Classifier

CONCURRENCY = (1, 4, 16)


def photo(seed: int) -> bytes:
    """A 500 x 375 JPEG (ILSVRC's typical size) of smooth random content."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((500, 375), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(bundle_dir: str, **settings):
    port = free_port()
    env = {**os.environ, "IRCNN_OFFLINE": "1", "IRCNN_SELECTIVE_SEARCH": "false",
           **{f"IRCNN_{k.upper()}": str(v) for k, v in settings.items()}}
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--model", bundle_dir, "--port", str(port),
                             "--log-level", "warning"], env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise SystemExit(f"the server exited:\n{log.read().decode(errors='replace')[-3000:]}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(base + "/readyz", timeout=5).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise SystemExit("the server did not become ready in 300 s")
            time.sleep(0.2)
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        log.close()


async def load(base: str, images: list[bytes], concurrency: int, requests: int, crops: int) -> dict:
    """``requests`` POSTs from ``concurrency`` closed-loop clients -> throughput and latency percentiles."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    next_index = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal next_index
        while next_index < requests:
            i = next_index
            next_index += 1
            start = time.perf_counter()
            r = await http.post(f"{base}/v1/classify", params={"crops": crops}, content=images[i % len(images)],
                                headers={"content-type": "image/jpeg"})
            latencies.append(time.perf_counter() - start)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        # warm the connections and the server's first requests at this concurrency
        await asyncio.gather(*(http.post(f"{base}/v1/classify", content=images[0],
                                         headers={"content-type": "image/jpeg"}) for _ in range(concurrency)))
        before = _batches((await http.get(f"{base}/metrics")).text)
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        wall = time.perf_counter() - start
        after = _batches((await http.get(f"{base}/metrics")).text)
    lat = sorted(latencies)
    mean_batch = (after[0] - before[0]) / max(1.0, after[1] - before[1])  # requests per network batch
    return {"concurrency": concurrency, "requests": requests, "seconds": wall, "images_per_s": requests / wall,
            "p50_ms": 1000 * statistics.median(lat),
            "p99_ms": 1000 * lat[min(len(lat) - 1, round(0.99 * (len(lat) - 1)))],
            "mean_batch": mean_batch, "statuses": statuses}


def _batches(metrics: str) -> tuple[float, float]:
    """(requests, batches) run by the classify worker so far, from /metrics."""
    total = count = 0.0
    for line in metrics.splitlines():
        if line.startswith('ircnn_batch_size_sum{task="classify"}'):
            total = float(line.split()[-1])
        elif line.startswith('ircnn_batch_size_count{task="classify"}'):
            count = float(line.split()[-1])
    return total, count


def direct(clf: Classifier, images: list[bytes], n: int, crops: int) -> dict:
    """The same work without HTTP: decode_image + Classifier.classify, one image per call, from one worker thread
    as in the service (torch's OpenMP team of the main thread can be much slower on a busy machine, which would
    flatter the HTTP path)."""
    times: list[float] = []

    def run() -> None:
        clf.classify([decode_image(images[0])], crops=crops)
        for i in range(n):
            start = time.perf_counter()
            clf.classify([decode_image(images[i % len(images)])], crops=crops, top_k=5)
            times.append(time.perf_counter() - start)

    with ThreadPoolExecutor(1) as pool:
        pool.submit(run).result()
    return {"calls": n, "p50_ms": 1000 * statistics.median(times), "images_per_s": n / sum(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=float, default=1.0, help="GoogLeNet channel multiplier (1.0 = the paper's)")
    parser.add_argument("--crops", type=int, choices=(1, 10, 144), default=1)
    parser.add_argument("--requests", type=int, default=64, help="timed requests per concurrency level")
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3, help="repetitions; the best (highest throughput) is kept")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    images = [photo(i) for i in range(16)]
    best = lambda a, b: b if a is None or b["images_per_s"] > a["images_per_s"] else a  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        bundle = init_bundle(GoogLeNetConfig(width=args.width), seed=0)
        save_bundle(tmp, bundle)
        clf = Classifier(bundle)
        results = {"width": args.width, "crops": args.crops, "cpus": os.cpu_count(), "rounds": args.rounds,
                   "direct": None, "modes": {"batching on": {}, "batching off": {}}}
        # both servers run at once (idle when not driven) and everything alternates, round after round, so that
        # a slow patch of a shared machine does not land on one configuration only; the best round is kept
        with serve(tmp, max_batch=16, batch_wait_ms=args.batch_wait_ms, queue_size=256) as on, \
                serve(tmp, max_batch=1, queue_size=256) as off:
            for _ in range(args.rounds):
                results["direct"] = best(results["direct"], direct(clf, images, max(8, args.requests // 4),
                                                                   args.crops))
                for c in CONCURRENCY:
                    for mode, base in (("batching on", on), ("batching off", off)):
                        row = asyncio.run(load(base, images, c, args.requests, args.crops))
                        results["modes"][mode][c] = best(results["modes"][mode].get(c), row)
    results["modes"] = {mode: [rows[c] for c in CONCURRENCY] for mode, rows in results["modes"].items()}
    results["machine"] = machine()
    if args.json:
        print(json.dumps(results, indent=1))
        return
    d = results["direct"]
    print(f"GoogLeNet width {args.width}, {args.crops} crop(s), 500x375 JPEG uploads, {results['cpus']} CPUs, "
          f"{args.requests} requests per level, closed loop, best of {args.rounds} rounds")
    print(f"on {format_machine(results['machine'])}")
    print(f"direct call (decode_image + Classifier.classify, 1 image): p50 {d['p50_ms']:.1f} ms, "
          f"{d['images_per_s']:.1f} images/s")
    print(f"{'mode':<14}{'conc':>5}{'img/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'batch':>7}  statuses")
    for mode, rows in results["modes"].items():
        for r in rows:
            print(f"{mode:<14}{r['concurrency']:>5}{r['images_per_s']:>9.1f}{r['p50_ms']:>9.1f}{r['p99_ms']:>9.1f}"
                  f"{r['mean_batch']:>7.1f}  {r['statuses']}")
    on, off = results["modes"]["batching on"], results["modes"]["batching off"]
    for a, b in zip(on, off):
        ratio = a["images_per_s"] / b["images_per_s"]
        print(f"concurrency {a['concurrency']:>2}: batching on/off throughput x{ratio:.2f}, "
              f"p50 x{a['p50_ms'] / b['p50_ms']:.2f}")
    http1 = off[0]["p50_ms"]
    print(f"HTTP overhead at concurrency 1 (batching off): {http1 - d['p50_ms']:.1f} ms per request "
          f"({http1:.1f} ms vs {d['p50_ms']:.1f} ms direct, x{http1 / d['p50_ms']:.2f})")


if __name__ == "__main__":
    main()
