"""`ircnn detect --engine ray` on a real two-node Ray cluster that loses its worker node mid-run.

The nodes are separate network namespaces of this machine (root only), joined by one veth pair that exists only
inside them, so the cluster has two node IPs, two raylets and two object stores, and its ports never meet the
host's or another test's:

    ircnn-rc<pid>-head  10.213.0.1  GCS + raylet, 1 CPU; the driver (`ircnn detect`) runs here too
    ircnn-rc<pid>-w1    10.213.0.2  raylet, 1 CPU

`--ray-workers 2` with one CPU per node puts one DetectWorker actor on each node. Once the worker node's actor has
run selective search on at least one image and the journal holds a few records, the worker node's raylet is
SIGKILLed (the whole node goes: its actor exits with it). The run ends however Ray ends it (on this cluster Ray
retries the lost blocks on the head's actor and the run finishes); the records already in the journal must still
be there, each image at most once. Then a new worker node joins and the same command runs with --resume. The
journal must hold every image exactly once with the records of a one-machine run (`--engine local`, same model and
flags), and the coco file must be that run's.

Then the same on the new cluster with a jsonl output, stopped by Ctrl-C (SIGINT to the driver) instead, so that
--resume has images left to detect on the two-node cluster.

About 80-100 s on 2 cores, too much of CI's 15-minute budget on slower CPUs: opt-in, with IRCNN_RAY_CLUSTER=1
(as root where `ip netns add` works; skipped otherwise). Run it: `IRCNN_RAY_CLUSTER=1 pytest
tests/service/test_ray_cluster.py`, or `python bench/ray_cluster.py`, which sets it and prints the measurement. IRCNN_RAY_CLUSTER_REPORT=PATH writes what happened, with
timings, to PATH as JSON. Nothing is left behind, also on failure: every process of both namespaces is killed, the
namespaces (and the veths inside them) deleted, the Ray temp dirs removed; a run killed before it could clean up is
cleaned up by the next one.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
IMAGES = 12
HEAD_IP, WORKER_IP, PORT = "10.213.0.1", "10.213.0.2", 6379
DETECTOR_ACTOR = "ray::MapWorker(MapBatches(DetectWorker))"  # the process title Ray gives the pool's actors
NS_PREFIX = "ircnn-rc"

pytestmark = [
    pytest.mark.skipif(os.environ.get("IRCNN_RAY_CLUSTER") != "1", reason="the two-node Ray test takes 80-100 s: "
                       "opt-in with IRCNN_RAY_CLUSTER=1 (or run python bench/ray_cluster.py)"),
    pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                       reason="the Ray cluster test makes network namespaces: needs root"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="the Ray cluster test needs iproute2's `ip netns`"),
    pytest.mark.timeout(900),
]
ray = pytest.importorskip("ray", reason="the Ray engine needs the [ray] extra (part of [dev]): pip install -e '.[dev]'")
pytest.importorskip("ray.data")


# ---- namespaces and processes --------------------------------------------------------------------------------


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=60)


def netns_pids(ns: str) -> list[int]:
    done = sh("ip", "netns", "pids", ns, check=False)
    return [int(p) for p in done.stdout.split()] if done.returncode == 0 else []


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def kill_netns(ns: str, timeout: float = 20.0) -> None:
    """SIGKILL every process in namespace ``ns`` until none is left (``ray stop`` is no use: it kills every Ray
    process of the machine, other users' included, whatever namespace it runs in)."""
    deadline = time.monotonic() + timeout
    while pids := netns_pids(ns):
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes left in netns {ns}: {pids}")
        time.sleep(0.2)


def delete_netns(ns: str) -> None:
    kill_netns(ns)
    sh("ip", "netns", "del", ns, check=False)  # its veth end goes with it, and the peer with that


def remove_stale_clusters() -> None:
    """The namespaces (and their processes) and Ray temp dirs of an earlier run of this test that was killed before
    it could clean up: those whose pid is gone."""
    for line in sh("ip", "netns", "list", check=False).stdout.splitlines():
        m = re.match(rf"({NS_PREFIX}(\d+)-\S+)", line)
        if m and not Path(f"/proc/{m.group(2)}").exists():
            delete_netns(m.group(1))
    for path in Path("/tmp").glob(f"{NS_PREFIX}*-*"):
        m = re.fullmatch(rf"{NS_PREFIX}(\d+)-\w+", path.name)
        if m and path.is_dir() and not Path(f"/proc/{m.group(1)}").exists():
            shutil.rmtree(path, ignore_errors=True)


class Cluster:
    """Two namespaces joined by a veth pair, and the Ray nodes started in them."""

    def __init__(self, root: Path):
        tag = f"{NS_PREFIX}{os.getpid()}"
        self.head, self.worker = f"{tag}-head", f"{tag}-w1"
        # Ray's unix sockets live under its temp dir and must stay under 107 characters: a short path, not tmp_path.
        self.ray_tmp = Path(tempfile.mkdtemp(prefix=f"{tag}-", dir="/tmp"))
        self.root = root
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        self.env.update({
            "RAY_USAGE_STATS_ENABLED": "0",
            # Token auth as Ray enables it by default, with a token of this cluster only: ~/.ray/auth_token is
            # neither read nor written.
            "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            "IRCNN_OFFLINE": "1",
        })
        self.worker_dirs: list[Path] = []

    def create(self) -> None:
        remove_stale_clusters()
        for ns in (self.head, self.worker):
            done = sh("ip", "netns", "add", ns, check=False)
            if done.returncode:
                pytest.skip(f"`ip netns add` failed: {done.stderr.strip()}")
        # The veth pair is made inside the head namespace with its peer moved straight into the worker's: no
        # interface, address or route of the host is touched.
        sh("ip", "-n", self.head, "link", "add", "veth-h", "type", "veth", "peer", "name", "veth-w", "netns",
           self.worker)
        for ns, dev, ip in ((self.head, "veth-h", HEAD_IP), (self.worker, "veth-w", WORKER_IP)):
            sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")

    def ray_start(self, ns: str, temp_dir: Path, *args: str) -> None:
        log = self.root / f"ray-start-{temp_dir.name}.log"
        with open(log, "w") as out:  # a file, not a pipe: the daemons it starts must not hold our pipe open
            done = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-m", "ray.scripts.scripts", "start",
                                   f"--temp-dir={temp_dir}", "--disable-usage-stats", "--num-gpus=0",
                                   f"--object-store-memory={100 * 2**20}", *args],
                                  env=self.env, cwd=self.root, stdout=out, stderr=subprocess.STDOUT, timeout=120,
                                  check=False)
        if done.returncode:
            raise AssertionError(f"ray start in {ns} failed:\n{log.read_text()[-3000:]}")

    def start_head(self) -> None:
        self.ray_start(self.head, self.ray_tmp / "head", "--head", f"--node-ip-address={HEAD_IP}", f"--port={PORT}",
                       "--num-cpus=1", "--include-dashboard=false")

    def start_worker(self) -> None:
        temp_dir = self.ray_tmp / f"w{len(self.worker_dirs) + 1}"
        self.worker_dirs.append(temp_dir)
        self.ray_start(self.worker, temp_dir, f"--address={HEAD_IP}:{PORT}", f"--node-ip-address={WORKER_IP}",
                       "--num-cpus=1")

    def worker_raylet(self) -> int:
        temp_dir = str(self.worker_dirs[-1])
        pids = [p for p in netns_pids(self.worker) if "/raylet/raylet " in cmdline(p) and temp_dir in cmdline(p)]
        assert len(pids) == 1, f"raylets of the worker node: {pids}"
        return pids[0]

    def worker_selective_search_seconds(self) -> float:
        """CPU seconds of the selective search processes of the worker node's DetectWorker actors (0 when there is
        none yet): how much detection the worker node has done."""
        actors = [p for p in netns_pids(self.worker) if cmdline(p).startswith(DETECTOR_ACTOR)]
        return sum(cpu_seconds(c) for a in actors for c in children(a) if "multiprocessing.spawn" in cmdline(c))

    def destroy(self) -> None:
        errors = []
        for ns in (self.worker, self.head):
            try:
                delete_netns(ns)
            except RuntimeError as e:  # still delete the other one, and the namespace itself
                errors.append(str(e))
                sh("ip", "netns", "del", ns, check=False)
        left = [p for p in map(int, filter(str.isdigit, os.listdir("/proc"))) if str(self.ray_tmp) in cmdline(p)]
        for pid in left:  # none: every node process was in a namespace; a last check by temp dir
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.ray_tmp, ignore_errors=True)
        assert not errors and not left, f"left behind: {errors}, Ray processes outside the namespaces: {left}"


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path)  # the test creates it (after starting the one-machine run); this only cleans up
    try:
        yield c
    finally:
        c.destroy()
    listed = sh("ip", "netns", "list").stdout
    assert c.head not in listed and c.worker not in listed


