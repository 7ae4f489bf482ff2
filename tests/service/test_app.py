"""The REST app in-process (TestClient) with tiny injected models: the HTTP contract, errors, auth, readiness,
backpressure, metrics, and the micro-batcher underneath."""

from __future__ import annotations

import contextlib
import io
import json
import re
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import service.app as app_module
from detector.pipeline.classify import Classifier
from service.api.worker import ClassifyJob
from service.app import create_app
from service.batching import Job, MicroBatcher, QueueFull
from service.settings import Settings


def encode(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt)
    return buf.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG signature and IHDR chunk (valid CRC) claiming ``width x height`` RGB pixels, then a stub IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data  # noqa: E731
                                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))


@pytest.fixture
def photo() -> np.ndarray:
    rng = np.random.default_rng(1)
    y, x = np.mgrid[0:90, 0:120]
    img = np.stack([x * 2, y * 2, (x + y)], axis=-1) % 256
    return (img + rng.integers(0, 40, img.shape)).clip(0, 255).astype(np.uint8)


class GatedClassifier(Classifier):
    """A real classifier whose forward waits while ``gate`` is closed (to hold the worker busy on demand)."""

    def __init__(self, bundle) -> None:
        super().__init__(bundle)
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def probabilities(self, images, crops=1):
        self.entered.set()
        assert self.gate.wait(60), "test gate never opened"
        return super().probabilities(images, crops)


