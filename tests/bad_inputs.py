"""A corpus of hostile and awkward image uploads, generated in memory (nothing stored).

Each entry is (kind, bytes, declared content type). Some are valid but unusual images (16-bit,
CMYK, animated, EXIF-rotated, elongated); the rest must be refused as that image's error.
"""
from __future__ import annotations

import io
import struct
import zipfile
import zlib

import numpy as np
from PIL import Image

OVERSIZED_BYTES = 300_000  # the corpus's "oversized" entry is above this; tests set max_image_bytes to it
BOMB_PIXELS = 4_000_000  # the bomb is above this; tests set max_pixels to it


def _save(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _rgb(width: int = 32, height: int = 32, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_with_size(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height over a tiny (wrong) payload: a bomb by header."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _png_bomb() -> bytes:
    """A real PNG of 2500 x 2500 zero pixels in about 6 kB (tests set max_pixels to BOMB_PIXELS)."""
    ihdr = struct.pack(">IIBBBBB", 2500, 2500, 8, 0, 0, 0, 0)  # 8-bit grey
    raw = zlib.compress(b"\x00" * (2501 * 2500), 9)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", raw) + _png_chunk(b"IEND", b"")


def _bad_crc_png() -> bytes:
    data = bytearray(_save(_rgb(), "PNG"))
    data[29] ^= 0xFF  # inside IHDR's CRC
    return bytes(data)


def _corrupt_middle(data: bytes) -> bytes:
    data = bytearray(data)
    mid = len(data) // 2
    data[mid:mid + 64] = bytes((b ^ 0x5A) for b in data[mid:mid + 64])
    return bytes(data)


def _frames(count: int = 3) -> list[Image.Image]:
    return [_rgb(24, 24, seed=i) for i in range(count)]


def _exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to view
    return _save(_rgb(40, 20), "JPEG", exif=exif)


def _palette_alpha_png() -> bytes:
    image = _rgb().convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return _save(image, "PNG", transparency=0)


def _multipage_tiff() -> bytes:
    first, *rest = _frames()
    return _save(first, "TIFF", save_all=True, append_images=rest)


def _zip_polyglot() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("payload.txt", "hello")
    return _save(_rgb(), "PNG") + buf.getvalue()


def _bmp_with_size(width: int, height: int) -> bytes:
    data = bytearray(_save(_rgb(4, 4), "BMP"))
    struct.pack_into("<ii", data, 18, width, height)
    return bytes(data)


def _gif_with_size(width: int, height: int) -> bytes:
    data = bytearray(_save(_rgb(4, 4), "GIF"))
    struct.pack_into("<HH", data, 6, width, height)
    return bytes(data)


def _noise_png(side: int) -> bytes:
    return _save(_rgb(side, side, seed=7), "PNG", compress_level=0)


def corpus() -> list[tuple[str, bytes, str]]:
    png, jpeg = _save(_rgb(), "PNG"), _save(_rgb(), "JPEG")
    entries = [
        ("truncated-png", png[: len(png) // 2], "image/png"),
        ("truncated-jpeg", jpeg[: len(jpeg) // 2], "image/jpeg"),
        ("png-bomb", _png_bomb(), "image/png"),
        ("huge-dimensions-png-header", _png_with_size(1_000_000, 1_000_000), "image/png"),
        ("huge-dimensions-gif-header", _gif_with_size(65535, 65535), "image/gif"),
        ("huge-dimensions-bmp-header", _bmp_with_size(100_000, 100_000), "image/bmp"),
        ("zero-width-png", _png_with_size(0, 10), "image/png"),
        ("elongated-wide", _save(_rgb(20000, 1), "PNG"), "image/png"),
        ("elongated-tall", _save(_rgb(1, 20000), "PNG"), "image/png"),
        ("one-pixel", _save(_rgb(1, 1), "PNG"), "image/png"),
        ("16-bit-grey-png", _save(Image.fromarray(np.full((16, 16), 40000, dtype=np.uint16)), "PNG"), "image/png"),
        ("cmyk-jpeg", _save(_rgb().convert("CMYK"), "JPEG"), "image/jpeg"),
        ("palette-alpha-png", _palette_alpha_png(), "image/png"),
        ("grey-alpha-png", _save(_rgb().convert("LA"), "PNG"), "image/png"),
        ("bilevel-png", _save(_rgb().convert("1"), "PNG"), "image/png"),
        ("int32-tiff", _save(Image.fromarray(np.arange(256, dtype=np.int32).reshape(16, 16)), "TIFF"), "image/tiff"),
        ("float-tiff", _save(Image.fromarray(np.linspace(0, 1, 256, dtype=np.float32).reshape(16, 16)), "TIFF"),
         "image/tiff"),
        ("animated-gif", _save(_frames()[0], "GIF", save_all=True, append_images=_frames()[1:]), "image/gif"),
        ("animated-png", _save(_frames()[0], "PNG", save_all=True, append_images=_frames()[1:]), "image/png"),
        ("animated-webp", _save(_frames()[0], "WEBP", save_all=True, append_images=_frames()[1:]), "image/webp"),
        ("multi-page-tiff", _multipage_tiff(), "image/tiff"),
        ("exif-rotated-jpeg", _exif_rotated_jpeg(), "image/jpeg"),
        ("webp-alpha", _save(_rgb().convert("RGBA"), "WEBP", lossless=True), "image/webp"),
        ("truncated-webp", _save(_rgb(), "WEBP")[:40], "image/webp"),
        ("truncated-bmp", _save(_rgb(), "BMP")[:100], "image/bmp"),
        ("corrupt-jpeg-data", _corrupt_middle(_save(_rgb(64, 64), "JPEG")), "image/jpeg"),
        ("bad-crc-png", _bad_crc_png(), "image/png"),
        ("polyglot-png-zip", _zip_polyglot(), "image/png"),
        ("polyglot-gif-script", b"GIF89a/*\x00\x00\x00*/=1;alert(1)//" + b"\x00" * 16, "image/gif"),
        ("zip-as-png", _zip_polyglot()[len(png):], "image/png"),
        ("svg", b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', "image/svg+xml"),
        ("eps", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n", "image/x-eps"),
        ("pdf", b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF", "image/png"),
        ("ico", _save(_rgb(16, 16), "ICO"), "image/x-icon"),
        ("psd-header", b"8BPS\x00\x01" + b"\x00" * 40, "image/png"),
        ("jpeg2000-header", b"\x00\x00\x00\x0cjP  \r\n\x87\n" + b"\x00" * 40, "image/jp2"),
        ("empty", b"", "image/png"),
        ("random-bytes", np.random.default_rng(3).integers(0, 256, 2048, dtype=np.uint8).tobytes(),
         "application/octet-stream"),
        ("plain-text", b"hello, I am not an image", "image/png"),
        ("wrong-content-type", png, "text/plain"),
        ("html-content-type", png, "text/html"),
        ("oversized", _noise_png(320), "image/png"),
    ]
    assert len(_noise_png(320)) > OVERSIZED_BYTES
    return entries
