"""Reading and decoding uploads: the body streamed within the byte limit and the upload timeout, multipart or raw,
and each image decoded off the event loop with its pixels counted against the in-flight budget."""

from __future__ import annotations

import codecs
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from urllib.parse import unquote

import anyio
import numpy as np
from fastapi import Request

try:
    from python_multipart import MultipartParser
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import parse_options_header
except ImportError:  # pragma: no cover (python-multipart < 0.0.13 names its module multipart)
    from multipart import MultipartParser
    from multipart.exceptions import FormParserError
    from multipart.multipart import parse_options_header

from detector.image import ImageError, decode_image, image_size
from detector.pipeline.classify import check_aspect
from service.api.errors import ApiError, image_error
from service.api.worker import Service
from service.settings import Settings

MULTIPART_SLACK = 64 * 1024  # boundaries and part headers around the file, beyond max_upload_bytes
MAX_TEXT_FIELDS = 16  # text (non-file) parts in one multipart body, ignored; more is refused
IMAGE_FIELD = "image"
RESEND = ("the request is refused whole: send it again as multipart/form-data, complete, with each image a file "
          "field named 'image' (curl -F image=@photo.jpg)")


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
    """The ``image`` file parts of a multipart body, in order. The whole body is read and must be well formed up to
    its closing boundary: a body that is malformed anywhere, or cut short (even by the final ``--``), is refused
    whole (400 ``bad_multipart``) rather than answered for the images that came before the fault. A file part
    under another name is refused by name (400), never silently dropped."""
    _, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary", b"")
    if not boundary:
        raise _malformed("the content type has no boundary parameter")
    reader = _MultipartReader(boundary, max_images)
    async for chunk in limited_stream(request, limit):
        reader.write(chunk)
    return reader.finish()


def _malformed(problem: str) -> ApiError:
    return ApiError(400, "bad_multipart", f"malformed multipart body: {problem}; {RESEND}")


def _names(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:5])
    return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "")


_PARAM = re.compile(r';\s*([^\s=;]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)')


def _disposition_params(value: bytes) -> dict[str, str]:
    """The parameters of a Content-Disposition value (names lower-cased, quoted strings unescaped), the header's
    bytes read as UTF-8 (what browsers send), else Latin-1."""
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        text = value.decode("latin-1")
    out: dict[str, str] = {}
    for key, raw in _PARAM.findall(text):
        raw = raw.strip()
        if len(raw) >= 2 and raw[0] == raw[-1] == '"':
            raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
        out.setdefault(key.lower(), raw)
    return out


def _extended_value(value: str) -> str:
    """An RFC 5987 / 8187 extended parameter value (``filename*=UTF-8''caf%C3%A9.jpg``) decoded."""
    charset, quote1, rest = value.partition("'")
    _language, quote2, encoded = rest.partition("'")
    if not (quote1 and quote2):  # not charset'language'value: take it as percent-encoded UTF-8
        charset, encoded = "utf-8", value
    try:
        encoding = codecs.lookup(charset or "utf-8").name
    except LookupError:
        encoding = "utf-8"
    return unquote(encoded, encoding=encoding, errors="replace")


def _filename(params: dict[str, str]) -> str | None:
    """A part's file name, from ``filename*`` (preferred, as RFC 6266 says) or ``filename``; None for a text
    part. A Windows path (old browsers sent one) is cut to its last component."""
    if "filename*" in params:
        return _extended_value(params["filename*"])
    name = params.get("filename")
    if name is not None and (name[1:3] == ":\\" or name[:2] == "\\\\"):
        name = name.rsplit("\\", 1)[-1]
    return name


