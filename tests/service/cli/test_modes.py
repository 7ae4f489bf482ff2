"""Every mode does what it says: each combination of scoring, precision, backend and device either runs as asked
(and the summary says what ran, per member) or is refused before any work with a message, exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SCORINGS = ("warped", "shared-trunk")
PRECISIONS = ("fp32", "bf16", "int8")
BACKENDS = ("auto", "torch", "onnxruntime", "openvino")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, module_cache):
    """A narrow det200-from-cls1000 bundle at 64 px (no int8 models) and one photo-like image."""
    from detector.bundle.format import Preprocess, init_bundle, save_bundle
    from detector.nets.googlenet import GoogLeNetConfig

    root = tmp_path_factory.mktemp("modes")
    save_bundle(root / "model", init_bundle(GoogLeNetConfig(width=0.125), task="det200-from-cls1000",
                                            preprocess=Preprocess(size=64)))
    rng = np.random.default_rng(0)
    image = np.kron(rng.integers(0, 256, (6, 8, 3)), np.ones((12, 12, 1))).astype(np.uint8)
    Image.fromarray(image).save(root / "a.png")
    return root


RUNNER = """
import contextlib, io, itertools, json, sys
from service.cli import main
root, out = sys.argv[1], sys.argv[2]
results = {}
for scoring, precision, backend, device in itertools.product(*json.loads(sys.argv[3])):
    stdout, stderr = io.StringIO(), io.StringIO()
    path = f"{out}/{scoring}-{precision}-{backend}-{device}.jsonl"
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(["detect", f"{root}/a.png", "--model", f"{root}/model", "--out", path, "--json",
                     "--scoring", scoring, "--precision", precision, "--backend", backend, "--device", device,
                     "--max-regions", "20"])
    results["-".join((scoring, precision, backend, device))] = [code, stdout.getvalue(), stderr.getvalue(), path]
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def outcomes(setup, tmp_path_factory):
    """Every combination through `ircnn detect`, in one process of its own (as a user's command runs: no state
    left by other tests), run once for the module."""
    import os
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("outs")
    env = {**os.environ, "IRCNN_CACHE_DIR": os.environ["IRCNN_CACHE_DIR"]}
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(setup), str(out),
                           json.dumps([SCORINGS, PRECISIONS, BACKENDS, ["cpu", "cuda"]])],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("scoring", SCORINGS)
def test_a_mode_runs_as_asked_or_is_refused(outcomes, scoring, precision, backend, device):
    import torch

    from detector.cpus import native_bf16

    code, stdout, stderr, out = outcomes["-".join((scoring, precision, backend, device))]
    out = Path(out)
    if code != 0:  # refused, before any work, saying why
        assert code == 2 and stderr.startswith("ircnn: error: ") and "Traceback" not in stderr, stderr
        assert not out.exists() or out.read_text() == ""
        return
    ran = json.loads(stdout)["networks"]
    assert device == "cpu" or torch.cuda.is_available()
    assert precision != "int8"  # this bundle has no int8 models: every int8 request must have been refused
    for name in ran:
        if scoring == "shared-trunk":
            engine = name.split(", ")[1].split(" ")[0]
            assert name.startswith("shared trunk, ") and engine in ("torch", "onnxruntime")
            assert backend in ("auto", engine), (backend, name)
        else:
            assert backend in ("auto", name.split(" ")[0]), (backend, name)
        ran_precision = name.split(" ")[-2] if name.endswith("channels_last") else name.split(" ")[-1]
        # bf16 allowed with auto (where native), asked for with a runtime: what ran is what was asked
        assert ran_precision == precision or (backend == "auto" and precision == "bf16" and ran_precision == "fp32")
        if ran_precision == "bf16":
            assert native_bf16() or device == "cuda"


def test_the_refusals_name_what_to_do(setup, run, tmp_path):
    base = ["detect", setup / "a.png", "--model", setup / "model", "--out", tmp_path / "o.jsonl"]
    for flags, said in [
        (["--precision", "int8"], f"ircnn model quantize {setup / 'model'} --images DIR"),
        (["--precision", "int8", "--backend", "torch"], "precision int8 runs on backend onnxruntime or openvino"),
        (["--precision", "bf16", "--backend", "onnxruntime"], "backend onnxruntime runs fp32 or int8"),
        (["--scoring", "shared-trunk", "--precision", "int8"], "shared-trunk scoring has no int8 models"),
        (["--scoring", "shared-trunk", "--backend", "openvino"], "shared-trunk scoring runs its trunks in torch or "
                                                                   "onnxruntime"),
    ]:
        code, _, err = run(*base, *flags)
        assert code == 2 and said in err, (flags, err)


def test_auto_shared_trunk_takes_bf16_only_where_it_is_native(monkeypatch):
    from detector import config

    monkeypatch.setattr(config, "native_bf16", lambda: False)
    c = config.detect_config(scoring="shared-trunk", backend="auto", precision="bf16")
    assert (c.ensemble.precision, c.shared_trunk.engine) == ("fp32", "onnxruntime")
    monkeypatch.setattr(config, "native_bf16", lambda: True)
    c = config.detect_config(scoring="shared-trunk", backend="auto", precision="bf16")
    assert (c.ensemble.precision, c.shared_trunk.engine) == ("bf16", "torch")
    c = config.detect_config(scoring="shared-trunk", backend="torch", precision="bf16")  # asked for: as asked
    assert (c.ensemble.precision, c.shared_trunk.engine) == ("bf16", "torch")
