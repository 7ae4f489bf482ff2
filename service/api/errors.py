"""Errors as the HTTP contract gives them: ``{"error": {"code", "message"}}`` with a 4xx status for bad input, a
500 only for a broken model or a bug, and the handlers that turn every exception into that shape."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from detector.image import ImageError
from proposals.selective_search import ProposalError

log = logging.getLogger("ircnn.service")

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


def image_error(e: ImageError) -> ApiError:
    return ApiError(IMAGE_ERROR_STATUS.get(e.code, 400), e.code, str(e))


def job_error(e: BaseException) -> ApiError:
    if isinstance(e, ImageError):
        return image_error(e)
    if isinstance(e, ProposalError):
        return ApiError(422, "no_proposals", str(e))
    if isinstance(e, ModelOutputError):
        return ApiError(500, "non_finite_output", str(e))
    raise e  # a bug: the app's handler answers 500 and logs it


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return error_response(e.status, e.code, e.message, e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        parts = []
        for err in e.errors():
            where = ".".join(str(x) for x in err.get("loc", ()) if x != "query")
            parts.append(f"{where}: {err.get('msg', 'invalid')} (got {str(err.get('input'))[:40]!r})")
        return error_response(422, "invalid_query", "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        return error_response(e.status_code, codes.get(e.status_code, "http_error"), str(e.detail), e.headers)

    @app.exception_handler(ClientDisconnect)
    async def gone(request: Request, e: ClientDisconnect) -> Response:
        return Response(status_code=CLIENT_CLOSED)  # nobody reads it; metrics record it

    @app.exception_handler(Exception)
    async def bug(request: Request, e: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return error_response(500, "internal", "internal server error; the server log has the details")
