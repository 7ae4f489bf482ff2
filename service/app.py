"""The REST service: the HTTP contract of README.md over the same ``Classifier`` and ``Detector`` the CLI calls.

Request path: the route checks the token and the query, streams the body with the byte limit enforced while
reading (``413`` before the rest is buffered, ``408`` when it takes longer than ``upload_timeout_s``), reads each
image's header in a small thread pool (format sniffed from the bytes, pixel count checked), counts those pixels
against ``max_pixels_in_flight`` (``503`` + ``Retry-After`` beyond it), decodes, and hands the decoded images to
the ``MicroBatcher``: a bounded queue (``503`` + ``Retry-After`` when full) in front of the one thread that owns
the networks. The pixels stay counted until the answer is built, so decoded images held by requests (decoding,
queued or running) never exceed the budget, whatever arrives. While waiting, the route watches the connection; a
client that leaves cancels its jobs, which the worker then skips. Every error is ``{"error": {"code",
"message"}}``; input never causes a 500.

Several images in one multipart request (repeated ``image`` fields) are answered as ``{"results": [...]}``, one
entry per field in the order sent: the single-image answer, or ``{"image", "status", "error"}`` for an image
that failed alone. One ``image`` field keeps the single-image answer (and its error statuses).

Run it with ``ircnn serve`` (uvicorn), or ``uvicorn --factory service.app:create_app``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import torch
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from detector.classify import CROP_SCHEMES, Classifier, check_aspect
from detector.image import ImageError, decode_image, image_size
from proposals.selective_search import ProposalError
from service.batching import Job, MicroBatcher, QueueFull
from service.metrics import Metrics
from service.settings import Settings

log = logging.getLogger("ircnn.service")

STATIC_DIR = Path(__file__).parent / "static"
MULTIPART_SLACK = 64 * 1024  # boundaries and part headers around the file, beyond max_upload_bytes
DECODE_THREADS = 4  # concurrent decodes: each may hold a max_pixels image, so this bounds memory too
MAX_DETECTIONS = 1000  # the loaded detector's cap per image; a request asks for its max_detections best of them
CLIENT_CLOSED = 499  # nginx's "client closed request": recorded in metrics, never seen by anyone

# ImageError code -> HTTP status. Too many pixels is a size limit like too many bytes, hence 413.
IMAGE_ERROR_STATUS = {"empty": 400, "corrupt": 400, "truncated": 400, "bad_aspect": 400, "too_large": 413,
                      "too_many_pixels": 413, "not_an_image": 415}
NON_FINITE = ("the model produced NaN or infinite scores, so its weights are broken (this is not the image's "
              "fault); check the bundle with `ircnn model info` and replace it")


class ApiError(Exception):
    """An answer other than 200: becomes ``{"error": {"code", "message"}}`` with ``status``."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


class ModelOutputError(RuntimeError):
    """The networks returned NaN or infinite values: a broken model, answered 500 (never ``"prob": null``)."""


# ---- response models (the OpenAPI schema and its examples) ------------------------------------------------


class ErrorDetail(BaseModel):
    code: str = Field(description="stable machine-readable reason, e.g. not_an_image, too_large, queue_full")
    message: str = Field(description="what went wrong and what to do, for people")


class ErrorResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"error": {"code": "not_an_image", "message": "not a supported image (JPEG, PNG, WebP, BMP or TIFF "
                   "expected)"}}]})
    error: ErrorDetail


class ClassPrediction(BaseModel):
    index: int = Field(description="row of the network's output (0..999 for ILSVRC's classes)")
    wnid: str
    name: str
    prob: float = Field(description="softmax probability averaged over crops and ensemble members")


class ClassifyResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"image": "cat.jpg", "width": 500, "height": 375, "crops": 10, "members": 1,
         "top_k": [{"index": 281, "wnid": "n02123045", "name": "tabby", "prob": 0.61},
                   {"index": 282, "wnid": "n02123159", "name": "tiger cat", "prob": 0.22}]}]})
    image: str | None = Field(None, description="the uploaded file's name (multipart), else null")
    width: int
    height: int
    crops: int
    members: int
    top_k: list[ClassPrediction]


