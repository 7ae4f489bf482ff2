"""The two-node Ray cluster test (tests/service/test_ray_cluster.py), run alone and reported: a head and a worker
node in network namespaces of this machine, the worker node's raylet SIGKILLed mid-run, --resume on a new worker
node, a Ctrl-C'd run resumed, and every record compared with a one-machine run.

Needs root and `ip netns` (the test skips otherwise, and so does this). Prints the date, the CPU, the load average
before and after, the test's own report (seconds, phases, what was stopped and how each run ended) and whether
anything was left behind (namespaces, Ray processes, temp dirs): the lines docs/batch.md quotes.

    python bench/ray_cluster.py
    python bench/ray_cluster.py --json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEST = "tests/service/test_ray_cluster.py"
PREFIX = "ircnn-rc"


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def leftovers() -> dict:
    """What a cluster test could leave behind: its namespaces, processes started from its temp dirs, the dirs."""
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
    procs = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if f"/tmp/{PREFIX}" in cmd:
            procs.append(int(pid))
    return {"namespaces": [line.split()[0] for line in netns.splitlines() if line.startswith(PREFIX)],
            "processes": procs, "temp_dirs": sorted(str(p) for p in Path("/tmp").glob(f"{PREFIX}*"))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        report_path = Path(tmp) / "report.json"
        env = {**os.environ, "IRCNN_RAY_CLUSTER": "1", "IRCNN_RAY_CLUSTER_REPORT": str(report_path)}
        load_before = os.getloadavg()
        start = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "pytest", TEST, "-q", "-p", "no:cacheprovider", "-rs"],
                              cwd=REPO, env=env, capture_output=True, text=True, check=False)
        wall = time.monotonic() - start
        report = json.loads(report_path.read_text()) if report_path.exists() else {}
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": f"{cpu_model()}, {os.cpu_count()} logical CPUs",
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "pytest_exit": done.returncode,
        "pytest_seconds": round(wall, 1),
        "pytest_summary": done.stdout.strip().splitlines()[-1] if done.stdout.strip() else "",
        "test": report,
        "left_behind": leftovers(),
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['date']}; {result['cpu']}; load average {result['load_average_before']} before, "
              f"{result['load_average_after']} after")
        print(f"pytest: {result['pytest_summary']} (exit {done.returncode}, {wall:.1f} s)")
        if report:
            print(f"test: {report['images']} images, {report['seconds']} s, {report['detections']} detections; records "
                  f"{'exactly equal to' if report['records_exactly_equal'] else 'within 1e-6 of'} the one-machine "
                  "run")
            for run, resumed in (("run1", "resume1"), ("run2", "resume2")):
                r, s = report[run], report[resumed]
                print(f"  {run}: {r['stopped_by']} after {r['records_before_stop']} records (worker node's selective "
                      f"search {r['worker_selective_search_cpu_s']} CPU-s); exit {r['exit']} with "
                      f"{r['records_at_end']} records; --resume skipped {s['skipped']}, detected {s['detected']}")
            print("  phases (s since start): " + ", ".join(f"{k} {v}" for k, v in report["times_s"].items()))
        else:  # skipped (the reason is in pytest's -rs lines) or failed
            print(done.stdout[-4000:] + done.stderr[-2000:])
        left = result["left_behind"]
        print("left behind: " + ("nothing" if not any(left.values()) else json.dumps(left)))
    return 0 if done.returncode == 0 and report and not any(result["left_behind"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
