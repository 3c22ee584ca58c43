"""Untrusted image input to model tensors, and model tensors back to PNG.

Every image a client sends passes through here, so decoding is defensive: the encoded size, the
declared pixel count and the pixels per encoded byte are checked before any pixel is decoded
(`open_image`, which also says what decoding will cost), decompression-bomb warnings are
errors, truncated files are rejected (LOAD_TRUNCATED_IMAGES stays off), and every decoder
failure becomes an InvalidInput with a one-line message instead of an internal error. A large
JPEG decodes at a reduced DCT scale (see DRAFT_GAP).
"""
from __future__ import annotations

import functools
import io
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from spurguard.server.backends.base import DEFAULT_LIMITS, ImageInput, ImageLimits, PreprocessConfig
from spurguard.server.errors import InvalidInput, ResourceExhausted, SpurguardError, exception_line
from spurguard.vocab import IMAGE_FORMATS

# PIL warns between MAX_IMAGE_PIXELS and twice that, and raises above. The warning is made an
# exception process-wide (warnings.catch_warnings() would scope it but is not thread-safe, and
# decoding runs in threads). Should something reset the filters, nothing passes either: see
# ImageLimits, whose max_pixels is checked right after the header is read.
warnings.filterwarnings("error", category=Image.DecompressionBombWarning)

# Formats whose decoders are in-process and bounded: spurguard.vocab.formats' table, which the dataset
# listing and the CLI's folder expansion share.
FORMATS = tuple(IMAGE_FORMATS)

# Transparent pixels are composited onto mid-gray: the neutral image (0.5 in [0, 1]) that is
# closest to "no evidence" for a classifier, and the image the feature attack starts from.
ALPHA_BACKGROUND = (128, 128, 128)

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_RESAMPLING = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def _check_pixels(width: int, height: int, limits: ImageLimits) -> None:
    if width <= 0 or height <= 0:
        raise InvalidInput(f"image has no pixels ({width}x{height})")
    if width * height > limits.max_pixels:
        raise ResourceExhausted(
            f"image is {width}x{height} = {width * height} pixels, over the limit of {limits.max_pixels}"
        )


# Decompression bombs: an image that claims far more pixels than its bytes can honestly hold.
# Measured (PIL 13; the photos of skimage.data and sklearn's sample images, as PNG, JPEG q50/q75
# and WebP q30/q80/lossless, at their own size and upscaled to 4096 px wide, which smooths them
# and so makes them more compressible): photos stay under 420 pixels a byte; the most
# compressible picture, skimage's checkerboard upscaled 20x as lossless WebP, reaches 772; an
# 8-bit PNG cannot pass ~1030 at all (deflate expands at most 1032x). Far above the 2000 of
# ImageLimits lie forged headers (a 69-byte PNG claiming 6300x6300: 575 000 pixels a byte) and
# flat fills that cost as much to decode as a photo of their size (a 1.6 KB lossless WebP of
# 6300x6300 gray: 25 000 pixels a byte, 0.44 s and 200 MB). Only images of bomb_min_pixels (4 MP)
# and more are checked: below that decoding is cheap, so a flat test frame passes.
def _check_bomb(width: int, height: int, size: int, limits: ImageLimits) -> None:
    pixels = width * height
    if pixels >= limits.bomb_min_pixels and pixels > limits.max_pixels_per_byte * size:
        raise InvalidInput(
            f"image claims {width}x{height} = {pixels} pixels in {size} bytes, {pixels / size:.0f} pixels a "
            f"byte (real images stay under {limits.max_pixels_per_byte:g}): rejected as a decompression bomb"
        )