class FailedImage(BaseModel):
    image: str | None = Field(None, description="the uploaded file's name")
    status: int = Field(description="the HTTP status a request with this image alone would have got")
    error: ErrorDetail


class ClassifyResults(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"results": [
        {"image": "cat.jpg", "width": 500, "height": 375, "crops": 1, "members": 1,
         "top_k": [{"index": 281, "wnid": "n02123045", "name": "tabby", "prob": 0.61}]},
        {"image": "notes.txt", "status": 415, "error": {"code": "not_an_image", "message": "not a supported image "
                                                        "(JPEG, PNG, WebP, BMP or TIFF expected)"}}]}]})
    results: list[ClassifyResponse | FailedImage] = Field(description="one per `image` field, in the order sent")


class Detection(BaseModel):
    box: list[float] = Field(min_length=4, max_length=4, description="x1, y1, x2, y2 in pixels of the image")
    det_id: int = Field(description="ILSVRC DET class id, 1..200")
    wnid: str
    name: str
    score: float


class DetectResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"image": "birds.jpg", "width": 640, "height": 480, "detections": [
            {"box": [12.0, 40.5, 230.0, 310.0], "det_id": 26, "wnid": "n01503061", "name": "bird", "score": 0.91}]}]})
    image: str | None = Field(None, description="the uploaded file's name (multipart), else null")
    width: int
    height: int
    detections: list[Detection]


class DetectResults(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"results": [
        {"image": "birds.jpg", "width": 640, "height": 480, "detections": [
            {"box": [12.0, 40.5, 230.0, 310.0], "det_id": 26, "wnid": "n01503061", "name": "bird", "score": 0.91}]},
        {"image": "half.jpg", "status": 400, "error": {"code": "truncated", "message": "image data is truncated: "
                                                       "Corrupt JPEG data: premature end of data segment"}}]}]})
    results: list[DetectResponse | FailedImage] = Field(description="one per `image` field, in the order sent")


class ModelInfo(BaseModel):
    task: str = Field(description="cls1000, det200, det200-from-cls1000 or classes")
    serves: list[str] = Field(description="the /v1 routes this bundle answers")
    members: int
    classes: int
    arch: dict[str, Any]
    preprocess: dict[str, Any]
    multibox: str | None
    provenance: dict[str, Any]
    path: str | None


class ModelsResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"models": [
        {"task": "cls1000", "serves": ["classify", "detect"], "members": 1, "classes": 1000,
         "arch": {"variant": "torchvision", "width": 1.0, "num_classes": 1000, "aux_logits": False},
         "preprocess": {"size": 224, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
         "multibox": None, "provenance": {"source": "torchvision"}, "path": None}]}]})
    models: list[ModelInfo]


class HealthResponse(BaseModel):
    status: str = "ok"


class ReadyResponse(BaseModel):
    ready: bool
    detail: str = Field(description="warming up, ready, or why not")
    queue_depth: int


# ---- the models and their worker ---------------------------------------------------------------------------


@dataclass
class ClassifyJob:
    image: np.ndarray  # uint8 [H, W, 3]
    crops: int
    top_k: int


@dataclass
class DetectJob:
    image: np.ndarray  # uint8 [H, W, 3]
    score_threshold: float
    max_detections: int