# ---- inputs and outputs ----------------------------------------------------------------------------------------


def make_inputs(root: Path, tiny_bundle) -> None:
    from detector.bundle.format import Preprocess, save_bundle

    bundle = tiny_bundle(task="det200-from-cls1000")
    bundle.preprocess = Preprocess(size=64)  # a few ms per region on a CPU; selective search is most of the time
    save_bundle(root / "model", bundle)
    rng = np.random.default_rng(0)
    (root / "imgs").mkdir()
    for i in range(IMAGES):
        h, w = 48 + 8 * (i % 4), 64 + 8 * (i % 3)
        cells = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
        Image.fromarray(cells).resize((w, h), Image.BILINEAR).save(root / "imgs" / f"im{i:02d}.png")


def lines(path: Path) -> list[str]:
    """The complete lines of a journal (a line being written has no newline yet)."""
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    return text[:text.rfind("\n") + 1].splitlines(keepends=True)


def by_image(journal: Path) -> dict[str, dict]:
    records = [json.loads(line) for line in lines(journal)]
    images = [r["image"] for r in records]
    assert len(set(images)) == len(images), f"an image recorded twice in {journal.name}: {sorted(images)}"
    return {r["image"]: r for r in records}


def differences(got, want, where: str = "") -> list[str]:
    """Where two JSON values differ; floats within 1e-6, one unit of the sixth decimal that records round scores
    to (exactly equal when both sides run torch on one thread, as here)."""
    if isinstance(want, dict) and isinstance(got, dict):
        if got.keys() != want.keys():
            return [f"{where}: keys {sorted(got)} != {sorted(want)}"]
        return [d for k in want for d in differences(got[k], want[k], f"{where}.{k}")]
    if isinstance(want, list) and isinstance(got, list):
        if len(got) != len(want):
            return [f"{where}: {len(got)} items != {len(want)}"]
        return [d for i, (g, w) in enumerate(zip(got, want)) for d in differences(g, w, f"{where}[{i}]")]
    if isinstance(want, float) and isinstance(got, (int, float)) and not isinstance(got, bool):
        return [] if abs(got - want) <= 1e-6 + 1e-12 else [f"{where}: {got!r} != {want!r}"]
    return [] if got == want and type(got) is type(want) else [f"{where}: {got!r} != {want!r}"]




