"""Decoding and preprocessing: geometry of each fit, normalisation, channel order, layout, refusal of bad
images, the server's pixel limit (not Pillow's), 16-bit and 32-bit pixels, EXIF orientation (in decoding and
in the client's overlay), and the bilinear upsampling of maps against PyTorch."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from onnxplain.client.overlay import overlay
from onnxplain.kernels import images
from onnxplain.kernels.images import ImageError, Preprocessing

IDENTITY = dict(scale=1.0, mean=(0, 0, 0), std=(1, 1, 1))   # the sample is the 8-bit pixels themselves


def encoded(array, fmt="PNG", **options) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **options)
    return buf.getvalue()


def png_header(width, height) -> bytes:
    """A greyscale PNG that claims width x height pixels and holds almost none: only its header is valid."""
    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b""))


def gradient_image(height, width):
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x % 256, y % 256, (x + y) % 256], -1).astype(np.uint8)


@pytest.mark.parametrize("fit, size, expected", [
    ("stretch", (300, 200), (0, 0, 300, 200)),
    ("center_crop", (300, 200), (50, 0, 250, 200)),
    ("center_crop", (200, 300), (0, 50, 200, 250)),
    ("shorter_side", (300, 200), (150 - 224 / 256 * 200 / 2, 100 - 224 / 256 * 200 / 2,
                                  150 + 224 / 256 * 200 / 2, 100 + 224 / 256 * 200 / 2)),
])
def test_crop_box(fit, size, expected):
    pre = Preprocessing(224, 224, fit=fit, resize_shorter=256 if fit == "shorter_side" else 0)
    np.testing.assert_allclose(images.crop_box(*size, pre), expected)


def test_normalisation_channel_order_and_layout():
    array = gradient_image(64, 64)
    rgb = Preprocessing(64, 64, fit="stretch", scale=0.5, mean=(1, 2, 3), std=(2, 4, 8))
    x = images.preprocess(Image.fromarray(array), rgb).sample
    expected = (array.astype(np.float32) * 0.5 - [1, 2, 3]) / [2, 4, 8]
    np.testing.assert_allclose(x, expected.transpose(2, 0, 1), rtol=1e-6)
    bgr = Preprocessing(64, 64, fit="stretch", scale=0.5, mean=(1, 2, 3), std=(2, 4, 8), channel_order="BGR",
                        layout="NHWC")
    y = images.preprocess(Image.fromarray(array), bgr).sample
    np.testing.assert_allclose(y, (array[..., ::-1].astype(np.float32) * 0.5 - [1, 2, 3]) / [2, 4, 8], rtol=1e-6)


def test_grey_and_rgba_images_become_rgb():
    pre = Preprocessing(16, 16, fit="stretch")
    for mode_array in (np.full((20, 20), 100, np.uint8), np.full((20, 20, 4), 100, np.uint8)):
        x = images.preprocess(images.decode(encoded(mode_array), 10 ** 6), pre).sample
        assert x.shape == (3, 16, 16)


NOISE = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)


@pytest.mark.parametrize("data, message", [
    (b"", "empty"),
    (b"hello", "cannot be decoded"),
    (encoded(NOISE)[:2000], "cannot be decoded"),
    (encoded(NOISE, "JPEG")[:1000], "cannot be decoded"),
], ids=["empty", "garbage", "truncated-png", "truncated-jpeg"])
def test_bad_images_are_refused(data, message):
    with pytest.raises(ImageError, match=message):
        images.decode(data, 10 ** 6)


def test_too_many_pixels_are_refused_before_decoding():
    data = encoded(np.zeros((3000, 3000), np.uint8))
    with pytest.raises(ImageError, match="limit is 1000000"):
        images.decode(data, 1_000_000)


def test_undecodable_image_message_lists_the_formats_and_no_object_address():
    for data in (b"hello", b"GIF89a-not-really"):
        with pytest.raises(ImageError, match="cannot be decoded") as refused:
            images.decode(data, 10 ** 6)
        message = str(refused.value)
        assert "PNG, JPEG" in message and "0x" not in message and "object at" not in message, message


def test_the_servers_pixel_limit_applies_not_pillows(monkeypatch):
    # Pillow refuses images over 2 * Image.MAX_IMAGE_PIXELS in Image.open (and warns over it): a header of
    # 60000x60000 got Pillow's "exceeds limit of 178956970 pixels", never the server's limit.
    with pytest.raises(ImageError, match="60000x60000 = 3600000000 pixels; the limit is 40000000"):
        images.decode(png_header(60000, 60000), 40_000_000)
    # An image under the server's limit but over Pillow's decodes (Pillow's limit lowered so that the
    # images stay small), without touching Pillow's process-wide limit.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    pre = Preprocessing(16, 16, fit="stretch", **IDENTITY)
    for shape, fmt in (((40, 40), "PNG"), ((64, 64), "PNG"), ((64, 64, 3), "JPEG"), ((64, 64), "GIF")):
        array = np.full(shape, 100, np.uint8)
        decoded = images.decode(encoded(array, fmt), 10 ** 6)
        assert decoded.size == (shape[1], shape[0])
        np.testing.assert_allclose(images.preprocess(decoded, pre).sample, 100, atol=2)
    assert Image.MAX_IMAGE_PIXELS == 1000
    with pytest.raises(ImageError, match="64x64 = 4096 pixels; the limit is 4000"):
        images.decode(encoded(np.zeros((64, 64), np.uint8)), 4000)


def sixteen_bit_gradient():
    y, x = np.mgrid[0:48, 0:64]
    return (x * 1024 + y * 20 + (x * y) % 97).clip(0, 65535).astype(np.uint16)   # 0..65535, not multiples of 257


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_greyscale_is_scaled_to_8_bits_not_clipped(fmt):
    array = sixteen_bit_gradient()
    expected = np.floor(array / 257 + 0.5)
    decoded = images.decode(encoded(array, fmt), 10 ** 6)
    for pre in (Preprocessing(48, 64, fit="stretch", **IDENTITY),
                Preprocessing(48, 64, fit="stretch", scale=1.0, mean=(0,), std=(1,), channels=1)):
        x = images.preprocess(decoded, pre).sample
        np.testing.assert_array_equal(x, np.broadcast_to(expected, x.shape))
    x = images.preprocess(Image.fromarray(array), Preprocessing(48, 64, fit="stretch", **IDENTITY)).sample
    np.testing.assert_array_equal(x, np.broadcast_to(expected, x.shape))


@pytest.mark.parametrize("array, mode", [(np.arange(64, dtype=np.int32).reshape(8, 8) * 1000, "mode I"),
                                         (np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8), "mode F")])
def test_32_bit_integer_and_float_images_are_refused_by_mode(array, mode):
    with pytest.raises(ImageError, match=mode):
        images.decode(encoded(array, "TIFF"), 10 ** 6)
    with pytest.raises(ImageError, match=mode):
        images.preprocess(Image.fromarray(array), Preprocessing(8, 8))


# EXIF orientation -> the transpose that turns the displayed picture into the stored one (the inverse of the
# one that displays it).
STORED = {1: None, 2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
          4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90,
          7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_270}


def with_orientation(displayed: np.ndarray, orientation: int, fmt="PNG") -> bytes:
    stored = Image.fromarray(displayed)
    if STORED[orientation] is not None:
        stored = stored.transpose(STORED[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    stored.save(buf, format=fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_to_pixels_and_geometry(orientation):
    displayed = gradient_image(40, 96)                       # 96 wide, 40 high as it displays
    decoded = images.decode(with_orientation(displayed, orientation), 10 ** 6)
    np.testing.assert_array_equal(np.asarray(decoded), displayed)
    prepared = images.preprocess(decoded, Preprocessing(32, 32, fit="center_crop"))
    g = prepared.geometry
    assert (g.original_width, g.original_height) == (96, 40)
    assert g.crop == pytest.approx((28, 0, 68, 40))          # the centre square of the displayed picture


def test_exif_orientation_of_a_jpeg_and_its_overlay():
    # The repro's phone photo: stored 64x128, EXIF orientation 6, displays 128x64 with a white left half.
    displayed = np.zeros((64, 128, 3), np.uint8)
    displayed[:, :64] = 255
    data = with_orientation(displayed, 6, "JPEG")
    assert Image.open(io.BytesIO(data)).size == (64, 128)
    decoded = images.decode(data, 10 ** 6)
    assert decoded.size == (128, 64)
    assert np.asarray(decoded)[:, :60].min() > 240 and np.asarray(decoded)[:, 68:].max() < 15
    g = images.preprocess(decoded, Preprocessing(32, 32, fit="center_crop")).geometry
    assert (g.original_width, g.original_height, g.crop) == (128, 64, (32.0, 0.0, 96.0, 64.0))
    # The client draws the map over the picture as it displays, where the geometry's crop lies: the map's
    # hot left half lands on the picture's white half, the dimmed margins on the displayed sides.
    saliency = np.zeros((32, 32), np.float32)
    saliency[:, :16] = 1
    with Image.open(io.BytesIO(data)) as original:
        drawn = np.asarray(overlay(original, saliency, g.crop), np.float32)
    assert drawn.shape == (64, 128, 3)
    np.testing.assert_allclose(drawn[:, :28], 127.5, atol=8)        # white, dimmed outside the crop
    np.testing.assert_allclose(drawn[:, 100:], 0, atol=8)           # black, dimmed
    hot = np.array([253, 231, 37], np.float32)                      # viridis at 1
    np.testing.assert_allclose(drawn[8:56, 36:60], np.broadcast_to(0.45 * 255 + 0.55 * hot, (48, 24, 3)), atol=8)


def test_overlay_of_a_16_bit_picture_is_not_white():
    array = sixteen_bit_gradient()
    with Image.open(io.BytesIO(encoded(array))) as original:
        drawn = np.asarray(overlay(original, np.zeros((8, 8), np.float32), (0, 0, 8, 8)), np.float32)
    dimmed = np.repeat(np.floor(array / 257 + 0.5)[..., None] * 0.5, 3, -1)     # outside the crop
    np.testing.assert_allclose(drawn[8:], dimmed[8:], atol=1)
    np.testing.assert_allclose(drawn[:, 8:], dimmed[:, 8:], atol=1)


def test_check_sample():
    pre = Preprocessing(8, 8)
    good = np.zeros((3, 8, 8), np.float32)
    assert images.check_sample(good[None], pre).shape == (3, 8, 8)
    for bad, message in ((np.zeros((8, 8, 3), np.float32), "shape"), (good.astype(np.float16), "dtype"),
                         (np.full((3, 8, 8), np.nan, np.float32), "NaN")):
        with pytest.raises(ImageError, match=message):
            images.check_sample(bad, pre)


@pytest.mark.parametrize("src, dst", [((7, 7), (224, 224)), ((5, 9), (33, 20)), ((14, 14), (14, 14)), ((3, 4), (2, 2))])
def test_upsample_matches_torch_bilinear_half_pixel(src, dst):
    torch = pytest.importorskip("torch")
    maps = np.random.default_rng(0).normal(size=(2, *src)).astype(np.float32)
    expected = torch.nn.functional.interpolate(torch.from_numpy(maps)[None], size=dst, mode="bilinear",
                                               align_corners=False)[0].numpy()
    np.testing.assert_allclose(images.upsample_bilinear(maps, *dst), expected, atol=1e-5)


@pytest.mark.parametrize("src, dst", [((12, 12), (96, 96)), ((7, 7), (224, 224)), ((5, 9), (33, 20)),
                                      ((13, 11), (100, 77)), ((14, 14), (14, 14)), ((30, 30), (20, 7)),
                                      ((1, 4), (9, 9))])
def test_extreme_samples_hold_every_upsampled_maps_minimum_and_maximum(src, dst):
    """kernels.methods.perturb's normalised_upsample reads a map's extremes from these rows x columns only."""
    rows, cols = images.extreme_samples(src[0], dst[0]), images.extreme_samples(src[1], dst[1])
    assert len(rows) <= min(dst[0], 2 * src[0]) and len(cols) <= min(dst[1], 2 * src[1])
    wy = images.linear_weights(src[0], dst[0]).astype(np.float64)
    wx = images.linear_weights(src[1], dst[1]).astype(np.float64)
    rng = np.random.default_rng(1)
    for maps in (rng.normal(size=(300, *src)), rng.random((300, *src)) ** 8,
                 np.maximum(rng.normal(size=(300, *src)), 0)):
        up = np.einsum("yh,nhw,xw->nyx", wy, maps, wx)
        probe = up[:, rows][:, :, cols]
        np.testing.assert_allclose(probe.max(axis=(1, 2)), up.max(axis=(1, 2)), rtol=0, atol=1e-12)
        np.testing.assert_allclose(probe.min(axis=(1, 2)), up.min(axis=(1, 2)), rtol=0, atol=1e-12)
    if src[0] > 2 and dst[0] > 2 * src[0]:     # and it is a selection: some pixels in between are left out
        assert len(rows) < dst[0]
