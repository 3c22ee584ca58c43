"""Untrusted image input to model tensors, and model tensors back to PNG.

Every image a client sends passes through here, so decoding is defensive: the encoded size and
the declared pixel count are checked before any pixel is decoded, decompression-bomb warnings
are errors, truncated files are rejected (LOAD_TRUNCATED_IMAGES stays off), and every decoder
failure becomes an InvalidInput with a one-line message instead of an internal error.
"""
from __future__ import annotations

import io
import warnings
from typing import Sequence

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


def _decode(data: bytes, limits: ImageLimits) -> Image.Image:
    # No `with`: closing would invalidate the pixels of an RGB image returned as is.
    image = Image.open(io.BytesIO(data), formats=FORMATS)
    _check_pixels(image.width, image.height, limits)
    image.load()
    ImageOps.exif_transpose(image, in_place=True)
    return to_rgb(image)


def decode_image(data: bytes | bytearray | memoryview, limits: ImageLimits = DEFAULT_LIMITS) -> Image.Image:
    """Encoded bytes (JPEG, PNG, WebP, GIF, BMP, TIFF, PPM, AVIF) to an upright RGB image.

    The first frame of an animation is used; EXIF orientation is applied, so the pixels are
    what a viewer shows.
    """
    size = memoryview(data).nbytes
    if size == 0:
        raise InvalidInput("empty image: 0 bytes")
    if size > limits.max_bytes:
        raise ResourceExhausted(f"encoded image is {size} bytes, over the limit of {limits.max_bytes}")
    try:
        return _decode(bytes(data), limits)
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


def array_to_rgb(array: np.ndarray, limits: ImageLimits = DEFAULT_LIMITS) -> Image.Image:
    """A raw uint8 array, HxW (gray), HxWx3 (RGB) or HxWx4 (RGBA), to an RGB image."""
    if array.dtype != np.uint8:
        raise InvalidInput(f"raw image must be uint8, got {array.dtype}")
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise InvalidInput(f"raw image must be HxW, HxWx3 or HxWx4, got shape {list(array.shape)}")
    _check_pixels(array.shape[1], array.shape[0], limits)
    return to_rgb(Image.fromarray(np.ascontiguousarray(array)))


def load_rgb(image: ImageInput, limits: ImageLimits = DEFAULT_LIMITS) -> Image.Image:
    """Encoded bytes, a raw uint8 array or a PIL image to an RGB PIL image, within `limits`."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return decode_image(image, limits)
    if isinstance(image, np.ndarray):
        return array_to_rgb(image, limits)
    if isinstance(image, Image.Image):
        _check_pixels(image.width, image.height, limits)
        try:
            return to_rgb(image)
        except Exception as error:  # noqa: BLE001 - a lazily loaded PIL image may be corrupt
            raise InvalidInput(f"cannot convert image to RGB: {exception_line(error)}") from None
    raise InvalidInput(
        f"unsupported image type {type(image).__name__}: expected encoded bytes, a uint8 array or a PIL image"
    )


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
    return np.asarray(resize_and_crop(load_rgb(image, limits), config))


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
