"""Decoding untrusted bytes, mode conversions, and preprocessing numbers against numpy."""
from __future__ import annotations

import io
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from spurguard.server.backends.base import ImageLimits, PreprocessConfig
from spurguard.server.backends.images import (
    ALPHA_BACKGROUND,
    crop_box,
    decode_crop,
    decode_image,
    denormalize,
    encode_png,
    load_rgb,
    open_image,
    preprocess_images,
    resize_and_crop,
    to_rgb,
)
from spurguard.server.errors import InvalidInput, ResourceExhausted

from backends_support import png_with_header

RNG = np.random.default_rng(0)


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def photo(width: int = 64, height: int = 48) -> Image.Image:
    """A smooth image (so JPEG keeps it close) with some noise."""
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 / width, yy * 255 / height, (xx + yy) * 127 / (width + height)], axis=-1)
    noisy = base + np.random.default_rng(width * height).normal(0, 8, base.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


# --- decode errors ------------------------------------------------------------------------


def test_empty_bytes() -> None:
    with pytest.raises(InvalidInput, match="empty image"):
        decode_image(b"")


@pytest.mark.parametrize("data", [b"garbage, not an image", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"])
def test_non_image_and_unsupported_format(data: bytes) -> None:
    with pytest.raises(InvalidInput, match="not an image in a supported format"):
        decode_image(data)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_truncated(fmt: str) -> None:
    data = encode(photo(), fmt)
    with pytest.raises(InvalidInput, match="corrupt or truncated image"):
        decode_image(data[: len(data) // 2])


def test_corrupt_png_data() -> None:
    data = bytearray(encode(photo(), "PNG"))
    middle = len(data) // 2  # inside the IDAT chunk's deflate stream
    data[middle : middle + 64] = b"\xff" * 64
    with pytest.raises(InvalidInput, match="corrupt or truncated image"):
        decode_image(bytes(data))


def test_oversized_bytes() -> None:
    data = encode(photo(), "PNG")
    with pytest.raises(ResourceExhausted, match=rf"encoded image is {len(data)} bytes, over the limit of 1000"):
        decode_image(data, ImageLimits(max_bytes=1000))


@pytest.mark.parametrize("pil_warning", ["error", "ignore"])
@pytest.mark.parametrize(
    "width, height",
    [
        (10_000, 5_000),  # 50 MP: over our 40 MP limit, under PIL's: our header check
        (12_000, 10_000),  # 120 MP: PIL's decompression-bomb warning band
        (100_000, 100_000),  # 10 GP: PIL's DecompressionBombError
    ],
)
def test_decompression_bomb_rejected_before_decoding(width: int, height: int, pil_warning: str) -> None:
    """Rejected whether PIL's warning is an error (as images.py sets it) or filtered away."""
    data = png_with_header(width, height)
    assert len(data) < 200
    with warnings.catch_warnings():
        warnings.simplefilter(pil_warning, Image.DecompressionBombWarning)  # type: ignore[arg-type]
        with pytest.raises(ResourceExhausted, match="pixels"):
            decode_image(data)


@pytest.mark.parametrize("width, height", [(12_000, 10_000), (100_000, 100_000)])
def test_decompression_bomb_message_names_the_servers_limit(width: int, height: int) -> None:
    """PIL's own limits (89478485 warns, 178956970 raises) are not the server's; its cap is.
    The warning is an error, as images.py makes it in a server process."""
    with warnings.catch_warnings(), pytest.raises(ResourceExhausted, match=r"limit of 3000 pixels \(the server's") as caught:
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # type: ignore[arg-type]
        decode_image(png_with_header(width, height), ImageLimits(max_pixels=3000))
    assert str(caught.value).startswith("image rejected as a decompression bomb")
    assert "89478485" not in str(caught.value) and "178956970" not in str(caught.value)


def test_no_decompression_bomb_warning_escapes_in_a_fresh_process() -> None:
    """Under the default warning filters of a server process, the warning becomes our error."""
    script = (
        "from spurguard.server.backends.images import decode_image\n"
        "from spurguard.server.errors import ResourceExhausted\n"
        f"data = {png_with_header(12_000, 10_000)!r}\n"
        "try:\n    decode_image(data)\nexcept ResourceExhausted as e:\n    print('REJECTED', e)\n"
    )
    result = subprocess.run(
        [sys.executable, "-W", "default", "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert "REJECTED image rejected as a decompression bomb" in result.stdout
    assert "DecompressionBombWarning" not in result.stderr


def test_pixel_limit_is_configurable() -> None:
    data = encode(photo(64, 48), "PNG")
    with pytest.raises(ResourceExhausted, match=r"64x48 = 3072 pixels, over the limit of 3000"):
        decode_image(data, ImageLimits(max_pixels=3000))
    assert decode_image(data, ImageLimits(max_pixels=3072)).size == (64, 48)


def test_limits_above_pil_are_refused() -> None:
    with pytest.raises(InvalidInput, match="MAX_IMAGE_PIXELS"):
        ImageLimits(max_pixels=10**10)


def test_a_forged_header_is_a_bomb_rejected_before_decoding() -> None:
    """The issue's image: a tiny PNG that claims 6300 x 6300 (under max_pixels) is INVALID_ARGUMENT
    from its header alone, and so is the same claim in any buffer too small to hold it."""
    data = png_with_header(6300, 6300)
    with pytest.raises(InvalidInput, match=r"6300x6300 = 39690000 pixels in \d+ bytes, .* decompression bomb"):
        open_image(data)
    with pytest.raises(InvalidInput, match="decompression bomb"):
        decode_image(data)
    assert open_image(png_with_header(6300, 6300), ImageLimits(max_pixels_per_byte=10**6)).pixels == 6300 * 6300


def test_flat_fills_are_bombs_from_4_megapixels_on() -> None:
    """A lossless WebP of one gray costs a photo's decoding in a few hundred bytes: a bomb at
    2048 x 2048, a fine (if dull) image at 512 x 512."""
    flat = encode(Image.new("L", (2048, 2048), 90), "WEBP", lossless=True)
    with pytest.raises(InvalidInput, match="decompression bomb"):
        open_image(flat)
    small = encode(Image.new("L", (512, 512), 90), "WEBP", lossless=True)
    assert 512 * 512 / len(small) > 2000  # as "compressed" as the bomb, but under bomb_min_pixels
    assert decode_image(small).size == (512, 512)


@pytest.mark.parametrize("fmt, options", [("PNG", {}), ("JPEG", {"quality": 50}), ("WEBP", {"lossless": True})])
def test_the_most_compressible_real_picture_is_no_bomb(fmt: str, options: dict[str, object]) -> None:
    """skimage's checkerboard upscaled 10x, the most compressible real picture measured, passes."""
    board = Image.fromarray(data.checkerboard()).resize((2048, 2048), Image.Resampling.BICUBIC)
    encoded = encode(board, fmt, **options)
    assert open_image(encoded).pixels == 2048 * 2048 and 2048 * 2048 / len(encoded) < ImageLimits().max_pixels_per_byte


def test_a_large_jpeg_decodes_at_a_reduced_scale_close_to_the_full_decode() -> None:
    """Twice the shorter side the resize wants: a 2400 x 1800 JPEG for resize 256 decodes at 1/2
    (1200 x 900: the next scale, 1/4, would leave 450 < 512), and its crop is the full decode's
    within JPEG's own noise; formats without DCT scaling decode whole."""
    config = PreprocessConfig(size=224, resize=256, interpolation="bicubic", mean=MEAN, std=STD)
    big = photo(600, 450).resize((2400, 1800), Image.Resampling.BICUBIC)
    jpeg = encode(big, "JPEG", quality=90)
    opened = open_image(jpeg, resize=config.resize)
    assert opened.pixels == 1200 * 900 and opened.cost == opened.pixels + len(jpeg)
    full = np.asarray(resize_and_crop(decode_image(jpeg), config)).astype(int)
    drafted = opened.crop(config).astype(int)
    assert drafted.shape == full.shape == (224, 224, 3) and np.abs(drafted - full).mean() < 1.0
    assert np.array_equal(decode_crop(jpeg, config), opened.crop(config))
    assert open_image(encode(big, "PNG"), resize=config.resize).pixels == 2400 * 1800
    assert open_image(jpeg).pixels == 2400 * 1800  # no resize named: full size


# --- formats and modes --------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"])
def test_formats_decode_to_rgb(fmt: str) -> None:
    source = photo()
    image = decode_image(encode(source, fmt))
    assert image.mode == "RGB" and image.size == source.size
    if fmt in ("PNG", "BMP", "TIFF"):
        assert np.array_equal(np.asarray(image), np.asarray(source))


def test_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90° clockwise: the viewer shows it upright as height x width
    image = decode_image(encode(photo(64, 48), "JPEG", exif=exif))
    assert image.size == (48, 64)


def test_gray_palette_bilevel_cmyk() -> None:
    gray = Image.fromarray(np.array([[0, 100, 255]], dtype=np.uint8))
    assert np.array_equal(np.asarray(to_rgb(gray))[0, :, 0], [0, 100, 255])
    assert np.array_equal(np.asarray(decode_image(encode(gray, "PNG"))), np.asarray(to_rgb(gray)))
    bilevel = gray.convert("1")
    assert np.array_equal(np.asarray(to_rgb(bilevel))[0, :, 1], [0, 0, 255])
    palette = photo().convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    assert np.array_equal(np.asarray(decode_image(encode(palette, "PNG"))), np.asarray(palette.convert("RGB")))
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))  # full magenta and yellow, no cyan or black: red
    assert np.array_equal(np.asarray(decode_image(encode(cmyk, "JPEG")))[0, 0] // 16, [255 // 16, 0, 0])


def test_sixteen_bit_is_scaled_not_clipped() -> None:
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    image = decode_image(encode(Image.fromarray(values), "PNG"))
    assert np.array_equal(np.asarray(image)[0, :, 0], [0, 1, 128, 255])


def test_float_mode_is_unit_range() -> None:
    image = Image.fromarray(np.array([[0.0, 0.5, 1.0, 7.0]], dtype=np.float32))
    assert np.array_equal(np.asarray(to_rgb(image))[0, :, 2], [0, 128, 255, 255])


def test_alpha_is_composited_on_gray() -> None:
    rgba = np.zeros((1, 3, 4), dtype=np.uint8)
    rgba[0, :, :3] = [200, 10, 50]
    rgba[0, :, 3] = [0, 255, 128]
    expected_half = np.rint((np.array([200, 10, 50]) * 128 + np.array(ALPHA_BACKGROUND) * 127) / 255)
    for decoded in (decode_image(encode(Image.fromarray(rgba), "PNG")), load_rgb(rgba)):
        pixels = np.asarray(decoded).astype(int)
        assert list(pixels[0, 0]) == list(ALPHA_BACKGROUND)
        assert list(pixels[0, 1]) == [200, 10, 50]
        assert np.abs(pixels[0, 2] - expected_half).max() <= 1
    gray_alpha = Image.fromarray(rgba[..., [0, 3]], mode="LA")
    assert list(np.asarray(to_rgb(gray_alpha))[0, 0]) == list(ALPHA_BACKGROUND)


def test_palette_transparency_is_composited() -> None:
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 0, 255])
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0
    pixels = np.asarray(decode_image(encode(palette, "PNG")))
    assert list(pixels[0, 0]) == list(ALPHA_BACKGROUND) and list(pixels[0, 1]) == [0, 0, 255]


def test_raw_arrays() -> None:
    rgb = RNG.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    assert np.array_equal(np.asarray(load_rgb(rgb)), rgb)
    gray = rgb[..., 0]
    assert np.array_equal(np.asarray(load_rgb(gray)), np.repeat(gray[..., None], 3, axis=2))
    assert np.array_equal(np.asarray(load_rgb(rgb[:, ::-1])), rgb[:, ::-1])  # non-contiguous view


@pytest.mark.parametrize(
    "array, message",
    [
        (np.zeros((4, 4, 3), dtype=np.float32), "must be uint8"),
        (np.zeros((4, 4, 2), dtype=np.uint8), "HxW, HxWx3 or HxWx4"),
        (np.zeros((2, 4, 4, 3), dtype=np.uint8), "HxW, HxWx3 or HxWx4"),
        (np.zeros((0, 4, 3), dtype=np.uint8), "no pixels"),
    ],
)
def test_bad_raw_arrays(array: np.ndarray, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        load_rgb(array)


def test_raw_array_pixel_limit() -> None:
    with pytest.raises(ResourceExhausted, match="over the limit"):
        load_rgb(np.zeros((100, 100, 3), dtype=np.uint8), ImageLimits(max_pixels=9999))


def test_unsupported_input_type() -> None:
    with pytest.raises(InvalidInput, match="unsupported image type str"):
        load_rgb("/etc/passwd")  # type: ignore[arg-type]


def test_batch_error_names_the_image() -> None:
    config = PreprocessConfig(size=8, resize=8, interpolation="bilinear", mean=(0, 0, 0), std=(1, 1, 1))
    good = encode(photo(8, 8), "PNG")
    with pytest.raises(InvalidInput, match=r"^image 1: empty image"):
        preprocess_images([good, b"", good], config)


# --- preprocessing numbers ------------------------------------------------------------------

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def reference_normalize(pixels: np.ndarray) -> np.ndarray:
    """Independent numpy: HxWx3 uint8 -> 3xHxW float, (x/255 - mean)/std."""
    x = pixels.astype(np.float64) / 255.0
    return ((x - np.array(MEAN)) / np.array(STD)).transpose(2, 0, 1)


def test_resize_equal_size_square_is_identity_crop() -> None:
    pixels = RNG.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    config = PreprocessConfig(size=16, resize=16, interpolation="bicubic", mean=MEAN, std=STD)
    out = preprocess_images([pixels], config)
    assert out.shape == (1, 3, 16, 16) and out.dtype == torch.float32
    np.testing.assert_allclose(out[0].numpy(), reference_normalize(pixels), atol=1e-6)


@pytest.mark.parametrize(
    "height, width, resize, size, rows, cols",
    [
        (6, 10, 6, 4, slice(1, 5), slice(3, 7)),  # landscape: shorter side already `resize`
        (9, 5, 5, 3, slice(3, 6), slice(1, 4)),  # portrait
        (4, 9, 4, 4, slice(0, 4), slice(2, 6)),  # round((9-4)/2) = round(2.5) = 2, as torchvision
    ],
)
def test_centre_crop_coordinates(height: int, width: int, resize: int, size: int, rows: slice, cols: slice) -> None:
    pixels = RNG.integers(0, 256, (height, width, 3), dtype=np.uint8)
    config = PreprocessConfig(size=size, resize=resize, interpolation="bilinear", mean=MEAN, std=STD)
    out = preprocess_images([pixels], config)
    np.testing.assert_allclose(out[0].numpy(), reference_normalize(pixels[rows, cols]), atol=1e-6)


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize("height, width", [(48, 64), (90, 37), (300, 300)])
def test_resize_then_crop_matches_full_resize(interpolation: str, height: int, width: int) -> None:
    """Resampling only the crop box equals PIL resize of the whole image then a centre crop."""
    pixels = RNG.integers(0, 256, (height, width, 3), dtype=np.uint8)
    config = PreprocessConfig(size=24, resize=28, interpolation=interpolation, mean=MEAN, std=STD)
    short, long = min(height, width), max(height, width)
    new_long = int(28 * long / short)
    new_w, new_h = (28, new_long) if width <= height else (new_long, 28)
    resample = Image.Resampling.BICUBIC if interpolation == "bicubic" else Image.Resampling.BILINEAR
    full = np.asarray(Image.fromarray(pixels).resize((new_w, new_h), resample))
    top, left = int(round((new_h - 24) / 2)), int(round((new_w - 24) / 2))
    expected = reference_normalize(full[top : top + 24, left : left + 24])
    out = preprocess_images([pixels], config)[0].numpy()
    step = 1 / 255 / min(STD)  # one 8-bit level after normalisation
    assert np.abs(out - expected).max() <= step + 1e-5
    assert np.mean(np.abs(out - expected) > 1e-5) < 0.01


def test_extreme_aspect_ratio_stays_small() -> None:
    """A 1 x 20000 strip must not be resized to 256 x 5 120 000 before cropping."""
    config = PreprocessConfig(size=224, resize=256, interpolation="bicubic", mean=MEAN, std=STD)
    box = crop_box(20_000, 1, config)
    assert box[2] - box[0] == pytest.approx(224 / 256) and box[3] - box[1] == pytest.approx(224 / 256)
    assert preprocess_images([np.zeros((1, 20_000, 3), dtype=np.uint8)], config).shape == (1, 3, 224, 224)


def test_all_inputs_agree_and_empty_batch() -> None:
    source = photo(40, 30)
    config = PreprocessConfig(size=24, resize=28, interpolation="bicubic", mean=MEAN, std=STD)
    out = preprocess_images([encode(source, "PNG"), np.asarray(source), source], config)
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])
    assert preprocess_images([], config).shape == (0, 3, 24, 24)


def test_denormalize_inverts_preprocessing_and_png_round_trips() -> None:
    pixels = RNG.integers(0, 256, (2, 12, 12, 3), dtype=np.uint8)
    config = PreprocessConfig(size=12, resize=12, interpolation="bicubic", mean=MEAN, std=STD)
    x = preprocess_images(list(pixels), config)
    assert np.array_equal(denormalize(x, config), pixels)
    single = denormalize(x[1], config)
    assert np.array_equal(single, pixels[1])
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(encode_png(single)))), pixels[1])
    clipped = denormalize(torch.full((3, 2, 2), 100.0), config)
    assert (clipped == 255).all()
