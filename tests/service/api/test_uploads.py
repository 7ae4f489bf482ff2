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


# ---- multipart bodies: refused whole when malformed anywhere, file fields named 'image' only ------------------

BOUNDARY = "b0und4ry"


def part(name: str, data: bytes, disposition_extra: str = '; filename="x.png"') -> bytes:
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"{disposition_extra}\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + data + b"\r\n"


def body(*parts: bytes, closing: bytes = f"--{BOUNDARY}--\r\n".encode()) -> bytes:
    return b"".join(parts) + closing


def read(data: bytes, chunk: int = 7, settings: Settings | None = None) -> list:
    """``read_uploads`` over ``data`` sent in chunks of ``chunk`` bytes as a multipart body."""
    chunks = [data[i:i + chunk] for i in range(0, len(data), chunk)] or [b""]

    async def run():
        sent = iter(range(len(chunks)))

        async def receive():
            i = next(sent)
            return {"type": "http.request", "body": chunks[i], "more_body": i < len(chunks) - 1}

        request = Request({"type": "http", "method": "POST", "path": "/", "headers": [
            (b"content-type", f"multipart/form-data; boundary={BOUNDARY}".encode())]}, receive)
        return await read_uploads(request, settings or Settings())

    return asyncio.run(run())


def refused(data: bytes, **kwargs) -> ApiError:
    with pytest.raises(ApiError) as e:
        read(data, **kwargs)
    return e.value


def test_a_complete_body_gives_every_image_part_in_order():
    full = body(part("image", b"one", '; filename="a.png"'), part("image", b"two", '; filename="b.png"'),
                part("image", b"three", '; filename="c.png"'))
    for chunk in (1, 7, len(full)):
        assert [(u.name, u.data) for u in read(full, chunk)] == [("a.png", b"one"), ("b.png", b"two"),
                                                                  ("c.png", b"three")]
    # the closing boundary without its CRLF, or followed by an epilogue, is complete
    assert len(read(full[:-2])) == 3 and len(read(full + b"an epilogue\r\n")) == 3


def test_a_body_cut_anywhere_is_refused_whole_never_answered_with_fewer_images():
    full = body(part("image", b"one"), part("image", b"two"), part("image", b"three"))
    end = len(full) - 2  # '--b0und4ry--' complete; only its CRLF is optional
    for cut in range(1, end):
        e = refused(full[:cut], chunk=5)
        assert (e.status, e.code) == (400, "bad_multipart"), (cut, e.code, e.message)
        assert "malformed multipart body" in e.message and "send" in e.message, e.message
    # the usual cuts name the problem: the closing boundary never came
    for cut in (len(full) - 4, full.index(b"three"), full.index(b"two")):
        assert "closing boundary" in refused(full[:cut]).message


def test_a_body_malformed_anywhere_is_refused_even_with_images_before():
    good = part("image", b"one")
    for bad in (f"--{BOUNDARY}\r\nContent-Disposition: form-data; filename=\"x\"\r\n\r\nno name\r\n".encode(),
                f"--{BOUNDARY}\r\nno colon in this header\r\n\r\ndata\r\n".encode(),
                f"--{BOUNDARY}\r\nContent-Type: image/png\r\n\r\nno disposition\r\n".encode()):
        e = refused(body(good, bad))
        assert (e.status, e.code) == (400, "bad_multipart"), (bad, e.code, e.message)


def test_file_parts_under_another_name_are_refused_by_name_and_not_counted_as_images():
    one = part("image", b"one")
    e = refused(body(one, part("thumbnail", b"t")))
    assert (e.status, e.code) == (400, "unexpected_file_field") and "'thumbnail'" in e.message
    assert "'image'" in e.message, e.message
    e = refused(body(part("picture", b"p")))  # no image at all: still missing_image, naming the field
    assert (e.status, e.code) == (400, "missing_image") and "'picture'" in e.message
    # IRCNN_MAX_IMAGES counts 'image' parts only: two images and a stray file name the stray file
    e = refused(body(one, one, part("extra", b"x")), settings=Settings(max_images=2))
    assert e.code == "unexpected_file_field" and "'extra'" in e.message
    assert len(read(body(one, one), settings=Settings(max_images=2))) == 2
    e = refused(body(one, one, one), settings=Settings(max_images=2))
    assert (e.status, e.code) == (400, "bad_multipart") and "IRCNN_MAX_IMAGES" in e.message
    # text fields are not files: ignored (up to a few), as before
    note = f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nhello\r\n".encode()
    assert [u.data for u in read(body(note, one, note))] == [b"one"]


def test_extended_filename_parameter_makes_a_file_part():
    star = part("image", b"one", "; filename*=UTF-8''caf%C3%A9.png")
    both = part("image", b"two", "; filename=\"cafe.png\"; filename*=UTF-8''caf%C3%A9%202.png")
    latin = part("image", b"three", "; filename*=iso-8859-1'en'%E9t%E9.png")
    assert [(u.name, u.data) for u in read(body(star, both, latin))] == [
        ("café.png", b"one"), ("café 2.png", b"two"), ("été.png", b"three")]
    quoted = part("image", b"q", '; filename="a;b \\"c\\".png"')
    assert [u.name for u in read(body(quoted))] == ['a;b "c".png']