def test_a_lost_worker_node_loses_no_record_and_resume_matches_one_machine(cluster, tmp_path, tiny_bundle):
    t0 = time.monotonic()
    report: dict = {"images": IMAGES, "nodes": {"head": f"{HEAD_IP}, 1 CPU, runs the driver",
                                                "worker": f"{WORKER_IP}, 1 CPU"}, "times_s": {}}

    def lap(name: str) -> None:
        report["times_s"][name] = round(time.monotonic() - t0, 1)

    make_inputs(tmp_path, tiny_bundle)
    # Relative paths: the workers enter the driver's directory, on the shared filesystem. --backend torch: `auto`
    # times the runtimes on each node and may pick another one there (they agree within 1e-4, not exactly).
    flags = ["detect", "imgs", "--model", "model", "--backend", "torch", "--json"]
    cli = [sys.executable, "-m", "service.cli"]
    cluster.create()
    # The one-machine reference, in this (host) namespace, while the cluster starts; with the one torch thread that
    # Ray gives each 1-CPU worker (2 threads sum in another order: a score's sixth decimal may differ).
    local = subprocess.Popen(cli + flags + ["--engine", "local", "--format", "coco", "--out", "local.json"],
                             cwd=tmp_path, env={**cluster.env, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        cluster.start_head()
        cluster.start_worker()
        lap("cluster_up")
        on_ray = ["ip", "netns", "exec", cluster.head] + cli + flags + [
            "--engine", "ray", "--ray-address", f"{HEAD_IP}:{PORT}", "--ray-workers", "2"]

        # 1. coco: the worker node dies mid-run (SIGKILL to its raylet); the run ends as Ray ends it.
        coco = on_ray + ["--format", "coco", "--out", "ray.json"]
        journal = tmp_path / "ray.json.partial.jsonl"

        def kill_worker_node(driver: subprocess.Popen) -> str:
            raylet = cluster.worker_raylet()
            os.kill(raylet, signal.SIGKILL)
            return "SIGKILL to the worker node's raylet"

        report["run1"] = run_and_stop(cluster, tmp_path, coco, journal, kill_worker_node, "run1", lap)
        after_run1 = "".join(lines(journal))
        # The lost node's leftovers (its log monitor outlives the raylet) go; a new worker node joins; resume.
        kill_netns(cluster.worker)
        cluster.start_worker()
        lap("worker_restarted")
        report["resume1"] = resume(coco, tmp_path, cluster.env)
        lap("resume1_ended")

        # 2. jsonl on the new two-node cluster, stopped mid-run by Ctrl-C (SIGINT to the driver), then resumed: this
        # time --resume has images left to detect.
        jsonl = on_ray + ["--out", "ray.jsonl"]

        def ctrl_c(driver: subprocess.Popen) -> str:
            driver.send_signal(signal.SIGINT)
            return "SIGINT to the driver (Ctrl-C)"

        report["run2"] = run_and_stop(cluster, tmp_path, jsonl, tmp_path / "ray.jsonl", ctrl_c, "run2", lap)
        after_run2 = "".join(lines(tmp_path / "ray.jsonl"))
        report["resume2"] = resume(jsonl, tmp_path, cluster.env)
        lap("resume2_ended")
        assert report["resume2"]["detected"] > 0, "run 2 left nothing for --resume: stopped too late"

        _, err = local.communicate(timeout=400)
        assert local.returncode == 0, err[-3000:]
        lap("local_done")
    finally:
        if local.poll() is None:
            local.kill()
            local.wait()

    # Every image exactly once, each record the one-machine record; the coco files the same, in the same order.
    want = by_image(tmp_path / "local.json.partial.jsonl")
    exact = True
    for out, before in ((journal, after_run1), (tmp_path / "ray.jsonl", after_run2)):
        got = by_image(out)
        assert got.keys() == want.keys() and len(got) == IMAGES, out.name
        assert "".join(lines(out)).startswith(before), f"--resume changed the records already in {out.name}"
        diffs = [d for image in sorted(want) for d in differences(got[image], want[image], f"{out.name}:{image}")]
        assert not diffs, diffs[:20]
        exact = exact and got == want
    coco_got, coco_want = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("ray", "local"))
    assert coco_want, "the one-machine run detected nothing: nothing compared"
    diffs = differences(coco_got, coco_want, "coco")
    assert not diffs, diffs[:20]
    assert (tmp_path / "ray.json.images.json").read_text() == (tmp_path / "local.json.images.json").read_text()

    report.update(seconds=round(time.monotonic() - t0, 1), outcome="passed", detections=len(coco_want),
                  records_exactly_equal=exact and coco_got == coco_want)
    if os.environ.get("IRCNN_RAY_CLUSTER_REPORT"):
        Path(os.environ["IRCNN_RAY_CLUSTER_REPORT"]).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


def run_and_stop(cluster: Cluster, root: Path, cmd: list[str], journal: Path, stop, name: str, lap) -> dict:
    """Run ``cmd`` and call ``stop(driver)`` mid-run: once the worker node's actor has detected at least one image
    (its selective search costs ~0.25 s of CPU to start, ~0.6 s per image here) and the journal holds 3 records.
    The run then ends however it ends; the records it had must still be there, and no image twice."""
    log_path = root / f"ray-{name}.log"
    with open(log_path, "w") as log:
        driver = subprocess.Popen(cmd, cwd=root, env=cluster.env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            while not (len(lines(journal)) >= 3 and cluster.worker_selective_search_seconds() >= 1.0):
                assert driver.poll() is None, (f"{name} ended before it could be stopped mid-run:\n"
                                               + log_path.read_text()[-3000:])
                assert time.monotonic() < deadline, f"{name}: no detection on the worker node within 300 s"
                time.sleep(0.2)
            worker_seconds = cluster.worker_selective_search_seconds()
            kept = "".join(lines(journal))
            what = stop(driver)
            lap(f"{name}_stopped")
            rc = driver.wait(timeout=400)
        finally:
            if driver.poll() is None:
                driver.kill()
                driver.wait()
    lap(f"{name}_ended")
    after = "".join(lines(journal))
    text = log_path.read_text()
    assert after.startswith(kept), f"{name}: records written before the stop were lost or changed"
    by_image(journal)  # no image twice, whatever --resume would make of it
    return {"stopped_by": what, "records_before_stop": kept.count("\n"),
            "worker_selective_search_cpu_s": round(worker_seconds, 2), "exit": rc, "records_at_end": after.count("\n"),
            "ray_retries_logged": text.count("will be retried"),
            "last_line": text.strip().splitlines()[-1][:300] if text.strip() else ""}


def resume(cmd: list[str], root: Path, env: dict) -> dict:
    done = subprocess.run(cmd + ["--resume"], cwd=root, env=env, capture_output=True, text=True, timeout=400,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    return {"exit": done.returncode, "skipped": summary["skipped"], "detected": summary["detected"]}
