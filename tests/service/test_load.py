"""Load and fault tests against a real `ircnn serve` process (uvicorn) on 127.0.0.1, with a tiny bundle that
classifies and detects (selective search in its worker process, as in production).

- concurrent clients: no 5xx; p50/p99 latency printed;
- a client that disconnects mid-upload or mid-inference leaves no stuck work (queue depth and in-flight jobs back
  to 0 in /metrics; a queued job whose client left is dropped, not run);
- a full queue (IRCNN_QUEUE_SIZE=4) answers 503 with Retry-After, then recovers;
- SIGTERM during an in-flight request: that request completes, then the process exits 0.

"A request in flight" is made deterministic rather than slow: ``held_detection`` stops the server's selective
search worker process (SIGSTOP), posts a detection, which then waits in the worker thread for its proposals for as
long as the test needs, and lets it go (SIGCONT) at the end. A slow request (144 crops) would be a race on a fast
backend: it can finish before the test has filled the queue behind it.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from detector.bundle.format import init_bundle, save_bundle
from detector.nets.googlenet import GoogLeNetConfig

START_S = 180  # import torch, load, spawn selective search, warm up: on 2 busy cores this can take a while
WAIT_S = 120


def _png(seed: int, shape=(72, 96)) -> bytes:
    """A smooth synthetic photo: a gradient and a few rectangles (noise would make selective search crawl)."""
    rng = np.random.default_rng(seed)
    h, w = shape
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 255 // w, y * 255 // h, np.full_like(x, 128)], axis=-1).astype(np.uint8)
    for _ in range(3):
        x1, y1 = rng.integers(0, w - 20), rng.integers(0, h - 20)
        img[y1:y1 + rng.integers(10, 20), x1:x1 + rng.integers(10, 20)] = rng.integers(0, 256, 3)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG")
    return buf.getvalue()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle")
    save_bundle(out, init_bundle(GoogLeNetConfig(width=0.125), seed=0, task="det200-from-cls1000"))
    return out


class Server:
    def __init__(self, bundle_dir, log_path, **settings) -> None:
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "IRCNN_OFFLINE": "1", **{f"IRCNN_{k.upper()}": str(v) for k, v in settings.items()}}
        self.log_path = log_path
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--model", str(bundle_dir),
                                      "--port", str(self.port), "--log-level", "warning"],
                                     env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_S
        while True:
            assert self.proc.poll() is None, f"the server exited during startup:\n{self.output()}"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.base}/readyz", timeout=5).status_code == 200:
                    break
            assert time.monotonic() < deadline, f"the server did not become ready:\n{self.output()}"
            time.sleep(0.1)

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def post(self, route: str, body: bytes, **params) -> httpx.Response:
        return httpx.post(self.base + route, params=params, content=body, headers={"content-type": "image/png"},
                          timeout=WAIT_S)

    def metric(self, name: str, **labels) -> float:
        """A sample of /metrics (0 if absent); labels must match exactly the ones given."""
        text = httpx.get(self.base + "/metrics", timeout=WAIT_S).text
        for line in text.splitlines():
            m = re.fullmatch(rf"{name}(?:{{(.*)}})? (\S+)", line)
            if m and dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or "")) == labels:
                return float(m.group(2))
        return 0.0

    def wait_metric(self, name: str, value: float, **labels) -> None:
        deadline = time.monotonic() + WAIT_S
        while self.metric(name, **labels) != value:
            assert time.monotonic() < deadline, f"{name}{labels} never reached {value}"
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


QUEUE_SIZE = 4
CLIENTS = QUEUE_SIZE  # at most this many requests outstanding: the queue never overflows in the load test


@pytest.fixture(scope="module")
def server(bundle_dir, tmp_path_factory):
    """One server for the whole module (starting one costs seconds). The SIGTERM test stops it: it comes last."""
    s = Server(bundle_dir, tmp_path_factory.mktemp("log") / "server.log", queue_size=QUEUE_SIZE,
               max_batch=QUEUE_SIZE, batch_wait_ms=5, max_regions=100, retry_after_s=3)
    yield s
    s.stop()


def _spawned_children(pid: int) -> list[int]:
    """PIDs of the processes that ``pid`` started with multiprocessing's "spawn" (the selective search worker)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid and \
                    b"spawn_main" in (stat.parent / "cmdline").read_bytes():
                out.append(int(stat.parent.name))
    return out


@contextlib.contextmanager
def held_detection(server, pool: ThreadPoolExecutor):
    """A detection request held in flight (in the worker thread, waiting for proposals) until the block ends;
    yields its future."""
    workers = _spawned_children(server.proc.pid)
    assert workers, "found no selective search worker process under the server"
    for pid in workers:
        os.kill(pid, signal.SIGSTOP)
    try:
        held = pool.submit(server.post, "/v1/detect", _png(99))
        server.wait_metric("ircnn_inflight_jobs", 1)
        yield held
    finally:
        for pid in workers:
            os.kill(pid, signal.SIGCONT)