def wait_until(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@pytest.fixture
def serve(tiny_bundle):
    """Factory: a started TestClient over ``create_app`` with a tiny classifier, ready (warm) on return."""
    clients = []

    def make(settings: Settings | None = None, classifier=None, detector=None, wait_ready: bool = True,
             **kwargs) -> TestClient:
        if classifier is None and detector is None:
            classifier = Classifier(tiny_bundle(width=0.125))
        app = create_app(settings or Settings(), classifier=classifier, detector=detector)
        client = TestClient(app, **kwargs)
        client.__enter__()
        clients.append(client)
        if wait_ready:
            wait_until(lambda: client.get("/readyz").status_code == 200, what="/readyz")
        return client

    yield make
    for c in clients:
        c.__exit__(None, None, None)


def assert_error(r, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"} and body["error"]["code"] == code and body["error"]["message"], body
    return body["error"]


# ---- the contract ------------------------------------------------------------------------------------------


def test_classify_answers_what_the_classifier_answers(serve, tiny_bundle, photo):
    clf = Classifier(tiny_bundle(width=0.125, members=2))
    client = serve(classifier=clf)
    data = encode(photo)
    multipart = client.post("/v1/classify?top_k=3&crops=10", files={"image": ("cat.png", data, "image/png")})
    raw = client.post("/v1/classify?top_k=3&crops=10", content=data, headers={"content-type": "image/png"})
    assert multipart.status_code == raw.status_code == 200, multipart.text
    direct = clf.classify([photo], crops=10, top_k=3)[0]
    for r, name in ((multipart, "cat.png"), (raw, None)):
        body = r.json()
        assert (body["image"], body["width"], body["height"], body["crops"], body["members"]) == (name, 120, 90, 10, 2)
        assert [t["index"] for t in body["top_k"]] == [t["index"] for t in direct["top_k"]]
        assert [t["prob"] for t in body["top_k"]] == pytest.approx([t["prob"] for t in direct["top_k"]], abs=1e-6)
        assert body["top_k"][0]["wnid"].startswith("n") and body["top_k"][0]["name"]
    # the content type's subtype is not trusted: the format is sniffed from the bytes
    jpeg_as_png = client.post("/v1/classify", content=encode(photo, "JPEG"), headers={"content-type": "image/png"})
    assert jpeg_as_png.status_code == 200


def test_bad_uploads_get_4xx_json(serve, photo):
    client = serve(Settings(max_upload_bytes=50_000, max_pixels=200_000))
    png, jpeg = encode(photo), encode(photo, "JPEG")
    raw = lambda body, ct="image/png", q="": client.post("/v1/classify" + q, content=body,  # noqa: E731
                                                        headers={"content-type": ct})
    assert_error(raw(b""), 400, "empty")
    assert_error(raw(b"\x00" * 100), 415, "not_an_image")
    assert_error(raw(b"GIF89a" + b"\x00" * 50), 415, "not_an_image")  # a real format, not an allowed one
    assert_error(raw(png[: len(png) // 2]), 400, "truncated")
    assert_error(raw(jpeg[: len(jpeg) // 3]), 400, "truncated")
    assert_error(raw(png, "text/plain"), 415, "unsupported_media_type")
    assert_error(client.post("/v1/classify", content=png), 415, "unsupported_media_type")  # no content type
    assert_error(raw(b"\x01" * 60_000), 413, "too_large")
    assert_error(raw(encode(np.zeros((500, 500, 3), np.uint8))), 413, "too_many_pixels")
    assert_error(raw(encode(np.zeros((2, 300, 3), np.uint8))), 400, "bad_aspect")
    assert_error(client.post("/v1/classify", files={"picture": ("x.png", png, "image/png")}), 400, "missing_image")
    assert_error(client.post("/v1/classify", data={"image": "not a file"}, files={"x": ("x", b"1")}), 400,
                 "missing_image")
    # a body without its closing boundary is malformed (refused whole); a complete one without parts has no image
    assert_error(raw(b"--xx\r\nnonsense", "multipart/form-data; boundary=xx"), 400, "bad_multipart")
    assert_error(raw(b"--xx--\r\n", "multipart/form-data; boundary=xx"), 400, "missing_image")
    assert_error(raw(png, "multipart/form-data"), 400, "bad_multipart")  # no boundary
    for q in ("?crops=7", "?crops=abc", "?top_k=0", "?top_k=1001", "?top_k=1e9", "?top_k=-1"):
        assert_error(raw(png, q=q), 422, "invalid_query")
    assert client.post("/v1/classify?top_k=1000", content=png, headers={"content-type": "image/png"}).status_code == 200
    assert_error(client.get("/v1/classify"), 405, "method_not_allowed")
    assert_error(client.get("/v1/nothing"), 404, "not_found")
    assert_error(client.post("/v1/detect", content=png, headers={"content-type": "image/png"}), 404, "no_detector")
    assert client.get("/healthz").json() == {"status": "ok"}


def test_a_png_claiming_100000_by_100000_pixels_is_refused_from_its_header(serve):
    client = serve()
    start = time.perf_counter()
    r = client.post("/v1/classify", files={"image": ("bomb.png", png_header(100_000, 100_000), "image/png")})
    err = assert_error(r, 413, "too_many_pixels")
    assert "100000x100000" in err["message"] and time.perf_counter() - start < 5


def test_declared_content_length_over_the_limit_is_refused_before_reading(serve):
    client = serve(Settings(max_upload_bytes=1000))
    received = []

    def body():
        for _ in range(100):
            received.append(1)
            yield b"\x00" * 1000

    r = client.post("/v1/classify", content=body(), headers={"content-type": "image/png", "content-length": "100000"})
    assert_error(r, 413, "too_large")
    assert len(received) <= 1  # refused from the header: the body (100 chunks) was not read


def test_bearer_token_guards_every_v1_route(serve, photo):
    client = serve(Settings(api_token="s3cret"))
    png = encode(photo)
    for method, path in (("post", "/v1/classify"), ("post", "/v1/detect"), ("get", "/v1/models")):
        r = getattr(client, method)(path)
        assert_error(r, 401, "unauthorized")
        assert r.headers["www-authenticate"] == "Bearer"
        assert_error(getattr(client, method)(path, headers={"authorization": "Bearer wrong"}), 401, "unauthorized")
    ok = client.post("/v1/classify", content=png, headers={"content-type": "image/png",
                                                           "authorization": "Bearer s3cret"})
    assert ok.status_code == 200
    assert client.get("/v1/models", headers={"authorization": "Bearer s3cret"}).status_code == 200
    for path in ("/healthz", "/readyz", "/metrics"):  # probes and scrapers need no token
        assert client.get(path).status_code == 200


def test_models_route_describes_the_bundle(serve, tiny_bundle):
    client = serve(classifier=Classifier(tiny_bundle(width=0.125, members=2)))
    (model,) = client.get("/v1/models").json()["models"]
    assert model["task"] == "cls1000" and model["members"] == 2 and model["classes"] == 1000
    assert model["serves"] == ["classify"] and model["arch"]["width"] == 0.125
    assert model["preprocess"]["size"] == 224


def test_openapi_documents_routes_bodies_and_examples(serve):
    schema = serve().get("/openapi.json").json()
    assert {"/v1/detect", "/v1/classify", "/v1/models", "/healthz", "/readyz", "/metrics"} <= set(schema["paths"])
    classify = schema["paths"]["/v1/classify"]["post"]
    assert set(classify["requestBody"]["content"]) == {"multipart/form-data", "image/*"}
    assert {p["name"] for p in classify["parameters"]} == {"top_k", "crops"}
    assert {"400", "401", "413", "415", "422", "503"} <= set(classify["responses"])
    comps = schema["components"]["schemas"]
    assert comps["DetectResponse"]["examples"][0]["detections"][0]["det_id"] == 26
    assert comps["ErrorResponse"]["examples"][0]["error"]["code"] == "not_an_image"
    assert "HTTPBearer" in schema["components"]["securitySchemes"]


def test_root_serves_the_web_page_when_installed(serve, tmp_path, monkeypatch):
    client = serve()
    monkeypatch.setattr(app_module, "STATIC_DIR", tmp_path)
    assert_error(client.get("/"), 404, "not_found")
    (tmp_path / "index.html").write_text("<!doctype html><title>ircnn</title>")
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html") and "ircnn" in r.text


def test_settings_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("IRCNN_QUEUE_SIZE", "3")
    monkeypatch.setenv("IRCNN_API_TOKEN", "tok-9f2e")
    monkeypatch.setenv("IRCNN_MAX_UPLOAD_BYTES", "1234")
    s = Settings()
    assert (s.queue_size, s.api_token.get_secret_value(), s.max_upload_bytes) == (3, "tok-9f2e", 1234)
    assert "tok-9f2e" not in repr(s)  # the token is a secret
    monkeypatch.setenv("IRCNN_QUEUE_SIZE", "0")
    with pytest.raises(ValueError, match="queue_size"):
        Settings()


class SlidingWindows:
    """Proposals for any image: a 3 x 3 grid of half-size windows and the whole image (in place of selective
    search, which would dominate the time of these tests)."""

    def __call__(self, image: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        boxes = [[x * w / 4, y * h / 4, x * w / 4 + w / 2, y * h / 4 + h / 2] for y in range(3) for x in range(3)]
        return np.array(boxes + [[0, 0, w, h]], dtype=np.float32)  # [10, 4]


@pytest.fixture
def both(tiny_bundle):
    """A classifier and a detector over one tiny det200-from-cls1000 bundle (as an imported torchvision model)."""
    from detector.config import DetectConfig
    from detector.pipeline.detector import Detector
    from detector.pipeline.scoring import RegionScorer
    from proposals.combine import ProposalGenerator

    bundle = tiny_bundle(width=0.125, task="det200-from-cls1000")
    config = DetectConfig(score_threshold=0.0001)
    detector = Detector(RegionScorer(bundle, config), ProposalGenerator(selective_search=SlidingWindows()), config)
    return Classifier(bundle), detector


def test_detect_answers_what_the_detector_answers(serve, both, photo):
    classifier, detector = both
    client = serve(classifier=classifier, detector=detector)
    data = encode(photo)
    want = detector.detect(photo).to_json()
    assert len(want) > 3
    r = client.post("/v1/detect", files={"image": ("birds.png", data, "image/png")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["image"], body["width"], body["height"]) == ("birds.png", 120, 90)
    assert [d["det_id"] for d in body["detections"]] == [d["det_id"] for d in want]
    for got, ref in zip(body["detections"], want):
        assert got["box"] == pytest.approx(ref["box"], abs=1e-3) and got["score"] == pytest.approx(ref["score"])
        assert set(got) == {"box", "det_id", "wnid", "name", "score"}
    assert want[2]["score"] > want[3]["score"]
    threshold = (want[2]["score"] + want[3]["score"]) / 2
    r = client.post(f"/v1/detect?score_threshold={threshold}", content=data, headers={"content-type": "image/png"})
    assert [d["score"] for d in r.json()["detections"]] == [d["score"] for d in want[:3]]
    r = client.post("/v1/detect?max_detections=2", content=data, headers={"content-type": "image/png"})
    assert [d["det_id"] for d in r.json()["detections"]] == [d["det_id"] for d in want[:2]]
    for q in ("?score_threshold=nan", "?score_threshold=-0.1", "?score_threshold=1.5", "?score_threshold=inf",
              "?max_detections=0", "?max_detections=1001", "?max_detections=1e3", "?score_threshold=0x1"):
        assert_error(client.post("/v1/detect" + q, content=data, headers={"content-type": "image/png"}), 422,
                     "invalid_query")
    assert_error(client.post("/v1/detect", content=data[:200], headers={"content-type": "image/png"}), 400, "truncated")
    (model,) = client.get("/v1/models").json()["models"]
    assert model["task"] == "det200-from-cls1000" and model["serves"] == ["classify", "detect"]
    text = client.get("/metrics").text
    for stage in ("decode", "queue", "selective_search", "warp", "networks", "nms"):
        assert f'ircnn_stage_seconds_count{{stage="{stage}",task="detect"}}' in text


# ---- readiness, backpressure, failures ----------------------------------------------------------------------


def test_readyz_waits_for_the_warm_up_forward(serve, tiny_bundle, photo):
    clf = GatedClassifier(tiny_bundle(width=0.125))
    clf.gate.clear()
    client = serve(classifier=clf, wait_ready=False)
    assert clf.entered.wait(30)  # the warm-up is running (and held)
    r = client.get("/readyz")
    assert r.status_code == 503 and r.json()["ready"] is False and "retry-after" in r.headers
    assert client.get("/healthz").status_code == 200
    r = client.post("/v1/classify", content=encode(photo), headers={"content-type": "image/png"})
    assert_error(r, 503, "not_ready")
    assert_error(client.post("/v1/classify", content=b"junk", headers={"content-type": "image/png"}), 415,
                 "not_an_image")  # a bad image is told so, warm or not
    clf.gate.set()
    wait_until(lambda: client.get("/readyz").status_code == 200, what="/readyz")
    assert client.get("/readyz").json()["ready"] is True


@contextlib.contextmanager
def held_at_gate(clf: GatedClassifier, post, queued: int = 0, client=None):
    """Hold one ``post()`` at the classifier's gate (and queue ``queued`` more behind it, on ``client``); on exit
    the gate opens and every one of them must answer 200."""
    clf.entered.clear()
    clf.gate.clear()
    with ThreadPoolExecutor(1 + queued) as pool:
        futures = [pool.submit(post)]
        assert clf.entered.wait(30)
        futures += [pool.submit(post) for _ in range(queued)]
        if queued:
            wait_until(lambda: client.app.state.service.batcher.depth == queued, what="the queued jobs")
        try:
            yield
        finally:
            clf.gate.set()
        assert [f.result().status_code for f in futures] == [200] * (1 + queued)


def one_running_one_queued(client, clf: GatedClassifier, post):
    return held_at_gate(clf, post, queued=1, client=client)


def test_full_queue_answers_503_with_retry_after_then_recovers(serve, tiny_bundle, photo):
    clf = GatedClassifier(tiny_bundle(width=0.125))
    client = serve(Settings(queue_size=1, max_batch=1, retry_after_s=2), classifier=clf)
    post = lambda: client.post("/v1/classify", content=encode(photo),  # noqa: E731
                               headers={"content-type": "image/png"})
    with one_running_one_queued(client, clf, post):
        r = post()
        assert_error(r, 503, "queue_full")
        assert r.headers["retry-after"] == "2"
    assert post().status_code == 200
    assert 'status="503"' in client.get("/metrics").text


def test_a_bug_in_inference_is_a_json_500_and_the_service_goes_on(serve, tiny_bundle, photo):
    class Broken(Classifier):
        fail = False

        def probabilities(self, images, crops=1):
            if self.fail:
                raise RuntimeError("a real bug")
            return super().probabilities(images, crops)

    clf = Broken(tiny_bundle(width=0.125))
    client = serve(classifier=clf, raise_server_exceptions=False)
    clf.fail = True
    r = client.post("/v1/classify", content=encode(photo), headers={"content-type": "image/png"})
    assert_error(r, 500, "internal")
    clf.fail = False
    assert client.post("/v1/classify", content=encode(photo), headers={"content-type": "image/png"}).status_code == 200


def test_metrics_count_requests_stages_queue_and_model(serve, photo):
    client = serve()
    client.post("/v1/classify", content=encode(photo), headers={"content-type": "image/png"})
    client.post("/v1/classify", content=b"junk", headers={"content-type": "image/png"})
    text = client.get("/metrics").text
    assert 'ircnn_requests_total{method="POST",route="/v1/classify",status="200"} 1.0' in text
    assert 'ircnn_requests_total{method="POST",route="/v1/classify",status="415"} 1.0' in text
    assert 'ircnn_request_seconds_bucket{le="0.005",method="POST",route="/v1/classify",status="200"}' in text
    for stage in ("decode", "queue", "network"):
        assert f'ircnn_stage_seconds_count{{stage="{stage}",task="classify"}}' in text
    assert "ircnn_queue_depth 0.0" in text and "ircnn_inflight_jobs 0.0" in text
    assert 'ircnn_model_info{' in text and 'task="cls1000"' in text
    assert client.get("/metrics").headers["content-type"].startswith("text/plain")


# ---- the micro-batcher ---------------------------------------------------------------------------------------


def test_requests_that_arrive_together_run_in_one_batch_with_the_same_results(serve, tiny_bundle, photo):
    clf = GatedClassifier(tiny_bundle(width=0.125))
    client = serve(Settings(max_batch=4, batch_wait_ms=50), classifier=clf)
    service = client.app.state.service
    images = [np.ascontiguousarray(np.roll(photo, 17 * i, axis=1)) for i in range(4)]
    clf.entered.clear()
    clf.gate.clear()  # hold the worker on the first job so that the next ones queue up together
    with ThreadPoolExecutor(5) as pool:
        first = pool.submit(client.post, "/v1/classify?top_k=2", content=encode(photo),
                            headers={"content-type": "image/png"})
        assert clf.entered.wait(30)
        rest = [pool.submit(client.post, f"/v1/classify?top_k=2&crops={c}", content=encode(im),
                            headers={"content-type": "image/png"}) for im, c in zip(images, (1, 10, 1, 1))]
        wait_until(lambda: service.batcher.depth == 4, what="4 queued jobs")
        clf.gate.set()
        answers = [f.result().json() for f in rest]
        assert first.result().status_code == 200
    for im, c, got in zip(images, (1, 10, 1, 1), answers):
        want = clf.classify([im], crops=c, top_k=2)[0]["top_k"]
        assert [t["index"] for t in got["top_k"]] == [t["index"] for t in want]
        assert [t["prob"] for t in got["top_k"]] == pytest.approx([t["prob"] for t in want], rel=1e-4, abs=1e-6)
    sizes = service.metrics.registry.get_sample_value("ircnn_batch_size_sum", {"task": "classify"})
    count = service.metrics.registry.get_sample_value("ircnn_batch_size_count", {"task": "classify"})
    assert (sizes, count) == (1 + 4, 2)  # the first job, then the 4 waiting ones in one batch


def test_batcher_drops_cancelled_jobs_and_isolates_failures():
    seen = []
    release = threading.Event()

    def handler(jobs):
        seen.append([j.payload for j in jobs])
        if jobs[0].payload == "hold":
            release.wait(10)
        if any(j.payload == "bad" for j in jobs):
            raise ValueError("bad job")
        return [j.payload.upper() for j in jobs]

    b = MicroBatcher({"x": handler}, queue_size=3, max_batch=8, batch_wait_ms=0)
    b.start()
    try:
        hold = b.submit("x", "hold")
        wait_until(lambda: b.inflight == 1, what="the held job")
        gone, bad, ok = b.submit("x", "gone"), b.submit("x", "bad"), b.submit("x", "ok")
        with pytest.raises(QueueFull):
            b.submit("x", "one too many")
        assert gone.cancel()
        release.set()
        assert hold.result(10) == "HOLD" and ok.result(10) == "OK"
        with pytest.raises(ValueError, match="bad job"):
            bad.result(10)
        assert b.dropped == 1 and all("gone" not in batch for batch in seen)
        assert ["bad", "ok"] in seen and ["ok"] in seen  # the batch failed, then each job ran alone
        assert b.depth == 0 and b.inflight == 0
    finally:
        b.stop()
    with pytest.raises(QueueFull, match="shutting down"):
        b.submit("x", "late")


def test_classify_batch_mixes_crop_counts(serve, tiny_bundle, photo):
    clf = Classifier(tiny_bundle(width=0.125))
    service = serve(classifier=clf).app.state.service
    jobs = [Job("classify", ClassifyJob(photo, c, 3)) for c in (1, 10, 1)]
    out = service._classify_batch(jobs)
    assert [o["crops"] for o in out] == [1, 10, 1]
    probs = clf.probabilities([photo], 10)
    assert out[1]["top_k"][0]["prob"] == pytest.approx(float(probs.max()), rel=1e-4)
    assert out[0] == out[2]


@pytest.mark.parametrize("token", ["", " ", "\t\n"])
def test_an_empty_or_blank_token_is_refused_at_start_up(monkeypatch, token):
    monkeypatch.setenv("IRCNN_API_TOKEN", token)  # e.g. `-e IRCNN_API_TOKEN=$TOKEN` with TOKEN unset
    with pytest.raises(ValueError, match="IRCNN_API_TOKEN is set but empty"):
        Settings()
    with pytest.raises(ValueError, match="IRCNN_API_TOKEN is set but empty"):
        Settings(api_token=token)


# ---- hardening: decoded pixels in flight, truncated JPEGs, non-finite output, slow bodies, metrics ------------


def test_decoded_pixels_in_flight_are_bounded_with_503_and_retry_after(serve, tiny_bundle, photo):
    # Each photo decodes to 120 x 90 = 10,800 pixels; the budget holds two of them, queued or running.
    clf = GatedClassifier(tiny_bundle(width=0.125))
    client = serve(Settings(max_pixels=20_000, max_pixels_in_flight=25_000, max_batch=1, retry_after_s=3),
                   classifier=clf)
    service = client.app.state.service
    post = lambda: client.post("/v1/classify", content=encode(photo),  # noqa: E731
                               headers={"content-type": "image/png"})
    with one_running_one_queued(client, clf, post):
        assert service.pixels_in_flight == 2 * 10_800
        r = post()
        err = assert_error(r, 503, "busy")
        assert r.headers["retry-after"] == "3" and "IRCNN_MAX_PIXELS_IN_FLIGHT" in err["message"]
        assert "ircnn_pixels_in_flight 21600.0" in client.get("/metrics").text
    assert service.pixels_in_flight == 0
    assert post().status_code == 200 and service.pixels_in_flight == 0
    # failures give their pixels back too
    assert_error(client.post("/v1/classify", content=encode(photo, "JPEG")[:300] + b"\xff\xd9",
                             headers={"content-type": "image/jpeg"}), 400, "truncated")
    assert service.pixels_in_flight == 0


def test_the_pixel_budget_must_hold_the_largest_image():
    with pytest.raises(ValueError, match="max_pixels_in_flight"):
        Settings(max_pixels=1000, max_pixels_in_flight=999)
    assert Settings().max_pixels_in_flight >= Settings().max_pixels


def test_a_truncated_jpeg_ending_with_an_eoi_marker_is_refused(serve, photo):
    client = serve()
    big = np.ascontiguousarray(np.tile(photo, (4, 4, 1)))  # 480 x 360, so that half the file is real scan data
    jpeg = encode(big, "JPEG")
    for tail in (b"\xff\xd9", b"\x00" * 7 + b"\xff\xd9"):
        r = client.post("/v1/classify", content=jpeg[: len(jpeg) // 2] + tail, headers={"content-type": "image/jpeg"})
        assert "premature end" in assert_error(r, 400, "truncated")["message"]
    assert client.post("/v1/classify", content=jpeg, headers={"content-type": "image/jpeg"}).status_code == 200


def test_non_finite_model_output_is_a_clear_error_and_fails_readiness(serve, tiny_bundle, photo):
    import torch

    bundle = tiny_bundle(width=0.125)
    with torch.no_grad():
        next(bundle.members[0].parameters()).fill_(float("nan"))
    client = serve(classifier=Classifier(bundle), wait_ready=False)
    wait_until(lambda: client.app.state.service.batcher.ready.is_set(), what="the warm-up")
    r = client.get("/readyz")
    assert r.status_code == 503 and r.json()["ready"] is False and "NaN" in r.json()["detail"]
    r = client.post("/v1/classify", content=encode(photo), headers={"content-type": "image/png"})
    assert "null" not in r.text
    assert "weights are broken" in assert_error(r, 500, "non_finite_output")["message"]


def test_a_detector_with_non_finite_scores_fails_readiness(serve, both):
    import torch

    classifier, detector = both
    with torch.no_grad():
        for member in detector.scorer.ensemble.members:
            next(member.parameters()).fill_(float("nan"))
    client = serve(detector=detector, wait_ready=False)
    wait_until(lambda: client.app.state.service.batcher.ready.is_set(), what="the warm-up")
    r = client.get("/readyz")
    assert r.status_code == 503 and "NaN" in r.json()["detail"]


def test_metrics_do_not_name_the_bundle_path(serve):
    text = serve().get("/metrics").text
    (info,) = [line for line in text.splitlines() if line.startswith("ircnn_model_info{")]
    assert "path=" not in info and 'task="cls1000"' in info


def test_uvicorn_gets_the_connection_limits_from_settings(tiny_bundle):
    import socket

    import httpx
    import uvicorn

    from service.app import server_options

    assert server_options(Settings()) == {"limit_concurrency": 128, "timeout_keep_alive": 5,
                                          "h11_max_incomplete_event_size": 16384}
    settings = Settings(limit_concurrency=2, timeout_keep_alive_s=1, max_header_bytes=4096)
    app = create_app(settings, classifier=Classifier(tiny_bundle(width=0.125)))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", **server_options(settings)))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    idle = []
    try:
        wait_until(lambda: server.started, what="uvicorn")
        with socket.create_connection(sock.getsockname(), timeout=5) as long_headers:  # never ending them
            long_headers.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Long: " + b"a" * 5000)
            assert long_headers.recv(4096).startswith(b"HTTP/1.1 400")
        idle = [socket.create_connection(sock.getsockname(), timeout=5) for _ in range(2)]  # open, never asking
        wait_until(lambda: httpx.get(f"{base}/healthz", timeout=5).status_code == 503, timeout=10,
                   what="503 beyond limit_concurrency")
        for c in idle:
            c.close()
        wait_until(lambda: httpx.get(f"{base}/healthz", timeout=5).status_code == 200, timeout=10, what="recovery")
        with socket.create_connection(sock.getsockname(), timeout=5) as kept:  # keep-alive: closed when idle
            kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            start, answer = time.monotonic(), b""
            while chunk := kept.recv(4096):  # until the server closes it (the socket's timeout is 5 s)
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 200") and time.monotonic() - start < 4
    finally:
        for c in idle:
            c.close()
        server.should_exit = True
        thread.join(30)
        sock.close()


# ---- several images in one request ---------------------------------------------------------------------------


def test_several_images_are_answered_in_order_each_with_its_result_or_error(serve, both, photo):
    classifier, detector = both
    client = serve(classifier=classifier, detector=detector)
    a, b = photo, np.ascontiguousarray(np.roll(photo, 40, axis=1)[:80])
    files = [("image", ("a.png", encode(a), "image/png")), ("image", ("b.png", encode(b), "image/png"))]
    r = client.post("/v1/detect?max_detections=5", files=files)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [(x["image"], x["width"], x["height"]) for x in results] == [("a.png", 120, 90), ("b.png", 120, 80)]
    for got, image, (name, data, _) in zip(results, (a, b), (f for _, f in files)):
        single = client.post("/v1/detect?max_detections=5", files={"image": (name, data, "image/png")}).json()
        assert got == single and [d["det_id"] for d in got["detections"]] == [
            d["det_id"] for d in detector.detect(image).to_json()[:5]]

    jpeg = encode(np.ascontiguousarray(np.tile(photo, (4, 4, 1))), "JPEG")
    files = [("image", ("a.png", encode(a), "image/png")), ("image", ("notes.txt", b"hello", "text/plain")),
             ("image", ("half.jpg", jpeg[: len(jpeg) // 2] + b"\xff\xd9", "image/jpeg")),
             ("image", ("strip.png", encode(np.zeros((1, 100, 3), np.uint8)), "image/png")),
             ("image", ("b.png", encode(b), "image/png"))]
    r = client.post("/v1/classify?top_k=2", files=files)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["image"] for x in results] == ["a.png", "notes.txt", "half.jpg", "strip.png", "b.png"]
    assert [(x.get("status"), x.get("error", {}).get("code")) for x in results] == [
        (None, None), (415, "not_an_image"), (400, "truncated"), (400, "bad_aspect"), (None, None)]
    assert all(x["error"]["message"] for x in results[1:4])
    want = classifier.classify([a, b], top_k=2)
    for got, ref in zip((results[0], results[4]), want):
        assert [t["index"] for t in got["top_k"]] == [t["index"] for t in ref["top_k"]] and got["crops"] == 1
    # one field keeps the single-image shape and status, also for its errors
    one = client.post("/v1/classify", files=[("image", ("a.png", encode(a), "image/png"))]).json()
    assert set(one) == {"image", "width", "height", "crops", "members", "top_k"}
    assert_error(client.post("/v1/classify", files=[("image", ("x.txt", b"hello", "text/plain"))]), 415,
                 "not_an_image")
    assert client.app.state.service.pixels_in_flight == 0


def test_several_images_share_the_limits_of_one_request(serve, photo):
    # photo: 120 x 90 = 10,800 pixels, about 20 KB as PNG
    png = encode(photo)
    client = serve(Settings(max_pixels=25_000, max_upload_bytes=3 * len(png) + 10, max_images=4))
    two, three = [("image", ("a.png", png, "image/png"))] * 2, [("image", ("a.png", png, "image/png"))] * 3
    assert len(client.post("/v1/classify", files=two).json()["results"]) == 2
    err = assert_error(client.post("/v1/classify", files=three), 413, "too_many_pixels")
    assert "together" in err["message"]
    big = Settings(max_upload_bytes=2 * len(png) + 10, max_images=4)
    err = assert_error(serve(big).post("/v1/classify", files=three), 413, "too_large")
    five = [("image", ("a.png", b"x", "image/png"))] * 5
    assert_error(client.post("/v1/classify", files=five), 400, "bad_multipart")
    assert_error(client.post("/v1/classify", files=[("image", ("a.png", png, "image/png"))],
                             data={"image": "not a file"}), 400, "missing_image")


def test_several_images_count_against_the_pixel_budget(serve, tiny_bundle, photo):
    clf = GatedClassifier(tiny_bundle(width=0.125))
    client = serve(Settings(max_pixels=25_000, max_pixels_in_flight=30_000, max_batch=1), classifier=clf)
    service = client.app.state.service
    png = encode(photo)
    post = lambda: client.post("/v1/classify", content=png, headers={"content-type": "image/png"})  # noqa: E731
    with held_at_gate(clf, post):
        two = [("image", ("a.png", png, "image/png"))] * 2  # 21,600 more pixels: 32,400 > 30,000
        assert_error(client.post("/v1/classify", files=two), 503, "busy")
    assert [x["image"] for x in client.post("/v1/classify", files=two).json()["results"]] == ["a.png", "a.png"]
    assert service.pixels_in_flight == 0


def test_openapi_documents_several_images(serve):
    schema = serve().get("/openapi.json").json()
    detect = schema["paths"]["/v1/detect"]["post"]
    field = detect["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]["image"]
    assert field["type"] == "array" and "results" in field["description"]
    refs = json.dumps(detect["responses"]["200"])
    assert "DetectResponse" in refs and "DetectResults" in refs and "408" in detect["responses"]
    assert schema["components"]["schemas"]["DetectResults"]["examples"][0]["results"][1]["status"] == 400


def test_several_images_that_do_not_fit_the_queue_get_503_and_leave_nothing_queued(serve, tiny_bundle, photo):
    clf = GatedClassifier(tiny_bundle(width=0.125))
    client = serve(Settings(queue_size=1, max_batch=1), classifier=clf)
    service = client.app.state.service
    png = encode(photo)
    post = lambda: client.post("/v1/classify", content=png, headers={"content-type": "image/png"})  # noqa: E731
    with held_at_gate(clf, post):
        two = [("image", ("a.png", png, "image/png"))] * 2  # one fits the queue, the second does not
        assert_error(client.post("/v1/classify", files=two), 503, "queue_full")
    wait_until(lambda: service.batcher.dropped == 1, what="the first image's job dropped, never run")
    assert service.batcher.depth == 0 and service.pixels_in_flight == 0


# ---- multipart bodies refused whole; file fields named 'image' only; offline API docs ------------------------


def multipart_body(parts: list[tuple[str, str, bytes]], boundary: str = "cut-here-7") -> tuple[bytes, dict]:
    """A multipart/form-data body of ``(field, Content-Disposition filename parameters, data)`` parts."""
    out = b"".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"{params}\r\nContent-Type: "
                   f"image/png\r\n\r\n".encode() + data + b"\r\n" for field, params, data in parts)
    return out + f"--{boundary}--\r\n".encode(), {"content-type": f"multipart/form-data; boundary={boundary}"}


def test_a_multipart_body_cut_short_is_refused_whole_not_answered_with_fewer_images(serve, both, photo):
    classifier, detector = both
    client = serve(classifier=classifier, detector=detector)
    images = [encode(photo), encode(np.ascontiguousarray(photo[:80])), encode(np.ascontiguousarray(photo[:70]))]
    full, headers = multipart_body([("image", f'; filename="{n}.png"', d) for n, d in zip("abc", images)])
    third, second = full.rindex(images[2][:50]), full.index(images[1][:50])
    cuts = {"in the third image": third + len(images[2]) // 2, "the closing '--' missing": len(full) - 4,
            "before the closing boundary": full.rindex(b"\r\n--cut-here-7--"), "in the third part's headers":
            third - 20, "in the second image": second + 100}
    for route in ("/v1/detect?max_detections=3", "/v1/classify"):
        r = client.post(route, content=full, headers=headers)
        assert r.status_code == 200 and [x["image"] for x in r.json()["results"]] == ["a.png", "b.png", "c.png"]
        for where, cut in cuts.items():
            err = assert_error(client.post(route, content=full[:cut], headers=headers), 400, "bad_multipart")
            assert "closing boundary" in err["message"] and "send it again" in err["message"], (where, err)
    assert client.app.state.service.pixels_in_flight == 0


def test_file_fields_of_another_name_are_refused_by_name(serve, photo):
    png = encode(photo)
    client = serve(Settings(max_images=2))
    files = [("image", ("a.png", png, "image/png")), ("thumbnail", ("t.png", png, "image/png"))]
    err = assert_error(client.post("/v1/classify", files=files), 400, "unexpected_file_field")
    assert "'thumbnail'" in err["message"] and "called 'image'" in err["message"]
    # not counted as images: two images and another file is about the other file, not IRCNN_MAX_IMAGES
    err = assert_error(client.post("/v1/classify", files=[files[0], files[0], files[1]]), 400,
                       "unexpected_file_field")
    assert "'thumbnail'" in err["message"]
    err = assert_error(client.post("/v1/classify", files=[files[1]]), 400, "missing_image")
    assert "'thumbnail' must be called 'image'" in err["message"]
    r = client.post("/v1/classify", files=[files[0], files[0]], data={"note": "text fields are ignored"})
    assert r.status_code == 200 and len(r.json()["results"]) == 2


def test_an_extended_filename_parameter_is_a_file_part(serve, photo):
    client = serve()
    png = encode(photo)
    body, headers = multipart_body([("image", "; filename*=UTF-8''caf%C3%A9.png", png)])
    r = client.post("/v1/classify", content=body, headers=headers)
    assert r.status_code == 200, r.text
    assert r.json()["image"] == "café.png"
    body, headers = multipart_body([("image", "; filename*=UTF-8''caf%C3%A9.png", png),
                                    ("image", '; filename="b.png"', png)])
    assert [x["image"] for x in client.post("/v1/classify", content=body, headers=headers).json()["results"]] == [
        "café.png", "b.png"]


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_api_docs_load_nothing_from_another_host(serve, page):
    client = serve()
    r = client.get(page)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert not re.search(r"(https?:)?//[a-z0-9]", r.text, re.IGNORECASE), r.text  # no address on another host
    assets = re.findall(r'(?:src|href)="([^"]+)"', r.text)
    assert any(a.endswith(".js") for a in assets) and (page == "/redoc" or any(a.endswith(".css") for a in assets))
    for asset in assets:
        assert asset.startswith("/"), asset
        got = client.get(asset)
        assert got.status_code == 200 and len(got.content) > 100, asset
        kind = {"js": "javascript", "css": "text/css", "png": "image/png"}[asset.rsplit(".", 1)[-1]]
        assert kind in got.headers["content-type"], (asset, got.headers["content-type"])
    assert "/openapi.json" in r.text and client.get("/openapi.json").status_code == 200
    if page == "/docs":
        redirect = client.get("/docs/oauth2-redirect")
        assert redirect.status_code == 200 and not re.search(r"https?://", redirect.text)


def test_the_page_slider_starts_where_save_vis_draws():
    """Both start at 0.3, where detections of the det200-from-cls1000 defaults were mostly right on the dev split
    (docs/detection.md, "What a score is")."""
    import re
    from pathlib import Path

    from service.batch import BatchConfig

    page = (Path(__file__).resolve().parents[2] / "service" / "static" / "index.html").read_text()
    value = re.search(r'<input id="threshold"[^>]*value="([0-9.]+)"', page).group(1)
    shown = re.search(r'<output id="threshold-value"[^>]*>([0-9.]+)</output>', page).group(1)
    assert float(value) == float(shown) == BatchConfig.vis_threshold == 0.3
