import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from detector.image import ImageError, decode_image, image_size, list_images, read_image


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture
def rgb():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF", "WEBP"])
def test_lossless_formats_round_trip(rgb, fmt):
    kw = {"lossless": True} if fmt == "WEBP" else {}
    out = decode_image(encode(rgb, fmt, **kw))
    assert out.dtype == np.uint8 and out.shape == (30, 40, 3) and out.flags.writeable
    assert np.array_equal(out, np.asarray(rgb))


def test_jpeg_grayscale_and_cmyk_become_rgb(rgb):
    assert decode_image(encode(rgb, "JPEG", quality=95)).shape == (30, 40, 3)
    gray = decode_image(encode(rgb.convert("L"), "PNG"))
    assert gray.shape == (30, 40, 3) and np.array_equal(gray[..., 0], gray[..., 2])
    cmyk = decode_image(encode(rgb.convert("CMYK"), "JPEG", quality=100))
    assert cmyk.shape == (30, 40, 3)
    assert np.abs(cmyk.astype(int) - np.asarray(rgb).astype(int)).mean() < 20


def test_alpha_is_composited_over_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    assert (decode_image(encode(rgba, "PNG")) == 255).all()
    opaque = Image.new("RGBA", (4, 4), (255, 0, 0, 255))
    assert decode_image(encode(opaque, "PNG"))[0, 0].tolist() == [255, 0, 0]


def test_16_bit_png_is_scaled():
    arr = np.full((3, 5), 65535, dtype=np.uint16)
    out = decode_image(encode(Image.fromarray(arr), "PNG"))
    assert out.shape == (3, 5, 3) and (out == 255).all()


@pytest.mark.parametrize("orientation, corner", [
    (1, "top_left"), (3, "bottom_right"),  # as stored; rotated 180 degrees
    (6, "top_right"), (8, "bottom_left"),  # rotated 90 degrees clockwise; counter-clockwise
])
def test_exif_orientation_is_applied(orientation, corner):
    """A red block in the stored image's top-left corner lands where the orientation tag says it is displayed
    (a wrong rotation moves it to another corner, with the same shape)."""
    stored = np.full((30, 40, 3), 40, np.uint8)  # 40 wide, 30 high
    stored[:10, :10] = (230, 20, 20)
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = decode_image(encode(Image.fromarray(stored), "JPEG", exif=exif.tobytes(), quality=95))
    assert out.shape == ((30, 40, 3) if orientation in (1, 3) else (40, 30, 3))
    h, w = out.shape[:2]
    corners = {"top_left": out[:8, :8], "top_right": out[:8, w - 8:], "bottom_left": out[h - 8:, :8],
               "bottom_right": out[h - 8:, w - 8:]}
    red = {name: bool((block[..., 0] > 150).all() and (block[..., 1] < 100).all()) for name, block in corners.items()}
    assert red == {name: name == corner for name in corners}


@pytest.mark.parametrize("data, code", [
    (b"", "empty"),
    (b"hello, I am text", "not_an_image"),
    (b"GIF89a" + b"\x00" * 30, "not_an_image"),  # a real format we do not accept
])
def test_bad_bytes_get_named_errors(data, code):
    with pytest.raises(ImageError) as e:
        decode_image(data)
    assert e.value.code == code


