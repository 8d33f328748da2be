"""Decoding and preprocessing of images into model inputs.

A model declares its preprocessing once (`Preprocessing`); the server turns every decoded image into exactly
one sample of the model's input with it, and reports where that sample lies in the original picture
(`Geometry`) so that maps computed at the input's resolution can be drawn over the original.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageOps

FITS = ("stretch", "center_crop", "shorter_side")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The encoded formats decode reads: common raster formats whose Pillow decoders run no external program (EPS
# would run Ghostscript). WEBP only where Pillow was built with libwebp.
FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")


class ImageError(ValueError):
    """An image that cannot be used: corrupt, truncated, too large, or of the wrong shape."""


@dataclass(frozen=True)
class Preprocessing:
    """x = (pixel * scale - mean[c]) / std[c], after geometry by `fit` (see service.proto's Preprocessing)."""

    height: int
    width: int
    fit: str = "center_crop"
    resize_shorter: int = 0
    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    channel_order: str = "RGB"
    layout: str = "NCHW"
    channels: int = 3

    def __post_init__(self):
        if self.fit not in FITS:
            raise ValueError(f"preprocessing.fit must be one of {FITS}, got {self.fit!r}")
        if self.channel_order not in ("RGB", "BGR"):
            raise ValueError(f"preprocessing.channel_order must be RGB or BGR, got {self.channel_order!r}")
        if self.layout not in ("NCHW", "NHWC"):
            raise ValueError(f"preprocessing.layout must be NCHW or NHWC, got {self.layout!r}")
        if self.height < 1 or self.width < 1:
            raise ValueError(f"preprocessing needs a positive input size, got {self.height}x{self.width}")
        if self.fit == "shorter_side" and self.resize_shorter < max(self.height, self.width):
            raise ValueError("preprocessing.resize_shorter must be >= the input size for fit = shorter_side")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"preprocessing.mean and std need {self.channels} values each")
        if any(s == 0 for s in self.std):
            raise ValueError("preprocessing.std must not contain 0")

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        if self.layout == "NCHW":
            return (self.channels, self.height, self.width)
        return (self.height, self.width, self.channels)


def black_sample(preprocessing: Preprocessing) -> np.ndarray:
    """The preprocessed all-black image (pixel = 0, i.e. -mean / std per channel), one sample in the model's
    layout: the base towards which methods and metrics that mask *the image* blend its pixels."""
    values = -np.asarray(preprocessing.mean, np.float64) / np.asarray(preprocessing.std, np.float64)
    shape = preprocessing.sample_shape
    if preprocessing.layout == "NCHW":
        return np.broadcast_to(values[:, None, None], shape).astype(np.float32)
    return np.broadcast_to(values[None, None, :], shape).astype(np.float32)


@dataclass(frozen=True)
class Geometry:
    """The region [x0, x1) x [y0, y1) of the original image that became the model input."""

    original_width: int
    original_height: int
    crop: tuple[float, float, float, float]
    input_width: int
    input_height: int


@dataclass(frozen=True)
class Prepared:
    sample: np.ndarray      # one model input sample, float32, preprocessing.sample_shape
    geometry: Geometry
    name: str = field(default="")