class Service:
    """The app's state: settings, models (loaded once), the batcher whose thread owns them, the decoded pixels
    that requests hold (touched on the event loop only), metrics."""

    def __init__(self, settings: Settings, classifier: Classifier | None = None, detector=None) -> None:
        self.settings = settings
        self.classifier = classifier
        self.detector = detector
        self.bundle = None  # the loaded Bundle, for /v1/models and the model_info metric
        self.metrics = Metrics()
        self.batcher = MicroBatcher({"classify": self._classify_batch, "detect": self._detect_batch},
                                    queue_size=settings.queue_size, max_batch=settings.max_batch,
                                    batch_wait_ms=settings.batch_wait_ms, observer=self.metrics)
        self.metrics.watch(self.batcher)
        self.decode_limiter = anyio.CapacityLimiter(DECODE_THREADS)
        self.pixels_in_flight = 0
        self.metrics.pixels_in_flight.set_function(lambda: self.pixels_in_flight)

    # -- lifecycle (lifespan) --

    def load(self) -> None:
        """Load the bundle unless models were injected; runs once, in a thread, before the app takes requests."""
        if self.classifier is None and self.detector is None:
            from detector.bundle import resolve_bundle
            from detector.ensemble import EnsembleConfig

            self.bundle = bundle = resolve_bundle(self.settings.model, device=self.settings.device)
            s = self.settings
            ensemble = EnsembleConfig(batch_size=s.inference_batch_size, precision=s.precision, backend=s.backend)
            try:
                self.classifier = Classifier(bundle, ensemble)
            except ValueError as e:  # e.g. a det200 bundle: no 1000-way head
                log.info("classification off: %s", e)
            self.detector = _build_detector(bundle, ensemble, self.settings)
        if self.classifier is None and self.detector is None:
            raise ValueError("the model bundle can neither classify nor detect")
        if self.bundle is None:  # injected models: the classifier knows its bundle
            self.bundle = getattr(self.classifier, "bundle", None) or getattr(self.detector, "bundle", None)
        info = self.bundle.describe() if self.bundle is not None else {}
        # No bundle path here: /metrics is open to scrapers, /v1/models (behind the token) names it.
        self.metrics.model_info.info({"task": str(info.get("task")), "members": str(info.get("members")),
                                      "variant": str(info.get("arch", {}).get("variant")),
                                      "serves": ",".join(self.serves())})

    def serves(self) -> list[str]:
        return [name for name, part in (("classify", self.classifier), ("detect", self.detector)) if part]

    def warmup(self) -> None:
        """One forward per model on a synthetic image, in the worker thread (first-call allocations, the
        selective search process start) so that /readyz means a request will not pay for them; an error here
        (e.g. non-finite output) keeps /readyz failing."""
        y, x = np.mgrid[0:96, 0:128]
        image = np.stack([x * 2, y * 2, np.full_like(x, 128)], axis=-1).astype(np.uint8)  # smooth: noise would
        image[30:60, 40:90] = (200, 40, 40)  # make selective search slow for nothing
        results = []
        if self.classifier is not None:
            results += self._classify_batch([Job("classify", ClassifyJob(image, 1, 1))])
        if self.detector is not None:
            results += self._detect_batch([Job("detect", DetectJob(image, 1.0, 1))])
            # NMS drops NaN scores silently, so look at the scores of one region before it (test doubles may have
            # no scorer)
            scorer = getattr(self.detector, "scorer", None)
            if scorer is not None and not torch.isfinite(scorer(image, torch.tensor([[0.0, 0.0, 128.0, 96.0]]))).all():
                raise ModelOutputError(NON_FINITE)
        for result in results:
            if isinstance(result, Exception):
                raise result

    def close(self) -> None:
        self.batcher.stop()
        close = getattr(self.detector, "close", None)
        if close is not None:
            close()

    # -- worker thread: one batch of jobs -> one result each --

    def _classify_batch(self, jobs: list[Job]) -> list[dict | Exception]:
        """All jobs with the same crop count go through the ensemble in one forward."""
        clf = self.classifier
        out: list[dict | Exception | None] = [None] * len(jobs)
        by_crops: dict[int, list[int]] = {}
        for i, job in enumerate(jobs):
            by_crops.setdefault(job.payload.crops, []).append(i)
        for crops, rows in by_crops.items():
            start = time.perf_counter()
            probs = clf.probabilities([jobs[i].payload.image for i in rows], crops)  # [len(rows), K]
            seconds = time.perf_counter() - start
            finite = torch.isfinite(probs).all(dim=1)  # [len(rows)]
            for r, i in enumerate(rows):
                self.metrics.stage.labels("classify", "network").observe(seconds)
                if not finite[r]:
                    out[i] = ModelOutputError(NON_FINITE)
                    continue
                top = clf.top_k(probs[r:r + 1], jobs[i].payload.top_k)[0]
                out[i] = {"crops": crops, "members": clf.members, "top_k": top}
        return out

    def _detect_batch(self, jobs: list[Job]) -> list[list[dict] | Exception]:
        """Detection per image, back to back: ``Detector`` scores one image's regions at a time, and those (hundreds
        per image) already fill the ensemble's batches, so joining images would not raise throughput."""
        out: list[list[dict] | Exception] = []
        for job in jobs:
            p: DetectJob = job.payload
            try:
                dets = self.detector.detect(p.image)
            except (ImageError, ProposalError) as e:  # this image's problem, not its neighbours'
                out.append(e)
                continue
            if not torch.isfinite(dets.scores).all():
                out.append(ModelOutputError(NON_FINITE))
                continue
            for stage, seconds in dets.seconds.items():
                self.metrics.stage.labels("detect", stage).observe(seconds)
            keep = (dets.scores >= p.score_threshold).nonzero().flatten()[: p.max_detections]  # best first
            dets = replace(dets, boxes=dets.boxes[keep], scores=dets.scores[keep], det_ids=dets.det_ids[keep])
            out.append(dets.to_json())
        return out


