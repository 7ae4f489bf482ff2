"""Reading uploads: the byte limit enforced while the body streams in, the upload timeout."""

from __future__ import annotations

import asyncio
import time

import pytest
from starlette.requests import Request

from service.api.errors import ApiError
from service.api.uploads import limited_stream, read_uploads
from service.settings import Settings


def test_the_byte_limit_stops_reading_the_body_at_the_limit():
    pulled = []

    async def receive():
        pulled.append(1)
        return {"type": "http.request", "body": b"\x00" * 1000, "more_body": len(pulled) < 1000}

    async def read_all():
        request = Request({"type": "http", "method": "POST", "headers": [], "path": "/"}, receive)
        async for _ in limited_stream(request, 4500):
            pass

    with pytest.raises(ApiError) as e:
        asyncio.run(read_all())
    assert e.value.status == 413 and len(pulled) == 5  # 5 chunks of 1000 bytes, not the 1000 sent


def test_a_body_that_trickles_in_gets_408():
    async def receive():
        await asyncio.sleep(0.05)
        return {"type": "http.request", "body": b"\x00", "more_body": True}  # one byte each 50 ms, forever

    async def read():
        request = Request({"type": "http", "method": "POST", "path": "/", "headers": [
            (b"content-type", b"image/png")]}, receive)
        await read_uploads(request, Settings(upload_timeout_s=0.3))

    start = time.perf_counter()
    with pytest.raises(ApiError) as e:
        asyncio.run(read())
    assert (e.value.status, e.value.code) == (408, "upload_timeout") and time.perf_counter() - start < 5
