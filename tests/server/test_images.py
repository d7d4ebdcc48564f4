"""Images in (server/images.py): real PNG, JPEG and GIF bytes made by Pillow here, raw pixels, preprocessing."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from server import images
from server.errors import InvalidRequestError
from server.images import ImageLimits, ImageSpec

LIMITS = ImageLimits(max_bytes=1 << 20, max_pixels=4096 * 4096)


def encoded(pixels: np.ndarray, format: str = "PNG", **save) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=format, **save)
    return out.getvalue()


def random_pixels(shape, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def refusal(call, *args) -> str:
    with pytest.raises(InvalidRequestError) as caught:
        call(*args)
    return str(caught.value)


# ---- decode ----

def test_grayscale_png_decodes_to_its_exact_pixels_with_one_channel():
    pixels = random_pixels((7, 5))
    got = images.decode(encoded(pixels), LIMITS, "images[0]")
    assert got.dtype == np.uint8 and got.shape == (7, 5, 1)
    np.testing.assert_array_equal(got[:, :, 0], pixels)


def test_rgb_png_decodes_to_its_exact_pixels_and_rgba_loses_only_its_alpha():
    rgb = random_pixels((6, 9, 3), seed=1)
    np.testing.assert_array_equal(images.decode(encoded(rgb), LIMITS, "images[0]"), rgb)
    rgba = np.concatenate([rgb, random_pixels((6, 9, 1), seed=2)], axis=2)
    np.testing.assert_array_equal(images.decode(encoded(rgba), LIMITS, "images[0]"), rgb)


def test_jpeg_decodes_close_to_what_was_encoded():
    # A smooth gradient: JPEG at quality 95 stays within a few levels of it (lossy, so not exactly).
    ramp = np.tile(np.linspace(0, 255, 32, dtype=np.float32), (32, 1))
    pixels = np.stack([ramp, ramp.T, np.full_like(ramp, 128)], axis=2).astype(np.uint8)  # [32, 32, 3]
    got = images.decode(encoded(pixels, "JPEG", quality=95), LIMITS, "images[0]")
    assert got.shape == (32, 32, 3)
    assert np.abs(got.astype(int) - pixels).mean() < 3


def test_a_truncated_png_is_refused_naming_the_image():
    data = encoded(random_pixels((64, 64, 3)))
    message = refusal(images.decode, data[: len(data) // 2], LIMITS, "images[3]")
    assert message.startswith("images[3]: ") and "truncated or corrupt PNG" in message, message


def test_a_file_cut_off_inside_its_header_is_refused_as_truncated_not_as_another_format():
    data = encoded(random_pixels((64, 64, 3)))
    assert "truncated or corrupt PNG" in refusal(images.decode, data[:40], LIMITS, "images[0]")


def test_a_truncated_jpeg_is_refused():
    data = encoded(random_pixels((64, 64, 3)), "JPEG")
    assert "truncated or corrupt JPEG" in refusal(images.decode, data[: len(data) // 2], LIMITS, "images[0]")


def test_a_gif_is_refused_as_another_format():
    message = refusal(images.decode, encoded(random_pixels((8, 8)), "GIF"), LIMITS, "images[1]")
    assert message == "images[1]: is not a PNG or JPEG image"


def test_bytes_that_are_no_image_and_empty_bytes_are_refused():
    assert "is not a PNG or JPEG image" in refusal(images.decode, b"hello, world", LIMITS, "images[0]")
    assert "is empty" in refusal(images.decode, b"", LIMITS, "images[0]")


def test_an_image_over_max_bytes_is_refused_before_it_is_read():
    data = encoded(random_pixels((64, 64, 3)))
    message = refusal(images.decode, data, ImageLimits(max_bytes=len(data) - 1, max_pixels=1 << 30), "images[2]")
    assert message == f"images[2]: is {len(data)} bytes; at most {len(data) - 1} per image are allowed"


def png_claiming(width: int, height: int) -> bytes:
    """A small valid PNG whose header claims width x height: what a decompression bomb's header looks like."""
    data = encoded(np.zeros((4, 4), np.uint8))
    assert data[12:16] == b"IHDR"
    ihdr = b"IHDR" + struct.pack(">II", width, height) + data[24:29]
    return data[:8] + data[8:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + data[33:]


# Pillow warns of the size before our check refuses it; the server silences that warning (images.limit_pillow).
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_an_image_whose_header_claims_too_many_pixels_is_refused_before_decoding():
    # 20e6 pixels from under 100 bytes. Decoding would fail otherwise (the data holds 4 x 4): the header check came
    # first.
    message = refusal(images.decode, png_claiming(5000, 4000), LIMITS, "images[0]")
    assert message == f"images[0]: is 5000 x 4000 = 20000000 pixels; at most {4096 * 4096} are allowed"


def test_pillows_own_guard_at_the_same_limit_refuses_alike(monkeypatch):
    # Pillow refuses in Image.open what has over twice its MAX_IMAGE_PIXELS, before the header check: the same answer.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4096 * 4096)  # what limit_pillow sets; restored after the test
    message = refusal(images.decode, png_claiming(50_000, 40_000), LIMITS, "images[0]")  # 2e9 pixels, 2 GB decoded
    assert message == f"images[0]: is 2000000000 pixels; at most {4096 * 4096} are allowed"


# ---- raw ----

def test_raw_pixels_are_taken_as_height_width_channels():
    pixels = random_pixels((3, 4, 3))
    got = images.raw(pixels.tobytes(), 3, 4, 3, LIMITS, "images[0].raw")
    np.testing.assert_array_equal(got, pixels)


@pytest.mark.parametrize("length", [3 * 4 - 1, 3 * 4 + 1, 0])
def test_raw_data_of_the_wrong_length_is_refused_naming_the_length_needed(length):
    message = refusal(images.raw, bytes(length), 3, 4, 1, LIMITS, "images[5].raw")
    assert message == f"images[5].raw.data: has {length} bytes; height x width x channels = 3 x 4 x 1 needs 12"


def test_raw_images_of_other_channel_counts_no_pixels_or_too_many_pixels_are_refused():
    assert "send 1 (grayscale) or 3 (RGB)" in refusal(images.raw, bytes(24), 3, 4, 2, LIMITS, "images[0].raw")
    assert "at least 1" in refusal(images.raw, b"", 0, 4, 1, LIMITS, "images[0].raw")
    small = ImageLimits(max_bytes=1 << 20, max_pixels=11)
    assert "at most 11 are allowed" in refusal(images.raw, bytes(12), 3, 4, 1, small, "images[0].raw")


# ---- preprocess ----

DIGIT_SPEC = ImageSpec(height=8, width=8, channels=1, scale=1.0, mean=(0.25,), std=(0.5,))


def test_a_digit_drawn_at_four_times_its_size_shrinks_back_to_its_own_pixels():
    digit = random_pixels((8, 8), seed=3)
    large = np.kron(digit, np.ones((4, 4), np.uint8))[:, :, None]  # [32, 32, 1]: each pixel a 4 x 4 block
    got = images.preprocess([large], DIGIT_SPEC)
    assert got.dtype == np.float32 and got.shape == (1, 1, 8, 8)
    np.testing.assert_allclose(got[0, 0], (digit / 255.0 - 0.25) / 0.5, rtol=0, atol=1e-6)


def test_preprocessing_is_the_cards_formula_per_channel():
    spec = ImageSpec(height=2, width=3, channels=3, scale=2.0, mean=(0.1, 0.2, 0.3), std=(1.0, 2.0, 4.0))
    pixels = random_pixels((2, 3, 3), seed=4)
    got = images.preprocess([pixels], spec)[0]  # [3, 2, 3]
    want = (pixels.transpose(2, 0, 1) / 255.0 * 2.0 - np.array([0.1, 0.2, 0.3])[:, None, None]) \
        / np.array([1.0, 2.0, 4.0])[:, None, None]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_colour_images_turn_grey_by_luma_and_grey_images_fill_every_colour_channel():
    red = np.zeros((8, 8, 3), np.uint8)
    red[..., 0] = 255
    grey = images.preprocess([red], ImageSpec(8, 8, 1, 1.0, (0.0,), (1.0,)))
    assert np.allclose(grey, round(0.299 * 255) / 255, atol=1 / 255)  # ITU-R 601-2 luma of pure red
    level = np.full((8, 8, 1), 200, np.uint8)
    colour = images.preprocess([level], ImageSpec(8, 8, 3, 1.0, (0.0,) * 3, (1.0,) * 3))
    assert colour.shape == (1, 3, 8, 8) and np.allclose(colour, 200 / 255, atol=1e-6)


def test_a_batch_keeps_the_order_of_its_images():
    batch = [np.full((8, 8, 1), level, np.uint8) for level in (0, 100, 255)]
    got = images.preprocess(batch, ImageSpec(8, 8, 1, 1.0, (0.0,), (1.0,)))
    assert got.shape == (3, 1, 8, 8)
    assert [round(float(x[0, 0, 0]) * 255) for x in got] == [0, 100, 255]


@pytest.mark.parametrize("image", [
    {"height": 8, "width": 8, "channels": 1, "scale": 1.0, "mean": [0.5]},  # no std
    {"height": 8, "width": 8, "channels": 2, "scale": 1.0, "mean": [0.5, 0.5], "std": [1.0, 1.0]},
    {"height": 8, "width": 8, "channels": 3, "scale": 1.0, "mean": [0.5], "std": [1.0]},
    {"height": 8, "width": 8, "channels": 1, "scale": 1.0, "mean": [0.5], "std": [0.0]},
])
def test_a_card_with_incomplete_or_inconsistent_preprocessing_is_refused(image):
    with pytest.raises(ValueError):
        ImageSpec.from_card(image)
