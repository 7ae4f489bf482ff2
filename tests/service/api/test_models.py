"""``/v1/models`` and the ``ircnn_model_info`` metric describe a bundle whose members differ in architecture and
input size (a merge of EfficientNet-Lite0, Lite1 and Lite2 is one): ``arch`` one object per member, each member's
input side."""

from __future__ import annotations

import time

from fastapi.testclient import TestClient

from detector.bundle.format import Preprocess, init_bundle
from detector.bundle.importers import merge_bundles
from detector.nets.googlenet import GoogLeNetConfig
from detector.pipeline.classify import Classifier
from service.app import create_app
from service.settings import Settings


def test_models_route_and_metrics_describe_a_mixed_ensemble(tiny_bundle):
    other = init_bundle(GoogLeNetConfig(variant="torchvision", width=0.125), preprocess=Preprocess(size=96))
    classifier = Classifier(merge_bundles([tiny_bundle(width=0.125, size=64), other]))
    with TestClient(create_app(Settings(), classifier=classifier)) as client:
        deadline = time.monotonic() + 30
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "the service did not become ready"
            time.sleep(0.01)
        (model,) = client.get("/v1/models").json()["models"]
        metrics = client.get("/metrics").text
    assert [a["variant"] for a in model["arch"]] == ["paper", "torchvision"] and model["member_sizes"] == [64, 96]
    (info,) = [line for line in metrics.splitlines() if line.startswith("ircnn_model_info{")]
    assert 'variant="paper,torchvision"' in info
