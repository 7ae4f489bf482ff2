"""The service's detector is configured by the same factory as `ircnn detect` (``detector.config.detect_config``):
every ``IRCNN_*`` detection setting reaches it."""

from __future__ import annotations

import argparse

from detector.config import EnsembleConfig
from service.api.worker import MAX_DETECTIONS, _detector_of
from service.cli.detect import detect_config as cli_config
from service.settings import Settings


def test_every_detection_setting_reaches_the_service_detector(tiny_bundle):
    bundle = tiny_bundle(width=0.125, task="det200-from-cls1000")
    settings = Settings(nms_iou=0.45, coarsen=3.0, multibox=False, max_regions=500, whole_objects="off",
                        cascade=40, precision="fp32", backend="torch", inference_batch_size=16, agreement=0.5,
                        context_frames=20, person_evidence=False, image_context=True)
    ensemble = EnsembleConfig(batch_size=settings.inference_batch_size, precision=settings.precision,
                              backend=settings.backend)
    detector = _detector_of(bundle, ensemble, settings)
    try:
        c = detector.config
        assert (c.nms_iou, c.max_regions, c.whole_objects, c.cascade_top_k) == (0.45, 500, "off", 40)
        assert (c.proposals.search.coarsen, c.proposals.multibox, c.scoring) == (3.0, False, "warped")
        assert (c.agreement, c.context_frames, c.person_evidence, c.image_context) == (0.5, 20, False, True)
        assert c.ensemble == ensemble and c.max_detections == MAX_DETECTIONS
        assert not detector.whole_objects
        # the CLI's flags with the same values give the same configuration
        args = argparse.Namespace(engine="local", ray_gpus_per_worker=0.0, device="cpu", backend="torch", precision="fp32", batch_size=16, scoring="warped",
                                  selective_search="on", coarsen=3.0, multibox="off", score_threshold=c.score_threshold,
                                  max_detections=MAX_DETECTIONS, nms_iou=0.45, max_regions=500, cascade=40,
                                  whole_objects="off", agreement=0.5, context_frames=20, person_evidence="off",
                                  image_context="on")
        assert cli_config(args) == c
    finally:
        detector.close()
    shared = _detector_of(bundle, ensemble, Settings(scoring="shared-trunk", backend="torch"))
    try:
        assert shared.config.scoring == "shared-trunk" and type(shared.scorer).__name__ == "SharedTrunkScorer"
    finally:
        shared.close()


def test_every_setting_is_in_the_serving_docs():
    from pathlib import Path

    page = (Path(__file__).resolve().parents[3] / "docs" / "serving.md").read_text()
    missing = [f"IRCNN_{name.upper()}" for name in Settings.model_fields if f"IRCNN_{name.upper()}" not in page]
    assert missing == []


def test_int8_without_int8_models_says_why_and_what_to_run(tiny_bundle, tmp_path, monkeypatch):
    """IRCNN_PRECISION=int8 on a bundle that has no int8/: the real reason, not only 'can neither classify nor
    detect' (the reasons were logged at INFO); `ircnn serve` says it before anything loads."""
    import pytest

    from detector.bundle.format import save_bundle
    from service.api.worker import Service
    from service.cli import main

    model = tmp_path / "m"
    save_bundle(model, tiny_bundle(width=0.125, task="det200-from-cls1000"))
    service = Service(Settings(model=str(model), precision="int8", backend="auto"))
    with pytest.raises(ValueError, match=r"neither classify nor detect: classify: .*int8.*detect: .*int8") as e:
        service.load()
    assert f"ircnn model quantize {model} --images DIR" in str(e.value)
    monkeypatch.setenv("IRCNN_PRECISION", "int8")
    assert main(["serve", "--model", str(model)]) == 2


def test_serve_refuses_a_gpu_this_machine_lacks_before_starting(monkeypatch, capsys):
    import torch

    from service.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("IRCNN_DEVICE", "cuda")
    assert main(["serve"]) == 2
    assert "IRCNN_DEVICE=cuda: device cuda asked for, but this machine has no usable CUDA GPU" in capsys.readouterr().err