def _build_detector(bundle, ensemble, settings: Settings):
    """A Detector for det200 / det200-from-cls1000 bundles, else None (that bundle only classifies)."""
    from detector.rcnn import DetectConfig, Detector
    from proposals.combine import ProposalConfig

    try:
        config = DetectConfig(max_detections=MAX_DETECTIONS, max_regions=settings.max_regions,
                              whole_objects=settings.whole_objects, ensemble=ensemble,
                              proposals=ProposalConfig(selective_search=settings.selective_search))
        return Detector.from_bundle(bundle, config)
    except ValueError as e:
        log.info("detection off: %s", e)
        return None


# ---- reading and decoding uploads ----------------------------------------------------------------------------


async def _limited_stream(request: Request, limit: int) -> AsyncIterator[bytes]:
    """The request body, chunk by chunk; raises 413 as soon as more than ``limit`` bytes have arrived."""
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise ApiError(413, "too_large", f"the upload is larger than the limit of {limit:,} bytes")
        yield chunk


@dataclass
class Upload:
    name: str | None  # the multipart file name; None for a raw body
    data: bytes


async def read_uploads(request: Request, settings: Settings) -> list[Upload]:
    """The images of a multipart body (one or more fields ``image``) or of a raw ``image/*`` body, all of them
    within ``max_upload_bytes`` together, all received within ``upload_timeout_s``."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    multipart = media_type == "multipart/form-data"
    if not multipart and not media_type.startswith("image/"):
        raise ApiError(415, "unsupported_media_type",
                       f"send the image as multipart/form-data (field 'image') or as the raw body with an image/* "
                       f"content type; got {media_type or 'no content type'!r}")
    max_bytes = settings.max_upload_bytes
    limit = max_bytes + (MULTIPART_SLACK if multipart else 0)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:  # refuse before reading a byte
        raise ApiError(413, "too_large", f"the upload has {int(declared):,} bytes, more than the limit of "
                       f"{max_bytes:,}")
    try:
        with anyio.fail_after(settings.upload_timeout_s):  # a client trickling its body would hold memory
            if not multipart:
                return [Upload(None, b"".join([chunk async for chunk in _limited_stream(request, limit)]))]
            uploads = await _read_multipart(request, limit, settings.max_images)
    except TimeoutError:
        raise ApiError(408, "upload_timeout", f"the request body did not arrive within "
                       f"{settings.upload_timeout_s:g} s (IRCNN_UPLOAD_TIMEOUT_S)") from None
    total = sum(len(u.data) for u in uploads)
    if total > max_bytes:  # the slack covers part headers, not more image bytes
        raise ApiError(413, "too_large", f"the {len(uploads)} images have {total:,} bytes together, more than "
                       f"the limit of {max_bytes:,}")
    return uploads


async def _read_multipart(request: Request, limit: int, max_images: int) -> list[Upload]:
    parser = MultiPartParser(request.headers, _limited_stream(request, limit), max_files=max_images, max_fields=16)
    try:
        form = await parser.parse()
    except MultiPartException as e:
        raise ApiError(400, "bad_multipart", f"malformed multipart body: {e}") from None
    try:
        images = form.getlist("image")
        if not images or not all(isinstance(image, UploadFile) for image in images):
            names = ", ".join(sorted(set(form.keys()))) or "none"
            raise ApiError(400, "missing_image", f"the multipart body needs one or more file fields named 'image' "
                           f"(fields sent: {names})")
        return [Upload(image.filename, await image.read()) for image in images]
    finally:
        await form.close()


def _image_error(e: ImageError) -> ApiError:
    return ApiError(IMAGE_ERROR_STATUS.get(e.code, 400), e.code, str(e))


@asynccontextmanager
async def decoded(service: Service, uploads: list[Upload],
                  classify: bool) -> AsyncIterator[list[np.ndarray | ApiError]]:
    """Each upload decoded (uint8 ``[H, W, 3]``), or the 4xx error of that image alone, off the event loop.

    The pixels that the headers announce are counted against ``max_pixels_in_flight`` before any is decoded
    (``503`` when they do not fit) and stay counted until the block ends, when the answer has been built.
    """
    s = service.settings

    def read_headers() -> list[tuple[int, int] | ApiError]:
        out: list[tuple[int, int] | ApiError] = []
        for upload in uploads:
            try:
                out.append(image_size(upload.data, max_pixels=s.max_pixels, max_bytes=s.max_upload_bytes))
            except ImageError as e:
                out.append(_image_error(e))
        return out

    def decode(sizes: list[tuple[int, int] | ApiError]) -> list[np.ndarray | ApiError]:
        out: list[np.ndarray | ApiError] = []
        for upload, size in zip(uploads, sizes):
            if isinstance(size, ApiError):  # the header was refused
                out.append(size)
                continue
            start = time.perf_counter()
            try:
                image = decode_image(upload.data, max_pixels=s.max_pixels, max_bytes=s.max_upload_bytes)
                if classify:
                    check_aspect(image)
                out.append(image)
            except ImageError as e:
                out.append(_image_error(e))
            service.metrics.stage.labels("classify" if classify else "detect", "decode").observe(
                time.perf_counter() - start)
        return out

    sizes = await anyio.to_thread.run_sync(read_headers, limiter=service.decode_limiter)
    pixels = sum(w * h for w, h in (x for x in sizes if not isinstance(x, ApiError)))
    if pixels > s.max_pixels:  # only several images get here: one is refused by its own header check
        raise ApiError(413, "too_many_pixels", f"the {len(uploads)} images have {pixels:,} pixels together, more "
                       f"than the limit of {s.max_pixels:,} for one request; send fewer per request")
    if service.pixels_in_flight + pixels > s.max_pixels_in_flight:
        retry = str(s.retry_after_s)
        raise ApiError(503, "busy", f"the requests in flight hold {service.pixels_in_flight:,} decoded pixels; "
                       f"{pixels:,} more would pass the limit of {s.max_pixels_in_flight:,} "
                       f"(IRCNN_MAX_PIXELS_IN_FLIGHT); retry after {retry} s", {"Retry-After": retry})
    service.pixels_in_flight += pixels
    try:
        yield await anyio.to_thread.run_sync(decode, sizes, limiter=service.decode_limiter)
    finally:
        service.pixels_in_flight -= pixels


async def _wait_disconnect(request: Request) -> None:
    # After the body is read, the server's receive() blocks until the client goes away (or the response is sent).
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def run_jobs(service: Service, request: Request, kind: str, payloads: list) -> list[Any]:
    """Queue one job per payload and wait for all; an ``ApiError`` in ``payloads`` (an image that failed to
    decode) is passed through, a job's own failure comes back as its ``ApiError``. A client that disconnects
    first cancels the jobs (the worker then skips those it has not started)."""
    retry = str(service.settings.retry_after_s)
    jobs = {i: payload for i, payload in enumerate(payloads) if not isinstance(payload, ApiError)}
    if jobs and not service.batcher.ready.is_set():  # a bad image still gets its 4xx
        raise ApiError(503, "not_ready", "the model is warming up; retry shortly", {"Retry-After": retry})
    futures: dict[int, asyncio.Future] = {}
    try:
        for i, payload in jobs.items():
            futures[i] = asyncio.wrap_future(service.batcher.submit(kind, payload))
    except QueueFull as e:
        for future in futures.values():
            future.cancel()
        raise ApiError(503, "queue_full", f"{e}; retry after {retry} s", {"Retry-After": retry}) from None
    everything = asyncio.gather(*futures.values(), return_exceptions=True)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({everything, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        left = not everything.done()  # the client left (or this task was cancelled): drop the jobs
        if left:
            # A cancelled gather ends later, with CancelledError as its exception (not as "cancelled"): retrieve
            # it so that asyncio does not log it as never retrieved.
            everything.add_done_callback(lambda f: f.cancelled() or f.exception())
            everything.cancel()
    if left:
        raise ClientDisconnect()
    out = list(payloads)
    for i, result in zip(futures, everything.result()):
        out[i] = _job_error(result) if isinstance(result, BaseException) else result
    return out


def _job_error(e: BaseException) -> ApiError:
    if isinstance(e, ImageError):
        return _image_error(e)
    if isinstance(e, ProposalError):
        return ApiError(422, "no_proposals", str(e))
    if isinstance(e, ModelOutputError):
        return ApiError(500, "non_finite_output", str(e))
    raise e  # a bug: the app's handler answers 500 and logs it


# ---- the app ------------------------------------------------------------------------------------------------


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "empty, truncated or corrupt image, malformed multipart, more "
          "`image` fields than IRCNN_MAX_IMAGES"},
    401: {"model": ErrorResponse, "description": "missing or wrong bearer token (when IRCNN_API_TOKEN is set)"},
    404: {"model": ErrorResponse, "description": "the loaded bundle does not serve this task"},
    408: {"model": ErrorResponse, "description": "the body took longer than IRCNN_UPLOAD_TIMEOUT_S to arrive"},
    413: {"model": ErrorResponse, "description": "more bytes than IRCNN_MAX_UPLOAD_BYTES, or more pixels than "
          "IRCNN_MAX_PIXELS (for several images: all of them together)"},
    415: {"model": ErrorResponse, "description": "not an image, or a content type other than multipart/image"},
    422: {"model": ErrorResponse, "description": "a query value out of range"},
    500: {"model": ErrorResponse, "description": "non_finite_output: the model's weights give NaN or infinite "
          "scores; internal: a bug (the server log has it)"},
    503: {"model": ErrorResponse, "description": "queue full, IRCNN_MAX_PIXELS_IN_FLIGHT decoded pixels already "
          "held by requests in flight (busy), or warming up; see Retry-After"},
}

IMAGE_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["image"], "properties": {
        "image": {"type": "array", "minItems": 1, "items": {"type": "string", "format": "binary"},
                  "description": "JPEG, PNG, WebP, BMP or TIFF. One field: the single-image answer. Several "
                  "(repeat the field, up to IRCNN_MAX_IMAGES): {\"results\": [...]}, one per field in order, each "
                  "the single-image answer or {\"image\", \"status\", \"error\"}"}}}},
    "image/*": {"schema": {"type": "string", "format": "binary"}}}}}


def _service(request: Request) -> Service:
    return request.app.state.service


_bearer = HTTPBearer(auto_error=False, description="needed when the server sets IRCNN_API_TOKEN")


def require_token(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:
    token = _service(request).settings.api_token
    if token is None:
        return
    given = credentials.credentials if credentials is not None else ""
    if not hmac.compare_digest(given.encode(), token.get_secret_value().encode()):
        raise ApiError(401, "unauthorized", "this server needs 'Authorization: Bearer <token>' on /v1 routes"
                       if credentials is None else "wrong bearer token", {"WWW-Authenticate": "Bearer"})


def _api_router() -> APIRouter:
    router = APIRouter(prefix="/v1", dependencies=[Depends(require_token)], responses=ERROR_RESPONSES)

    @router.post("/classify", response_model=ClassifyResponse | ClassifyResults, openapi_extra=IMAGE_BODY,
                 summary="Top-k ILSVRC classes of a whole image (section 7's multi-crop testing)")
    async def classify(request: Request,
                       top_k: int = Query(5, ge=1, le=1000, description="classes to return"),
                       crops: int = Query(1, description="test-time crops: 1, 10 or 144",
                                          json_schema_extra={"enum": list(CROP_SCHEMES)}),
                       ) -> ClassifyResponse | ClassifyResults:
        service = _service(request)
        if crops not in CROP_SCHEMES:
            raise ApiError(422, "invalid_query", f"crops must be 1, 10 or 144, got {crops}")
        if service.classifier is None:
            raise ApiError(404, "no_classifier", "the loaded model bundle cannot classify whole images; start "
                           "the service with a cls1000 bundle (IRCNN_MODEL)")
        uploads = await _admit_and_read(service, request)
        async with decoded(service, uploads, classify=True) as images:
            jobs = [im if isinstance(im, ApiError) else ClassifyJob(im, crops, top_k) for im in images]
            results = await run_jobs(service, request, "classify", jobs)
            answers = [r if isinstance(r, ApiError) else
                       ClassifyResponse(image=u.name, width=im.shape[1], height=im.shape[0], **r)
                       for u, im, r in zip(uploads, images, results)]
        return _respond(uploads, answers, ClassifyResults)

    @router.post("/detect", response_model=DetectResponse | DetectResults, openapi_extra=IMAGE_BODY,
                 summary="R-CNN detection over ILSVRC's 200 DET classes")
    async def detect(request: Request,
                     score_threshold: float | None = Query(
                         None, ge=0.0, le=1.0, allow_inf_nan=False, description="keep detections scoring at least "
                         "this (default: all the detector keeps; its own floor is 0.01)"),
                     max_detections: int = Query(100, ge=1, le=MAX_DETECTIONS, description="best detections to "
                                                 "return"),
                     ) -> DetectResponse | DetectResults:
        service = _service(request)
        if service.detector is None:
            raise ApiError(404, "no_detector", "the loaded model bundle cannot detect; start the service with a "
                           "det200 or det200-from-cls1000 bundle (IRCNN_MODEL)")
        uploads = await _admit_and_read(service, request)
        async with decoded(service, uploads, classify=False) as images:
            jobs = [im if isinstance(im, ApiError) else DetectJob(im, score_threshold or 0.0, max_detections)
                    for im in images]
            results = await run_jobs(service, request, "detect", jobs)
            answers = [r if isinstance(r, ApiError) else
                       DetectResponse(image=u.name, width=im.shape[1], height=im.shape[0], detections=r)
                       for u, im, r in zip(uploads, images, results)]
        return _respond(uploads, answers, DetectResults)

    @router.get("/models", response_model=ModelsResponse, summary="The loaded model bundle(s)")
    async def models(request: Request) -> ModelsResponse:
        service = _service(request)
        out = []
        if service.bundle is not None:
            d = service.bundle.describe()
            out.append(ModelInfo(task=d["task"], serves=service.serves(), members=d["members"], classes=d["classes"],
                                 arch=d["arch"], preprocess=d["preprocess"], multibox=d["multibox"],
                                 provenance=d["provenance"], path=d["path"]))
        return ModelsResponse(models=out)

    return router


async def _admit_and_read(service: Service, request: Request) -> list[Upload]:
    # Refuse before reading the body: backpressure should be cheap.
    s, retry = service.settings, str(service.settings.retry_after_s)
    if not service.batcher.has_room():
        raise ApiError(503, "queue_full", f"the queue is full; retry after {retry} s", {"Retry-After": retry})
    if service.pixels_in_flight >= s.max_pixels_in_flight:
        raise ApiError(503, "busy", f"the requests in flight hold the most decoded pixels allowed "
                       f"({s.max_pixels_in_flight:,}, IRCNN_MAX_PIXELS_IN_FLIGHT); retry after {retry} s",
                       {"Retry-After": retry})
    return await read_uploads(request, s)


def _respond(uploads: list[Upload], answers: list, several: type[BaseModel]) -> BaseModel:
    """One image: its answer, or its error as the request's. Several: ``{"results": [...]}`` in order."""
    if len(answers) == 1:
        if isinstance(answers[0], ApiError):
            raise answers[0]
        return answers[0]
    return several(results=[FailedImage(image=u.name, status=a.status, error=ErrorDetail(code=a.code,
                                                                                            message=a.message))
                            if isinstance(a, ApiError) else a for u, a in zip(uploads, answers)])


