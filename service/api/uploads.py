"""Reading and decoding uploads: the body streamed within the byte limit and the upload timeout, multipart or raw,
and each image decoded off the event loop with its pixels counted against the in-flight budget."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio
import numpy as np
from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from detector.image import ImageError, decode_image, image_size
from detector.pipeline.classify import check_aspect
from service.api.errors import ApiError, image_error
from service.api.worker import Service
from service.settings import Settings

MULTIPART_SLACK = 64 * 1024  # boundaries and part headers around the file, beyond max_upload_bytes


async def limited_stream(request: Request, limit: int) -> AsyncIterator[bytes]:
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
                return [Upload(None, b"".join([chunk async for chunk in limited_stream(request, limit)]))]
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
    parser = MultiPartParser(request.headers, limited_stream(request, limit), max_files=max_images, max_fields=16)
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
                out.append(image_error(e))
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
                out.append(image_error(e))
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