class _MultipartReader:
    """python-multipart's streaming parser with callbacks that keep the data of the ``image`` file parts only,
    note every other part by name, and record whether the closing boundary came."""

    def __init__(self, boundary: bytes, max_images: int) -> None:
        self.max_images = max_images
        self.images: list[Upload] = []
        self.other_files: list[str] = []  # file parts under another name (each name once)
        self.text_fields: list[str] = []
        self.ended = False  # the closing boundary was parsed
        self._field, self._value = bytearray(), bytearray()
        self._headers: dict[bytes, bytes] = {}
        self._filename: str | None = None
        self._chunks: list[bytes] | None = None  # the current part's data, when it is an image
        self.boundary = boundary.decode("latin-1")
        try:
            self.parser = MultipartParser(boundary, {
                "on_part_begin": self._part_begin, "on_header_field": self._header_field,
                "on_header_value": self._header_value, "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished, "on_part_data": self._part_data,
                "on_part_end": self._part_end, "on_end": self._end})
        except (FormParserError, ValueError) as e:
            raise _malformed(f"unusable boundary ({e})") from None

    def write(self, chunk: bytes) -> None:
        try:
            written = self.parser.write(chunk)
        except FormParserError as e:
            raise _malformed(str(e)) from None
        if written != len(chunk):  # older python-multipart stops early instead of raising
            raise _malformed("the parser stopped before the end of the body")

    def finish(self) -> list[Upload]:
        if not self.ended:
            shown = self.boundary if len(self.boundary) <= 80 else self.boundary[:80] + "..."
            raise _malformed(f"the body ends before its closing boundary '--{shown}--' (it was cut short, "
                             f"{len(self.images)} complete 'image' part(s) before the end)")
        hint = f"every file must be sent in a field called '{IMAGE_FIELD}'"
        if self.other_files and self.images:
            raise ApiError(400, "unexpected_file_field", f"the multipart body has file field(s) "
                           f"{_names(self.other_files)} that this API does not read: {hint} (repeat the field for "
                           f"several images), or leave the others out; the request is refused whole")
        if not self.images or IMAGE_FIELD in self.text_fields:
            why = []
            if self.other_files:
                why.append(f"the file field(s) {_names(self.other_files)} must be called '{IMAGE_FIELD}'")
            if IMAGE_FIELD in self.text_fields:
                why.append(f"'{IMAGE_FIELD}' was sent as a text field, not as a file (a part with a filename)")
            sent = sorted(set(self.other_files) | set(self.text_fields)) + (
                [IMAGE_FIELD] if self.images else [])
            raise ApiError(400, "missing_image", "the multipart body needs one or more file fields named "
                           f"'{IMAGE_FIELD}' (curl -F image=@photo.jpg); " + ("; ".join(why) or
                           f"fields sent: {', '.join(sent) or 'none'}"))
        return self.images

    # python-multipart's callbacks, in the order it calls them for each part

    def _part_begin(self) -> None:
        self._headers, self._filename, self._chunks = {}, None, None

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        self._headers[bytes(self._field).strip().lower()] = bytes(self._value).strip()
        self._field, self._value = bytearray(), bytearray()

    def _headers_finished(self) -> None:
        disposition = self._headers.get(b"content-disposition")
        if disposition is None:
            raise _malformed("a part has no Content-Disposition header")
        params = _disposition_params(disposition)
        name = params.get("name")
        if name is None:
            raise _malformed("a part's Content-Disposition has no name parameter")
        filename = _filename(params)
        if filename is None:
            self.text_fields.append(name)
            if len(self.text_fields) > MAX_TEXT_FIELDS:
                raise _malformed(f"more than {MAX_TEXT_FIELDS} text fields")
        elif name == IMAGE_FIELD:
            if len(self.images) >= self.max_images:
                raise ApiError(400, "bad_multipart", f"more than {self.max_images} '{IMAGE_FIELD}' fields, the "
                               f"most in one request (IRCNN_MAX_IMAGES); send the others in further requests")
            self._filename, self._chunks = filename, []
        elif name not in self.other_files:
            self.other_files.append(name)  # refused once the body has been read (see finish)

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._chunks is not None:
            self._chunks.append(data[start:end])

    def _part_end(self) -> None:
        if self._chunks is not None:
            self.images.append(Upload(self._filename, b"".join(self._chunks)))
            self._chunks = None

    def _end(self) -> None:
        self.ended = True


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
