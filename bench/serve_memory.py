"""Peak memory of a real `ircnn serve` under a burst of uploads that decode to 6000 x 6000.

Starts the server on 127.0.0.1 with the default settings (only the model and port given), waits until ready,
then sends ``--uploads`` requests at once, each a small file whose pixels are 6000 x 6000: an all-zero PNG
(about 105 KB), an all-black progressive JPEG (about 210 KB), or a 632-byte JPEG of 8 x 8 pixels whose header
was made to say 6000 x 6000 (``header``). It samples the resident memory of the server and
its children (the selective search worker) every 10 ms and prints the rise over the ready server's, with the
answers' statuses. Bounded: every request and the whole run have time limits; the server is stopped at the end.

    python bench/serve_memory.py --model DIR [--route classify|detect] [--kind png|jpeg|header] [--uploads 20]
                                 [--bursts 1]
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from PIL import Image

from detector.nets.summary import format_machine, machine

SIDE = 6000


def tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and its descendants (from /proc)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (OSError, StopIteration):
            pass
    return total


def upload(kind: str) -> tuple[bytes, str]:
    buf = io.BytesIO()
    if kind == "png":
        Image.new("RGB", (SIDE, SIDE)).save(buf, "PNG", optimize=True)
        return buf.getvalue(), "image/png"
    if kind == "jpeg":
        Image.new("RGB", (SIDE, SIDE)).save(buf, "JPEG", progressive=True, quality=10)
        return buf.getvalue(), "image/jpeg"
    Image.new("RGB", (8, 8), (90, 120, 200)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", SIDE, SIDE)  # SOF0 height, width
    return bytes(data), "image/jpeg"


def post(url: str, body: bytes, content_type: str) -> int:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=300) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return -1  # no answer (connection refused or reset, timeout)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--route", choices=("classify", "detect"), default="classify")
    ap.add_argument("--kind", choices=("png", "jpeg", "header"), default="png")
    ap.add_argument("--uploads", type=int, default=20)
    ap.add_argument("--bursts", type=int, default=1, help="bursts one after the other (peak over all of them)")
    ap.add_argument("--port", type=int, default=8765)
    args = ap.parse_args()

    body, content_type = upload(args.kind)
    env = {k: v for k, v in os.environ.items() if not k.startswith("IRCNN_")}  # the default settings
    server = subprocess.Popen([sys.executable, "-c", "import sys; from service.cli import main; sys.exit(main())",
                               "serve", "--model", args.model, "--host", "127.0.0.1", "--port", str(args.port),
                               "--log-level", "warning"], env=env)
    base = f"http://127.0.0.1:{args.port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                with urllib.request.urlopen(f"{base}/readyz", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                print("the server did not become ready", file=sys.stderr)
                return 1
            time.sleep(0.5)
        time.sleep(1.0)
        ready = tree_rss(server.pid)
        peak, stop = [ready], threading.Event()

        def sample() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], tree_rss(server.pid))
                time.sleep(0.01)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        start, statuses = time.perf_counter(), []
        for _ in range(args.bursts):
            with ThreadPoolExecutor(args.uploads) as pool:
                statuses += pool.map(lambda _: post(f"{base}/v1/{args.route}", body, content_type),
                                     range(args.uploads))
        seconds = time.perf_counter() - start
        time.sleep(1.0)
        stop.set()
        sampler.join()
        after = tree_rss(server.pid)
        print(f"{args.bursts} x {args.uploads} x {args.kind} ({len(body):,} bytes, {SIDE}x{SIDE}) to "
              f"/v1/{args.route} in {seconds:.1f} s: statuses {dict(sorted(Counter(statuses).items()))}")
        print(f"on {format_machine(machine())}")
        print(f"server RSS (with children): ready {ready / 1e9:.2f} GB, peak {peak[0] / 1e9:.2f} GB "
              f"(+{(peak[0] - ready) / 1e9:.2f} GB), 1 s after {after / 1e9:.2f} GB")
        return 0
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    sys.exit(main())