def _raw_request(port: int, route: str, body: bytes, declared: int | None = None) -> socket.socket:
    """Send a request on a raw socket (so that the test can drop the connection) and return the socket."""
    sock = socket.create_connection(("127.0.0.1", port))
    head = (f"POST {route} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
            f"Content-Length: {declared if declared is not None else len(body)}\r\n\r\n")
    sock.sendall(head.encode() + body)
    return sock


def test_concurrent_clients_get_no_5xx(server, capsys):
    images = [_png(i) for i in range(CLIENTS)]

    def client(i: int) -> list[tuple[int, float]]:
        out = []
        for j in range(8):
            route = "/v1/detect" if (i + j) % 4 == 0 else "/v1/classify"
            start = time.perf_counter()
            r = server.post(route, images[(i + j) % len(images)])
            out.append((r.status_code, time.perf_counter() - start, route))
            assert r.headers["content-type"] == "application/json"
        return out

    start = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        results = [x for chunk in pool.map(client, range(CLIENTS)) for x in chunk]
    wall = time.perf_counter() - start
    assert [r for r in results if r[0] != 200] == []
    with capsys.disabled():
        for route in ("/v1/classify", "/v1/detect"):
            lat = sorted(t for _, t, r in results if r == route)
            p99 = lat[min(len(lat) - 1, int(round(0.99 * (len(lat) - 1))))]
            print(f"\n{route}: {len(lat)} requests from {CLIENTS} concurrent clients, "
                  f"p50 {1000 * statistics.median(lat):.0f} ms, p99 {1000 * p99:.0f} ms", end="")
        print(f"\nall: {len(results)} requests in {wall:.1f} s, {len(results) / wall:.1f} req/s")
    assert server.metric("ircnn_batch_size_count", task="classify") < 24  # some of the 24 shared a batch
    assert server.metric("ircnn_queue_depth") == 0 and server.metric("ircnn_inflight_jobs") == 0


def test_disconnect_mid_upload_leaves_nothing_stuck(server):
    before = server.metric("ircnn_requests_total", method="POST", route="/v1/classify", status="499")
    sock = _raw_request(server.port, "/v1/classify", _png(0)[:500], declared=50_000)
    time.sleep(0.3)
    sock.close()
    server.wait_metric("ircnn_requests_total", before + 1, method="POST", route="/v1/classify", status="499")
    assert server.metric("ircnn_queue_depth") == 0 and server.metric("ircnn_inflight_jobs") == 0
    assert server.post("/v1/classify", _png(1)).status_code == 200


def test_disconnect_mid_inference_drops_the_queued_job(server):
    dropped = server.metric("ircnn_dropped_jobs_total", task="classify")
    before = server.metric("ircnn_requests_total", method="POST", route="/v1/classify", status="499")
    with ThreadPoolExecutor(1) as pool:
        with held_detection(server, pool) as held:
            sock = _raw_request(server.port, "/v1/classify?crops=144", _png(3))
            server.wait_metric("ircnn_queue_depth", 1)  # queued behind the held one
            sock.close()  # the client gives up
            server.wait_metric("ircnn_requests_total", before + 1, method="POST", route="/v1/classify",
                               status="499")
        assert held.result().status_code == 200
    server.wait_metric("ircnn_queue_depth", 0)
    server.wait_metric("ircnn_inflight_jobs", 0)
    assert server.metric("ircnn_dropped_jobs_total", task="classify") == dropped + 1  # never ran
    assert server.metric("ircnn_requests_total", method="POST", route="/v1/classify", status="500") == 0
    assert server.post("/v1/classify", _png(4)).status_code == 200


def test_full_queue_gives_503_with_retry_after_then_recovers(server):
    with ThreadPoolExecutor(1 + QUEUE_SIZE) as pool:
        with held_detection(server, pool) as running:
            queued = [pool.submit(server.post, "/v1/classify", _png(6)) for _ in range(QUEUE_SIZE)]
            server.wait_metric("ircnn_queue_depth", QUEUE_SIZE)
            refused = [server.post(route, _png(7)) for route in ("/v1/classify", "/v1/detect")]
            for r in refused:
                assert r.status_code == 503 and r.headers["retry-after"] == "3"
                assert r.json()["error"]["code"] == "queue_full"
        assert [f.result().status_code for f in [running, *queued]] == [200] * (1 + QUEUE_SIZE)
    assert server.post("/v1/classify", _png(8)).status_code == 200
    assert server.post("/v1/detect", _png(9)).status_code == 200


def test_sigterm_finishes_the_request_in_flight_then_exits_0(server):
    with ThreadPoolExecutor(1) as pool:
        with held_detection(server, pool) as inflight:
            server.proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)  # the signal has arrived while the request is still held
            assert server.proc.poll() is None, "the server exited with a request in flight"
        r = inflight.result()
    assert r.status_code == 200 and isinstance(r.json()["detections"], list)
    assert server.proc.wait(60) == 0, server.output()
    with pytest.raises(httpx.TransportError):  # and it is gone
        httpx.get(server.base + "/healthz", timeout=2)