class MetricsMiddleware:
    """Counts and times every HTTP request by route template and status (pure ASGI: sees the real status)."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500  # what the client gets if the app raises before answering
        start = time.perf_counter()

        async def send_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            label = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(label, scope["method"], str(status)).inc()
            self.metrics.latency.labels(label, scope["method"], str(status)).observe(time.perf_counter() - start)


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return _error(e.status, e.code, e.message, e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        parts = []
        for err in e.errors():
            where = ".".join(str(x) for x in err.get("loc", ()) if x != "query")
            parts.append(f"{where}: {err.get('msg', 'invalid')} (got {str(err.get('input'))[:40]!r})")
        return _error(422, "invalid_query", "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        return _error(e.status_code, codes.get(e.status_code, "http_error"), str(e.detail), e.headers)

    @app.exception_handler(ClientDisconnect)
    async def gone(request: Request, e: ClientDisconnect) -> Response:
        return Response(status_code=CLIENT_CLOSED)  # nobody reads it; metrics record it

    @app.exception_handler(Exception)
    async def bug(request: Request, e: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return _error(500, "internal", "internal server error; the server log has the details")


def server_options(settings: Settings) -> dict[str, Any]:
    """``uvicorn.Config`` keywords for the connection-level limits in ``settings`` (``ircnn serve`` passes them).

    uvicorn has no timeout for reading a request's headers, and ``limit_concurrency`` answers 503 to requests
    beyond it without closing idle sockets: a client that trickles its headers holds a connection until it stops.
    README's service section says what to put in front for that.
    """
    return {"limit_concurrency": settings.limit_concurrency, "timeout_keep_alive": settings.timeout_keep_alive_s,
            "h11_max_incomplete_event_size": settings.max_header_bytes}


def create_app(settings: Settings | None = None, classifier: Classifier | None = None, detector=None) -> FastAPI:
    """The app. Without injected models the bundle (``settings.model``, else the default bundle the CLI uses)
    is loaded once in the lifespan; ``/readyz`` turns ready after a warm-up forward in the worker thread."""
    settings = settings or Settings()
    service = Service(settings, classifier, detector)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await anyio.to_thread.run_sync(service.load)  # a broken bundle stops startup with its message
        service.batcher.start(warmup=service.warmup)
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(service.close)  # uvicorn has finished the in-flight requests

    app = FastAPI(title="inception-rcnn", version="1", lifespan=lifespan,
                  description="GoogLeNet classification and R-CNN detection ('Going deeper with convolutions'). "
                  "Errors are {\"error\": {\"code\", \"message\"}}.")
    app.state.service = service
    app.add_middleware(MetricsMiddleware, metrics=service.metrics)
    _install_error_handlers(app)
    app.include_router(_api_router())

    @app.get("/healthz", response_model=HealthResponse, summary="The process is alive")
    async def healthz() -> HealthResponse:
        return HealthResponse()

    @app.get("/readyz", response_model=ReadyResponse, summary="The model is loaded and warm",
             responses={503: {"model": ReadyResponse, "description": "warming up"}})
    async def readyz() -> Response:
        b = service.batcher
        if not b.ready.is_set():
            body = ReadyResponse(ready=False, detail="warming up", queue_depth=b.depth)
            return JSONResponse(body.model_dump(), 503, {"Retry-After": str(settings.retry_after_s)})
        if b.warmup_error is not None:
            body = ReadyResponse(ready=False, detail=f"warm-up failed: {b.warmup_error}", queue_depth=b.depth)
            return JSONResponse(body.model_dump(), 503)
        return JSONResponse(ReadyResponse(ready=True, detail="ready", queue_depth=b.depth).model_dump())

    @app.get("/metrics", summary="Prometheus text format", response_class=Response)
    async def metrics() -> Response:
        return Response(service.metrics.render(), media_type=service.metrics.content_type)

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        page = STATIC_DIR / "index.html"
        if not page.is_file():
            raise ApiError(404, "not_found", "no web page installed (service/static/index.html); the API is "
                           "under /v1, its documentation at /docs")
        return FileResponse(page, media_type="text/html")

    if STATIC_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