def _scale_to_uint8(values: np.ndarray, full_scale: float) -> np.ndarray:
    return np.clip(np.rint(values.astype(np.float32) * (255.0 / full_scale)), 0, 255).astype(np.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB.

    16-bit integer modes (and "I", as which PIL opens some 16-bit files) are scaled 65535 -> 255
    (PIL's own convert clips them at 255 instead); float mode "F" is taken as [0, 1]; alpha, also
    palette or colour-key transparency, is composited onto ALPHA_BACKGROUND; everything else
    (L, 1, P, CMYK, YCbCr, ...) goes through PIL's convert.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT_MODES:
        return Image.fromarray(_scale_to_uint8(np.asarray(image), 65535.0)).convert("RGB")
    if mode == "F":
        return Image.fromarray(_scale_to_uint8(np.asarray(image), 1.0)).convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


# A JPEG wider than needed decodes at a reduced DCT scale (1/2, 1/4, 1/8: libjpeg's draft mode,
# 4-16x less work) down to twice the shorter side the resize wants, then resamples as any image
# does. Why twice, not once: measured on efficientnet_lite0 over 36 photo JPEGs of 300-4000 px,
# decoding at that scale moves the features by 1.5% (median; at most 7.8%), less than saving the
# same photos at quality 95 instead of 90 does (3.4%, at most 10%); at the target size itself
# they move by 5% (at most 17%), as much as quality 85 does.
DRAFT_GAP = 2


@dataclass(frozen=True)
class OpenedImage:
    """An image whose header is read and checked but whose pixels are not decoded yet.

    Why two steps: what decoding will cost is known from the header alone, so a request's images
    can be held to its pixel budget, and scheduled by their cost, before any of the work starts
    (see serving.decoding).
    """

    pixels: int  # what decoding makes (a JPEG: at its reduced scale)
    cost: int  # the work, in pixels: those made plus the encoded bytes read
    load: Callable[[], Image.Image]  # decodes: the upright RGB image

    def crop(self, config: PreprocessConfig) -> np.ndarray:
        """Decode, then the uint8 [size,size,3] model crop."""
        return np.asarray(resize_and_crop(self.load(), config))


@contextmanager
def _decoder_errors(limits: ImageLimits) -> Iterator[None]:
    """Any failure of PIL on untrusted bytes as our error, with a one-line message."""
    try:
        yield
    except SpurguardError:
        raise
    except UnidentifiedImageError:
        raise InvalidInput(f"not an image in a supported format ({', '.join(FORMATS)})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # PIL checks its own, larger limit while it opens the file, before _check_pixels can run;
        # a client must learn ours (max_pixels <= PIL's, so this image is over it too).
        raise ResourceExhausted(
            f"image rejected as a decompression bomb: over the limit of {limits.max_pixels} pixels "
            "(the server's ImageLimits.max_pixels)"
        ) from None
    except Exception as error:  # noqa: BLE001 - any decoder failure on untrusted bytes is bad input
        raise InvalidInput(f"corrupt or truncated image: {exception_line(error)}") from None


def _draft(image: Image.Image, resize: int) -> None:
    """Let a JPEG decode at the smallest DCT scale whose shorter side stays >= DRAFT_GAP * resize
    (PIL's draft; other formats ignore it)."""
    ratio = DRAFT_GAP * resize / min(image.size)
    image.draft(None, (math.ceil(image.width * ratio), math.ceil(image.height * ratio)))


def _load_encoded(image: Image.Image, limits: ImageLimits) -> Image.Image:
    # No `with`: closing would invalidate the pixels of an RGB image returned as is.
    with _decoder_errors(limits):
        image.load()
        ImageOps.exif_transpose(image, in_place=True)
        return to_rgb(image)


def _open_encoded(data: bytes | bytearray | memoryview, limits: ImageLimits, resize: int | None) -> OpenedImage:
    size = memoryview(data).nbytes
    if size == 0:
        raise InvalidInput("empty image: 0 bytes")
    if size > limits.max_bytes:
        raise ResourceExhausted(f"encoded image is {size} bytes, over the limit of {limits.max_bytes}")
    with _decoder_errors(limits):
        image = Image.open(io.BytesIO(bytes(data)), formats=FORMATS)
        _check_pixels(image.width, image.height, limits)
        _check_bomb(image.width, image.height, size, limits)
        if resize is not None:
            _draft(image, resize)
    pixels = image.width * image.height
    return OpenedImage(pixels, pixels + size, functools.partial(_load_encoded, image, limits))


def _open_array(array: np.ndarray, limits: ImageLimits) -> OpenedImage:
    if array.dtype != np.uint8:
        raise InvalidInput(f"raw image must be uint8, got {array.dtype}")
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise InvalidInput(f"raw image must be HxW, HxWx3 or HxWx4, got shape {list(array.shape)}")
    _check_pixels(array.shape[1], array.shape[0], limits)
    pixels = array.shape[0] * array.shape[1]
    return OpenedImage(pixels, pixels, lambda: to_rgb(Image.fromarray(np.ascontiguousarray(array))))


def _convert(image: Image.Image) -> Image.Image:
    try:
        return to_rgb(image)
    except Exception as error:  # noqa: BLE001 - a lazily loaded PIL image may be corrupt
        raise InvalidInput(f"cannot convert image to RGB: {exception_line(error)}") from None


def open_image(image: ImageInput, limits: ImageLimits = DEFAULT_LIMITS, resize: int | None = None) -> OpenedImage:
    """Encoded bytes, a raw uint8 array or a PIL image, checked against `limits` without decoding
    a pixel: the header's size, the bytes per pixel of a decompression bomb. `resize`: the
    shorter side the caller resizes to, so that a large JPEG decodes at a reduced scale (None:
    full size)."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return _open_encoded(image, limits, resize)
    if isinstance(image, np.ndarray):
        return _open_array(image, limits)
    if isinstance(image, Image.Image):
        _check_pixels(image.width, image.height, limits)
        return OpenedImage(image.width * image.height, image.width * image.height, functools.partial(_convert, image))
    raise InvalidInput(
        f"unsupported image type {type(image).__name__}: expected encoded bytes, a uint8 array or a PIL image"
    )


def decode_image(data: bytes | bytearray | memoryview, limits: ImageLimits = DEFAULT_LIMITS) -> Image.Image:
    """Encoded bytes (JPEG, PNG, WebP, GIF, BMP, TIFF, PPM, AVIF) to an upright RGB image.

    The first frame of an animation is used; EXIF orientation is applied, so the pixels are
    what a viewer shows.
    """
    return _open_encoded(data, limits, None).load()


def array_to_rgb(array: np.ndarray, limits: ImageLimits = DEFAULT_LIMITS) -> Image.Image:
    """A raw uint8 array, HxW (gray), HxWx3 (RGB) or HxWx4 (RGBA), to an RGB image."""
    return _open_array(array, limits).load()


def load_rgb(image: ImageInput, limits: ImageLimits = DEFAULT_LIMITS) -> Image.Image:
    """Encoded bytes, a raw uint8 array or a PIL image to an RGB PIL image, within `limits`."""
    return open_image(image, limits).load()


def crop_box(width: int, height: int, config: PreprocessConfig) -> tuple[float, float, float, float]:
    """The region of the source image that ends up in the model input.

    Same geometry as torchvision's Resize(resize) + CenterCrop(size): the shorter side becomes
    `resize` (the longer one int(resize * long / short)), then the centre size x size is kept.
    Returned in source-pixel coordinates, so only that region is resampled: an extreme aspect
    ratio never allocates the full resized image.
    """
    if width <= height:
        new_w, new_h = config.resize, int(config.resize * height / width)
    else:
        new_w, new_h = int(config.resize * width / height), config.resize
    left = int(round((new_w - config.size) / 2.0))
    top = int(round((new_h - config.size) / 2.0))
    sx, sy = width / new_w, height / new_h
    return (left * sx, top * sy, (left + config.size) * sx, (top + config.size) * sy)


def resize_and_crop(image: Image.Image, config: PreprocessConfig) -> Image.Image:
    """RGB image to the size x size model input (uint8), per `config`.

    Resampling only the crop box matches resize-then-crop up to +-1 (of 255) on a few pixels.
    """
    box = crop_box(image.width, image.height, config)
    if box[2] - box[0] == config.size and box[3] - box[1] == config.size:
        return image.crop(tuple(int(round(v)) for v in box))  # no scaling: an exact crop
    return image.resize((config.size, config.size), _RESAMPLING[config.interpolation], box=box)


def normalize(pixels: torch.Tensor, config: PreprocessConfig) -> torch.Tensor:
    """uint8 [N,H,W,3] to float32 [N,3,H,W]: x/255, then (x - mean) / std per channel."""
    mean = torch.tensor(config.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(config.std, dtype=torch.float32).view(1, 3, 1, 1)
    x = pixels.permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
    return x.sub_(mean).div_(std).contiguous()


def decode_crop(image: ImageInput, config: PreprocessConfig, limits: ImageLimits = DEFAULT_LIMITS) -> np.ndarray:
    """One image to its uint8 [size,size,3] model crop: the per-image half of preprocessing.

    Torch-free on purpose: it runs in decode threads while the model computes, and a torch op
    there starts an OpenMP team of its own that competes with the forward pass for the cores.
    """
    return open_image(image, limits, config.resize).crop(config)


def stack_crops(crops: Sequence[np.ndarray], config: PreprocessConfig) -> torch.Tensor:
    """uint8 crops to the model's float32 input batch [N,3,size,size]: the batch half, on the
    thread that runs the model."""
    if not crops:
        return torch.empty(0, 3, config.size, config.size)
    return normalize(torch.from_numpy(np.stack(crops)), config)


def preprocess_images(
    images: Sequence[ImageInput], config: PreprocessConfig, limits: ImageLimits = DEFAULT_LIMITS
) -> torch.Tensor:
    """Images to the model's input batch, float32 [N,3,size,size]; errors name the image index."""
    crops = []
    for index, image in enumerate(images):
        try:
            crops.append(decode_crop(image, config, limits))
        except SpurguardError as error:
            if len(images) == 1:
                raise
            raise type(error)(f"image {index}: {error}") from None
    return stack_crops(crops, config)


def denormalize(x: torch.Tensor, config: PreprocessConfig) -> np.ndarray:
    """Inverse of normalize: float [3,H,W] or [N,3,H,W] to uint8 HxWx3 or NxHxWx3 (clipped)."""
    batch = x.detach().to("cpu", torch.float32)
    single = batch.ndim == 3
    if single:
        batch = batch.unsqueeze(0)
    if batch.ndim != 4 or batch.shape[1] != 3:
        raise InvalidInput(f"expected a [3,H,W] or [N,3,H,W] tensor, got {list(x.shape)}")
    mean = torch.tensor(config.mean).view(1, 3, 1, 1)
    std = torch.tensor(config.std).view(1, 3, 1, 1)
    pixels = (batch * std + mean).clamp_(0.0, 1.0).mul_(255.0).round_().to(torch.uint8)
    out = pixels.permute(0, 2, 3, 1).contiguous().numpy()
    return out[0] if single else out


def encode_png(image: np.ndarray) -> bytes:
    """uint8 HxW or HxWx3 array to PNG bytes (lossless, so attack frames keep their pixels)."""
    if image.dtype != np.uint8:
        raise InvalidInput(f"PNG encoding needs uint8 pixels, got {image.dtype}")
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="PNG")
    return buffer.getvalue()
