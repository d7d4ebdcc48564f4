"""Images in: PNG or JPEG bytes, or raw uint8 pixels, to uint8 arrays [H, W, C]; then to a classifier's input.

    encoded bytes ──decode()──┐                      (refused: other formats, truncated or corrupt files,
    raw HWC bytes ──raw()─────┴─► uint8 [H, W, C] ─┐  > max_bytes, > max_pixels read from the header)
                                  C = 1 or 3       └─preprocess(images, spec)──► float32 [N, C', H', W']

Every refusal is an InvalidRequestError naming the image (`images[3]`) and why.
Decoding happens off the event loop (Pillow's decoders release the GIL);
preprocessing runs on the model's batch thread (server/encoders.py).
"""
from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from server.errors import InvalidRequestError

FORMATS = ("PNG", "JPEG")
SIGNATURES = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG"}  # the first bytes of every such file
CHANNEL_MODES = {1: "L", 3: "RGB"}
# Area averaging: each output pixel is the mean of the input pixels it covers, so a large photo shrunk to a
# classifier's input does not alias, and a digit drawn at 4x (32 x 32) shrinks to 8 x 8 exactly as scikit-learn's
# digits were made (pixel counts over 4 x 4 blocks). Upscaling with it replicates pixels (nearest neighbour).
RESIZE_FILTER = Image.Resampling.BOX


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int  # per encoded image
    max_pixels: int  # height x width, of encoded (read from the header, before decoding) and raw images


@dataclass(frozen=True)
class ImageSpec:
    """A classifier's preprocessing (EncoderCard.image): pixel_values = (uint8 / 255 * scale - mean) / std."""

    height: int
    width: int
    channels: int  # 1 (grayscale) or 3 (RGB)
    scale: float
    mean: tuple[float, ...]  # one per channel
    std: tuple[float, ...]

    @classmethod
    def from_card(cls, image: dict) -> "ImageSpec":
        try:
            spec = cls(int(image["height"]), int(image["width"]), int(image["channels"]), float(image["scale"]),
                       tuple(float(m) for m in image["mean"]), tuple(float(s) for s in image["std"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"the card's image preprocessing {image!r} is incomplete ({e!r})") from None
        if spec.channels not in CHANNEL_MODES or spec.height < 1 or spec.width < 1:
            raise ValueError(f"the card's image is {spec.height} x {spec.width} x {spec.channels}; "
                             "channels must be 1 or 3 and the sides at least 1")
        if len(spec.mean) != spec.channels or len(spec.std) != spec.channels or not all(spec.std):
            raise ValueError(f"the card's image mean and std need {spec.channels} values each, std non-zero")
        return spec


def limit_pillow(max_pixels: int) -> None:
    """Pillow's own decompression-bomb guard at our limit, behind the header check in decode(): it refuses
    images over twice MAX_IMAGE_PIXELS with an error and warns above it; decode() refuses those already."""
    Image.MAX_IMAGE_PIXELS = max_pixels
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def _too_many_pixels(field: str, width: int, height: int, limits: ImageLimits) -> InvalidRequestError:
    return InvalidRequestError(field, f"is {width} x {height} = {width * height} pixels; at most "
                                      f"{limits.max_pixels} are allowed")


def decode(data: bytes, limits: ImageLimits, field: str) -> np.ndarray:
    """PNG or JPEG bytes to uint8 [H, W, C], C = 1 (grayscale) or 3 (colour; alpha is dropped)."""
    if not data:
        raise InvalidRequestError(field, "is empty; send PNG or JPEG bytes")
    if len(data) > limits.max_bytes:
        raise InvalidRequestError(field, f"is {len(data)} bytes; at most {limits.max_bytes} per image are allowed")
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:  # also a file cut off inside its header: Pillow then recognizes no format
        claimed = next((name for signature, name in SIGNATURES.items() if data.startswith(signature)), None)
        if claimed:
            raise InvalidRequestError(field, f"cannot be decoded: truncated or corrupt {claimed}") from None
        raise InvalidRequestError(field, "is not a PNG or JPEG image") from None
    except Image.DecompressionBombError as e:  # Pillow's guard (limit_pillow) saw the header first
        claimed = re.search(r"\((\d+) pixels\)", str(e))
        raise InvalidRequestError(field, f"is {claimed.group(1) if claimed else 'too many'} pixels; at most "
                                         f"{limits.max_pixels} are allowed") from None
    except Exception as e:  # a corrupt header: decoders of hostile bytes raise many kinds of error
        raise InvalidRequestError(field, f"cannot be read as {' or '.join(FORMATS)} ({_reason(e)})") from None
    with image:
        width, height = image.size
        if width * height > limits.max_pixels:  # from the header: nothing is decoded yet
            raise _too_many_pixels(field, width, height, limits)
        try:
            image.load()
        except Exception as e:
            raise InvalidRequestError(field, f"cannot be decoded: truncated or corrupt {image.format} "
                                             f"({_reason(e)})") from None
        return _pixels(image)


def _reason(error: Exception) -> str:
    return " ".join(str(error).split())[:120] or type(error).__name__


def _pixels(image: Image.Image) -> np.ndarray:
    if image.mode.startswith("I"):  # 16-bit grayscale PNG: keep the high byte
        return (np.asarray(image, dtype=np.uint32) >> 8).clip(0, 255).astype(np.uint8)[:, :, None]
    if image.mode in ("1", "L", "LA", "La"):
        return np.asarray(image.convert("L"), dtype=np.uint8)[:, :, None]
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def raw(data: bytes, height: int, width: int, channels: int, limits: ImageLimits, field: str) -> np.ndarray:
    """Row-major uint8 pixels (height, width, channels) to uint8 [H, W, C]."""
    if channels not in CHANNEL_MODES:
        raise InvalidRequestError(f"{field}.channels", f"is {channels}; send 1 (grayscale) or 3 (RGB)")
    if height < 1 or width < 1:
        raise InvalidRequestError(field, f"is {height} x {width}; both sides must be at least 1")
    if height * width > limits.max_pixels:
        raise _too_many_pixels(field, width, height, limits)
    expected = height * width * channels
    if len(data) != expected:
        raise InvalidRequestError(f"{field}.data", f"has {len(data)} bytes; height x width x channels = "
                                                   f"{height} x {width} x {channels} needs {expected}")
    return np.frombuffer(data, dtype=np.uint8).reshape(height, width, channels)


def preprocess(images: list[np.ndarray], spec: ImageSpec) -> np.ndarray:
    """uint8 [H, W, C] images to the classifier's pixel_values, float32 [N, C', H', W'] (module docstring)."""
    mode = CHANNEL_MODES[spec.channels]
    mean = np.asarray(spec.mean, dtype=np.float32)[:, None, None]  # [C', 1, 1]
    std = np.asarray(spec.std, dtype=np.float32)[:, None, None]
    out = np.empty((len(images), spec.channels, spec.height, spec.width), dtype=np.float32)  # [N, C', H', W']
    for i, pixels in enumerate(images):
        image = Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)  # uint8: L or RGB
        image = image.convert(mode)  # RGB to L: ITU-R 601-2 luma; L to RGB: the grey in every channel
        if image.size != (spec.width, spec.height):
            image = image.resize((spec.width, spec.height), RESIZE_FILTER)
        x = np.asarray(image, dtype=np.float32).reshape(spec.height, spec.width, spec.channels)  # [H', W', C']
        out[i] = (x.transpose(2, 0, 1) / 255.0 * spec.scale - mean) / std  # [C', H', W']
    return out
