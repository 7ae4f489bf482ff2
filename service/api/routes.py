"""The /v1 routes: each checks the token and the query, reads and decodes the uploads, queues one job per image
for the worker and answers one image, or several in order."""

from __future__ import annotations

import asyncio
import hmac
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from starlette.requests import ClientDisconnect

from detector.pipeline.classify import CROP_SCHEMES
from service.api.errors import ApiError, job_error
from service.api.schemas import (
    ClassifyResponse,
    ClassifyResults,
    DetectResponse,
    DetectResults,
    ErrorDetail,
    ErrorResponse,
    FailedImage,
    ModelInfo,
    ModelsResponse,
)
from service.api.uploads import Upload, decoded, read_uploads
from service.api.worker import MAX_DETECTIONS, ClassifyJob, DetectJob, Service
from service.batching import QueueFull

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "empty, truncated or corrupt image; malformed multipart anywhere "
          "(a body cut short, without its closing boundary, included: the request is refused whole), more `image` "
          "fields than IRCNN_MAX_IMAGES (bad_multipart); no file field `image` (missing_image); a file field of "
          "another name (unexpected_file_field)"},
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
                  "description": "JPEG, PNG, WebP, BMP or TIFF, each a file part (filename= or filename*=). "
                  "One field: the single-image answer. Several "
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


def api_router() -> APIRouter:
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
                                 arch=d["arch"], preprocess=d["preprocess"], member_sizes=d["member_sizes"],
                                 multibox=d["multibox"], provenance=d["provenance"], path=d["path"]))
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
        out[i] = job_error(result) if isinstance(result, BaseException) else result
    return out
