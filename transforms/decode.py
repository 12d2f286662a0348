"""Decode stage: untrusted bytes -> validated, oriented, RGB, resized JPEG.

Geometry follows img2dataset's resizer (modes border / keep_ratio / center_crop / no, white
border, area-style downscaling) so shards are drop-in compatible, but decoding uses Pillow's JPEG
draft mode: the DCT decodes straight to 1/2, 1/4 or 1/8 scale, which is several times faster than
img2dataset's full cv2 decode for web photos that are much larger than the target size.

Order matters for safety: everything that can be refused from the header alone (bombs, size,
aspect ratio, unknown formats) is refused before a single pixel is decoded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
from typing import Optional

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.config import CurateConfig
from schemas import Col, DropReason

# Pillow's own bomb check raises or warns through the process-global warnings machinery, which is
# not thread-safe to toggle per call; this module checks the declared pixel count itself (with the
# configured limit) before decoding, so Pillow's global check is switched off deliberately.
Image.MAX_IMAGE_PIXELS = None

ACCEPTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF"})
_RGB_LIKE = frozenset({"RGB", "L"})


class ImageRejected(Exception):
    """Raised by `decode_image` with the drop reason for the ledger."""

    def __init__(self, reason: DropReason, detail: str = ""):
        super().__init__(detail or reason.value)
        self.reason = reason
        self.detail = detail


@dataclasses.dataclass
class DecodedImage:
    jpeg_bytes: bytes
    width: int
    height: int
    original_width: int
    original_height: int
    rgb: Image.Image  # oriented RGB image before resizing/padding: what hashing looks at
    thumbnail: Image.Image  # rgb box-reduced to 32x32 (`blank_thumbnail`)


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; transparency is composited on white (as img2dataset does)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit greyscale: scale the sample range into 8 bits instead of clipping at 255.
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array * (255.0 / peak), 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        span = float(array.max() - array.min()) or 1.0
        image = Image.fromarray(((array - array.min()) * (255.0 / span)).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    if image.mode != "RGB":
        return image.convert("RGB")
    return image


def _target_size(width: int, height: int, config: CurateConfig) -> tuple[int, int]:
    """The size the image is scaled to before padding/cropping (same rules as img2dataset)."""
    size = config.image_size
    mode = config.resize_mode
    if mode == "no":
        return width, height
    if mode in ("keep_ratio", "center_crop"):
        if config.resize_only_if_bigger and min(width, height) <= size:
            return width, height
        scale = size / min(width, height)
    else:  # border: the longer side becomes `size`
        if config.resize_only_if_bigger and max(width, height) <= size:
            return width, height
        scale = size / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _resize(image: Image.Image, config: CurateConfig) -> Image.Image:
    target = _target_size(image.width, image.height, config)
    if target != image.size:
        downscale = target[0] * target[1] < image.width * image.height
        # BOX is area averaging, the analogue of cv2.INTER_AREA that img2dataset downscales with.
        resample = Image.Resampling.BOX if downscale else Image.Resampling.LANCZOS
        image = image.resize(target, resample)
    size = config.image_size
    if config.resize_mode == "center_crop" and (image.width > size or image.height > size):
        left = (image.width - size) // 2
        top = (image.height - size) // 2
        image = image.crop((left, top, left + min(size, image.width), top + min(size, image.height)))
    elif config.resize_mode == "border" and (image.width < size or image.height < size):
        canvas = Image.new("RGB", (max(size, image.width), max(size, image.height)), (255, 255, 255))
        canvas.paste(image, ((canvas.width - image.width) // 2, (canvas.height - image.height) // 2))
        image = canvas
    return image


BLANK_THUMB_SIDE = 32


def blank_thumbnail(image: Image.Image) -> Image.Image:
    """The 32x32 box-filtered copy the blank check looks at (also the ledger pHash's input when
    near-dedup is off: pHash reduces to 32x32 first anyway)."""
    return image.resize((BLANK_THUMB_SIDE, BLANK_THUMB_SIDE), Image.Resampling.BOX)


def is_blank(thumbnail: Image.Image, std_threshold: float) -> bool:
    """True when the image's `blank_thumbnail` is near-uniform: the cheap first look of the blank
    rule. An image that passes it has visible structure at 32x32 and is kept without further work;
    one that fails it is blank only if `has_ink` also finds no strokes at the decoded size.

    Per colour channel, not grey level: a red shape on a teal background has almost no
    luminance contrast but is plainly not blank.
    """
    spread = np.asarray(thumbnail, dtype=np.float32).reshape(-1, 3).std(axis=0)
    return float(spread.max()) < std_threshold


# Strokes are looked for on a box-reduced copy whose shorter side is at most this: it bounds the
# work on very large images, while a one-pixel black line of an image up to 4k on a side keeps a
# quarter of its contrast, far above any ink threshold. The box average also damps pixel noise.
_INK_SIDE = 1024
# The background colour and the noise level are estimated on about this many pixels per side (a
# strided sample): enough for a stable median, and cheap next to the decode itself.
_BACKGROUND_SAMPLE_SIDE = 128
# A pixel is ink only if it stands out by this many noise standard deviations too, so uniform
# images with heavy sensor noise stay blank. Gaussian noise has no meaningful mass that far out.
_NOISE_SIGMAS = 6.0
# Median over pixels of the largest of three channels' |gaussian| deviations, in sigmas
# (solves (2*Phi(t) - 1) ** 3 = 1/2): turns the sample's median deviation into a noise sigma.
_MEDIAN_MAX3_ABS_GAUSSIAN = 1.26


def has_ink(rgb: Image.Image, contrast: float, min_pixels: int) -> bool:
    """Does an image whose 32x32 thumbnail looks uniform carry strokes at its decoded size?

    A box thumbnail averages thin strokes away: a one-pixel outline map on white, a few words of
    text, a pencil sketch all reduce to near-white. So the decoded pixels are looked at (large
    images box-reduced to `_INK_SIDE` first). A pixel is ink when some channel differs from the
    background colour (the sample median) by more than `contrast` levels, and by more than the
    image's own noise allows. Ink counts only where it touches other ink (4-neighbourhood):
    strokes are connected, while isolated dust pixels, salt noise and JPEG speckle are not. At
    least `min_pixels` such pixels make the image not blank.
    """
    factor = -(-min(rgb.size) // _INK_SIDE)
    pixels = np.asarray(rgb.reduce(factor) if factor > 1 else rgb)
    height, width = pixels.shape[:2]
    step = max(1, min(height, width) // _BACKGROUND_SAMPLE_SIDE)
    sample = pixels[::step, ::step].reshape(-1, 3)
    background = np.median(sample, axis=0)
    sample_deviation = np.abs(sample.astype(np.int16) - background.astype(np.int16)).max(axis=1)
    noise_sigma = float(np.median(sample_deviation)) / _MEDIAN_MAX3_ABS_GAUSSIAN
    threshold = max(float(contrast), _NOISE_SIGMAS * noise_sigma)
    # Bounds per channel on the uint8 pixels directly: no widened copy of the image.
    ink = np.zeros((height, width), dtype=bool)
    for channel in range(3):
        plane = pixels[..., channel]
        if background[channel] - threshold > 0:
            ink |= plane < background[channel] - threshold
        if background[channel] + threshold < 255:
            ink |= plane > background[channel] + threshold
    if int(np.count_nonzero(ink)) < min_pixels:
        return False
    touching = np.zeros_like(ink)
    touching[1:] |= ink[:-1]
    touching[:-1] |= ink[1:]
    touching[:, 1:] |= ink[:, :-1]
    touching[:, :-1] |= ink[:, 1:]
    return int(np.count_nonzero(ink & touching)) >= min_pixels


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def decode_image(data: bytes, config: CurateConfig, source_size: Optional[tuple[int, int]] = None) -> DecodedImage:
    """Validate and normalise one image. Raises ImageRejected with a DropReason.

    `source_size`: the original image's (width, height) when the bytes are a resized copy whose
    source says what it was resized from (img2dataset shards: `original_width/height` in KEY.json).
    The size rules judge the original, not the copy (a 12x12 picture upscaled to 256x256 is
    too_small), and the record keeps it as the original size."""
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as error:
        raise ImageRejected(DropReason.NOT_AN_IMAGE, f"unrecognised format: {data[:16]!r}") from error
    except Exception as error:  # noqa: BLE001 - corrupt headers raise all sorts of things
        raise ImageRejected(DropReason.DECODE_ERROR, f"{type(error).__name__}: {error}") from error

    if image.format not in ACCEPTED_FORMATS:
        raise ImageRejected(DropReason.NOT_AN_IMAGE, f"format {image.format} not accepted")
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageRejected(DropReason.DECODE_ERROR, f"declared size {width}x{height}")
    if width * height > config.max_pixels:
        raise ImageRejected(DropReason.DECOMPRESSION_BOMB, f"declares {width}x{height} pixels")
    judged_width, judged_height = source_size or (width, height)
    if min(judged_width, judged_height) < config.min_image_size:
        raise ImageRejected(DropReason.TOO_SMALL, f"{judged_width}x{judged_height}")
    if max(judged_width, judged_height) / min(judged_width, judged_height) > config.max_aspect_ratio:
        raise ImageRejected(DropReason.BAD_ASPECT_RATIO, f"{judged_width}x{judged_height}")

    orientation = 1
    try:
        orientation = int(image.getexif().get(0x0112, 1) or 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block is not a broken image
        orientation = 1
    source_format = image.format

    try:
        if source_format not in ("JPEG", "MPO"):
            # verify() checks chunk CRCs and structure for PNG & co on a parser of its own (it
            # consumes it). JPEG's verify is a no-op, so it is skipped there.
            Image.open(io.BytesIO(data)).verify()
        elif config.resize_mode != "no":
            target = _target_size(width, height, config)
            image.draft("RGB", target)  # DCT-domain downscale, never below the target size
        image.load()
    except Image.DecompressionBombError as error:
        raise ImageRejected(DropReason.DECOMPRESSION_BOMB, str(error)) from error
    except Exception as error:  # noqa: BLE001 - truncated / corrupt data
        raise ImageRejected(DropReason.DECODE_ERROR, f"{type(error).__name__}: {error}") from error

    source_mode = image.mode
    try:
        if orientation != 1:
            image = ImageOps.exif_transpose(image)
        rgb = _to_rgb(image)
    except Exception as error:  # noqa: BLE001
        raise ImageRejected(DropReason.DECODE_ERROR, f"{type(error).__name__}: {error}") from error

    thumbnail = blank_thumbnail(rgb)
    if is_blank(thumbnail, config.blank_std_threshold) and not has_ink(
        rgb, config.blank_ink_contrast, config.blank_min_ink_pixels
    ):
        raise ImageRejected(DropReason.BLANK_IMAGE, "near-uniform pixels")

    # Original size is reported in upright orientation, like what a viewer shows.
    original_width, original_height = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
    resized = _resize(rgb, config)
    keep_original = (
        source_format == "JPEG"
        and orientation == 1
        and source_mode in _RGB_LIKE
        and resized.size == (original_width, original_height)
    )
    if source_size is not None:
        original_width, original_height = source_size
    if keep_original:
        jpeg_bytes = data
    else:
        buffer = io.BytesIO()
        resized.save(buffer, format="JPEG", quality=config.encode_quality)
        jpeg_bytes = buffer.getvalue()
    return DecodedImage(
        jpeg_bytes=jpeg_bytes,
        width=resized.width,
        height=resized.height,
        original_width=original_width,
        original_height=original_height,
        rgb=rgb,
        thumbnail=thumbnail,
    )


def apply_decoded(record: dict, decoded: DecodedImage) -> dict:
    """Write a decode result into a record (the bytes replace the downloaded ones)."""
    record[Col.IMAGE_BYTES] = decoded.jpeg_bytes
    record[Col.WIDTH] = decoded.width
    record[Col.HEIGHT] = decoded.height
    record[Col.ORIGINAL_WIDTH] = decoded.original_width
    record[Col.ORIGINAL_HEIGHT] = decoded.original_height
    return record