def test_truncated_file_is_an_error(rgb):
    data = encode(rgb.resize((400, 300)), "JPEG")
    with pytest.raises(ImageError) as e:
        decode_image(data[: len(data) // 2])
    assert e.value.code == "truncated"
    png = encode(rgb, "PNG")
    with pytest.raises(ImageError):
        decode_image(png[: len(png) - 40])


@pytest.fixture
def photo_jpeg():
    """A 400 x 300 photo-like JPEG (smooth gradients plus noise: its scan data has real length)."""
    def make(progressive: bool = False) -> bytes:
        rng = np.random.default_rng(3)
        y, x = np.mgrid[0:300, 0:400]
        arr = (np.stack([x, y, x + y], axis=-1) % 256 + rng.integers(0, 60, (300, 400, 3))).clip(0, 255)
        return encode(Image.fromarray(arr.astype(np.uint8)), "JPEG", quality=90, progressive=progressive)
    return make


@pytest.mark.parametrize("progressive", [False, True])
@pytest.mark.parametrize("tail", [b"\xff\xd9", b"garbage\xff\xd9", b"\xff\xfe\x00\x04ab\xff\xd9", b"\xff\xd9" * 50])
def test_a_truncated_jpeg_is_refused_whatever_its_last_bytes(photo_jpeg, progressive, tail):
    # libjpeg fills what is missing with grey and only warns when it meets a marker (here the appended EOI)
    # before the scan data is complete; PIL alone accepted these.
    data = photo_jpeg(progressive)
    assert decode_image(data).shape == (300, 400, 3)
    with pytest.raises(ImageError) as e:
        decode_image(data[: len(data) // 2] + tail)
    assert e.value.code == "truncated" and "premature end" in str(e.value)


def test_a_600_byte_jpeg_claiming_6000_by_6000_is_refused_before_decoding():
    data = bytearray(encode(Image.new("RGB", (8, 8), (90, 120, 200)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", 6000, 6000)  # SOF0 height, width
    data = bytes(data)
    assert len(data) < 1000 and image_size(data) == (6000, 6000)  # the size the service budgets from
    with pytest.raises(ImageError) as e:
        decode_image(data)
    assert e.value.code == "truncated"
    with pytest.raises(ImageError) as e:
        image_size(data, max_pixels=6000 * 6000 - 1)
    assert e.value.code == "too_many_pixels"


def test_a_jpeg_with_bytes_after_its_end_is_still_accepted(photo_jpeg):
    data = photo_jpeg()
    assert decode_image(data + b"trailing junk after EOI").shape == (300, 400, 3)
    assert image_size(data) == (400, 300)


def test_pixel_bound_is_checked_before_decoding(rgb):
    with pytest.raises(ImageError, match="more than the limit") as e:
        decode_image(encode(rgb, "PNG"), max_pixels=1000)
    assert e.value.code == "too_many_pixels"
    # a decompression bomb: a tiny file whose header claims 30000 x 30000 pixels
    png = bytearray(encode(Image.new("L", (8, 8)), "PNG"))
    png[16:24] = struct.pack(">II", 30000, 30000)  # IHDR width, height
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))  # IHDR CRC over type + data
    bomb = bytes(png)
    with pytest.raises(ImageError) as e:
        decode_image(bomb)
    assert e.value.code == "too_many_pixels"


def test_byte_bound(rgb, tmp_path):
    data = encode(rgb, "PNG")
    with pytest.raises(ImageError) as e:
        decode_image(data, max_bytes=100)
    assert e.value.code == "too_large"
    (tmp_path / "a.png").write_bytes(data)
    with pytest.raises(ImageError, match="limit"):
        read_image(tmp_path / "a.png", max_bytes=100)
    with pytest.raises(ImageError, match="no such file"):
        read_image(tmp_path / "missing.png")


def test_list_images_recurses_sorted_and_keeps_named_files(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for name in ("d/b.jpg", "d/sub/a.PNG", "d/notes.txt", "x.weird"):
        (tmp_path / name).write_bytes(b"x")
    found = list_images([tmp_path / "d", tmp_path / "x.weird"])
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["d/b.jpg", "d/sub/a.PNG", "x.weird"]


def test_a_tiff_whose_strip_offset_is_a_fraction_is_corrupt():
    """Found by the service's fuzz test: Pillow seeks to a RATIONAL StripOffsets and raises TypeError."""
    data = bytearray(encode(Image.fromarray(np.zeros((24, 32, 3), np.uint8)), "TIFF"))
    ifd = struct.unpack_from("<I", data, 4)[0]
    for i in range(struct.unpack_from("<H", data, ifd)[0]):
        at = ifd + 2 + 12 * i
        if struct.unpack_from("<H", data, at)[0] == 273:  # StripOffsets, made a RATIONAL 8/1 at the file's end
            struct.pack_into("<HII", data, at + 2, 5, 1, len(data))
            data += struct.pack("<II", 8, 1)
    with pytest.raises(ImageError, match="image data is corrupt: .*IFDRational") as e:
        decode_image(bytes(data))
    assert e.value.code == "corrupt"