def decode(data: bytes, max_pixels: int) -> Image.Image:
    """Decode an encoded image as it displays (its EXIF orientation applied, so that geometry and boxes in
    original-image pixels mean the displayed picture); refuse it from its header, before any pixel is decoded,
    if it has more than max_pixels or pixels that cannot be made 8-bit."""
    if not data:
        raise ImageError("image is empty")
    try:
        img = open_header(data)
    except ImageError:
        raise
    except Exception as exc:  # Pillow raises many types for corrupt data (OSError, SyntaxError, ValueError...)
        raise ImageError(f"image cannot be decoded: {type(exc).__name__}: {exc}") from None
    width, height = img.size
    if width < 1 or height < 1:
        raise ImageError(f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageError(f"image has {width}x{height} = {width * height} pixels; the limit is {max_pixels} "
                         "(limits.max_image_pixels)")
    check_depth(img)
    try:
        img.load()
        ImageOps.exif_transpose(img, in_place=True)
    except Image.DecompressionBombError as exc:  # the TIFF decoder checks Pillow's own limit again when it loads
        raise ImageError(f"image is too large for the {img.format} decoder: {exc}") from None
    except Exception as exc:
        raise ImageError(f"image cannot be decoded: {type(exc).__name__}: {exc}") from None
    return img


def open_header(data: bytes) -> Image.Image:
    """The image's header, identified among FORMATS as Image.open does (no pixel is decoded yet), but without
    Image.open's decompression-bomb check: that one compares against Pillow's process-wide MAX_IMAGE_PIXELS,
    while the limit that applies is decode's max_pixels."""
    Image.init()
    readable = [fmt for fmt in FORMATS if fmt in Image.OPEN]
    refused = None
    for fmt in readable:
        factory, accept = Image.OPEN[fmt]
        matched = not accept or accept(data[:16])
        if not matched or isinstance(matched, str):  # a string says why the format cannot be read here
            continue
        try:
            return factory(io.BytesIO(data), "")
        except (SyntaxError, IndexError, TypeError, struct.error) as exc:  # Image.open's "not this format"
            refused = f"not a valid {fmt} file ({exc})"
    formats = ", ".join(readable)
    raise ImageError(f"image cannot be decoded: {refused}; the formats read are {formats}" if refused else
                     f"image cannot be decoded: its format is not one of {formats}")


def check_depth(img: Image.Image) -> None:
    """Refuse 32-bit integer and float pixels: they have no standard range to scale to 8 bits by."""
    if img.mode in ("I", "F") and not sixteen_bit(img):
        kind = "signed or 32-bit integer" if img.mode == "I" else "floating-point"
        raise ImageError(f"image has mode {img.mode} ({kind} pixels), which has no range to scale to 8 bits; "
                         "send 8- or 16-bit images, or a preprocessed tensor")


def sixteen_bit(img: Image.Image) -> bool:
    # A PNG sample has at most 16 bits: mode I from the PNG decoder is 16-bit greyscale.
    return img.mode.startswith("I;16") or (img.mode == "I" and img.format == "PNG")


def eight_bit(img: Image.Image, mode: str) -> Image.Image:
    """img in 8-bit `mode` (L or RGB). Image.convert clips 16-bit greyscale at 255 (a white picture): it is
    scaled here, v / 257 rounded, which maps 0..65535 onto 0..255."""
    if img.mode == mode:
        return img
    check_depth(img)
    if sixteen_bit(img):
        img = Image.fromarray(((np.asarray(img).astype(np.uint32) + 128) // 257).astype(np.uint8))
    try:
        return img.convert(mode)
    except ValueError as exc:
        raise ImageError(f"image has mode {img.mode}, which cannot be converted to {mode}: {exc}") from None


def crop_box(width: int, height: int, pre: Preprocessing) -> tuple[float, float, float, float]:
    """The region of a width x height image that `pre` maps onto the model input."""
    if pre.fit == "stretch":
        return (0.0, 0.0, float(width), float(height))
    if pre.fit == "center_crop":
        aspect = pre.width / pre.height
        cw, ch = (height * aspect, float(height)) if width / height > aspect else (float(width), width / aspect)
    else:  # shorter_side: resize the shorter side to resize_shorter, then crop the input size at the centre
        factor = pre.resize_shorter / min(width, height)
        cw, ch = pre.width / factor, pre.height / factor
    x0, y0 = (width - cw) / 2, (height - ch) / 2
    return (x0, y0, x0 + cw, y0 + ch)


def preprocess(img: Image.Image, pre: Preprocessing, name: str = "") -> Prepared:
    """One decoded image -> one float32 model input sample, by the model's declared preprocessing."""
    img = eight_bit(img, "L" if pre.channels == 1 else "RGB")
    box = crop_box(img.width, img.height, pre)
    resized = img.resize((pre.width, pre.height), Image.Resampling.BILINEAR, box=box)
    pixels = np.asarray(resized, dtype=np.float32)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if pre.channel_order == "BGR":
        pixels = pixels[:, :, ::-1]
    x = (pixels * np.float32(pre.scale) - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)
    if pre.layout == "NCHW":
        x = x.transpose(2, 0, 1)
    geometry = Geometry(img.width, img.height, box, pre.width, pre.height)
    return Prepared(np.ascontiguousarray(x, dtype=np.float32), geometry, name)


def check_sample(x: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """An already preprocessed sample: accept [C,H,W] or [1,C,H,W] (NHWC likewise), finite float32 only."""
    expected = pre.sample_shape
    if x.shape == (1, *expected):
        x = x[0]
    if x.shape != expected:
        raise ImageError(f"tensor has shape {list(x.shape)}; the model takes {list(expected)} "
                         f"or {[1, *expected]} ({pre.layout})")
    if x.dtype != np.float32:
        raise ImageError(f"tensor has dtype {x.dtype}; the model takes float32")
    if not np.isfinite(x).all():
        raise ImageError("tensor contains NaN or Inf")
    return np.ascontiguousarray(x)


def upsample_bilinear(maps: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of [..., h, w] maps with half-pixel centres (ONNX Resize linear / PyTorch
    align_corners=False, no antialiasing), as two small matrix products."""
    h, w = maps.shape[-2:]
    if (h, w) == (height, width):
        return maps.astype(np.float32, copy=False)
    return np.einsum("yh,...hw,xw->...yx", linear_weights(h, height), maps.astype(np.float32),
                     linear_weights(w, width), optimize=True).astype(np.float32)


def _sources(n_in: int, n_out: int) -> np.ndarray:
    """Where each of n_out samples falls among n_in input centres (half-pixel centres, clamped at the borders)."""
    return np.clip((np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5, 0, n_in - 1)


def linear_weights(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] matrix of 1-D linear interpolation with half-pixel centres, clamped at the borders."""
    src = _sources(n_in, n_out)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo
    weights = np.zeros((n_out, n_in))
    np.add.at(weights, (np.arange(n_out), lo), 1 - frac)
    np.add.at(weights, (np.arange(n_out), hi), frac)
    return weights.astype(np.float32)


def extreme_samples(n_in: int, n_out: int) -> np.ndarray:
    """Indices of the samples of linear_weights(n_in, n_out) among which any interpolated signal takes its
    minimum and maximum over all n_out samples: the first and the last sample between each two consecutive input
    centres (the interpolant is linear there). Bilinear interpolation is linear along each axis within each cell
    of four centres, so a map's extremes over all output pixels are among the rows extreme_samples(h, H) x the
    columns extreme_samples(w, W): e.g. 22 x 22 of 96 x 96 pixels for a 12 x 12 map, 12 x 12 of 224 x 224 for 7
    x 7."""
    src = _sources(n_in, n_out)
    keep = {0, n_out - 1}
    for i in range(n_in - 1):
        inside = np.flatnonzero((src >= i) & (src <= i + 1))
        keep.update((int(inside[0]), int(inside[-1])) if len(inside) else ())
    return np.array(sorted(keep))
