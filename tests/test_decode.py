"""Decoding, validation and resizing of hostile and unusual images (pure functions, real bytes)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.config import build_config
from pipeline.demo import bomb_png
from pipeline.synthetic import Attributes, render
from schemas import DropReason
from transforms.decode import ImageRejected, decode_image


def encode(image: Image.Image, fmt: str = "JPEG", **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def photo(width: int = 640, height: int = 480) -> Image.Image:
    return render(Attributes("star", "red", "teal"), size=max(width, height)).resize((width, height))


def reason_of(data: bytes, config=None) -> DropReason:
    with pytest.raises(ImageRejected) as caught:
        decode_image(data, config or build_config())
    return caught.value.reason


@pytest.mark.parametrize(
    "mode, size, expected",
    [("border", 256, (256, 256)), ("keep_ratio", 256, (341, 256)), ("center_crop", 256, (256, 256)),
     ("no", 256, (640, 480))],
)
def test_resize_geometry_matches_img2dataset(mode, size, expected):
    from img2dataset.resizer import Resizer

    data = encode(photo())
    config = build_config(overrides=[f"resize_mode={mode}", f"image_size={size}"])
    decoded = decode_image(data, config)
    theirs = Resizer(image_size=size, resize_mode=mode, resize_only_if_bigger=False)(io.BytesIO(data))
    assert theirs[5] is None
    assert (decoded.width, decoded.height) == expected == (theirs[1], theirs[2])
    assert (decoded.original_width, decoded.original_height) == (640, 480)
    assert Image.open(io.BytesIO(decoded.jpeg_bytes)).size == expected


def test_border_pads_white_like_img2dataset():
    decoded = decode_image(encode(photo(640, 320)), build_config())
    pixels = np.asarray(Image.open(io.BytesIO(decoded.jpeg_bytes)))
    assert pixels[0, 128].min() > 240 and pixels[-1, 128].min() > 240  # top/bottom border is white


def test_original_bytes_kept_when_no_resize_is_needed():
    data = encode(photo(256, 256), quality=80)
    assert decode_image(data, build_config()).jpeg_bytes == data
    assert decode_image(encode(photo(300, 300)), build_config()).jpeg_bytes != data


def test_exif_orientation_is_applied():
    image = photo(400, 200)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    decoded = decode_image(encode(image, exif=exif), build_config(overrides=["resize_mode=no"]))
    assert (decoded.original_width, decoded.original_height) == (200, 400)
    assert (decoded.width, decoded.height) == (200, 400)


def test_alpha_is_composited_on_white():
    rgba = Image.new("RGBA", (200, 200), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (50, 50, 150, 150))
    decoded = decode_image(encode(rgba, "PNG"), build_config(overrides=["resize_mode=no"]))
    assert decoded.rgb.getpixel((5, 5)) == (255, 255, 255)
    assert decoded.rgb.getpixel((100, 100)) == (0, 0, 255)


def test_cmyk_16bit_palette_and_animated_images_decode():
    config = build_config(overrides=["resize_mode=no"])
    cmyk = photo(200, 200).convert("CMYK")
    assert decode_image(encode(cmyk, "JPEG"), config).rgb.mode == "RGB"
    ramp = (np.arange(200 * 200, dtype=np.uint32).reshape(200, 200) * 65535 // (200 * 200)).astype(np.uint16)
    sixteen = Image.fromarray(ramp, "I;16")
    rgb = decode_image(encode(sixteen, "PNG"), config).rgb
    values = np.asarray(rgb)[..., 0]
    assert values.min() < 10 and values.max() > 245  # scaled into 8 bits, not clipped to white
    palette = photo(200, 200).convert("P", palette=Image.Palette.ADAPTIVE)
    assert decode_image(encode(palette, "PNG"), config).rgb.mode == "RGB"
    frames = [photo(120, 120), photo(120, 120).transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    gif = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert decode_image(gif, config).rgb.size == (120, 120)


def test_hostile_and_useless_images_are_refused_with_reasons():
    assert reason_of(bomb_png()) == DropReason.DECOMPRESSION_BOMB
    data = encode(photo())
    assert reason_of(data[: len(data) // 2]) == DropReason.DECODE_ERROR
    assert reason_of(b"<!doctype html><html></html>") == DropReason.NOT_AN_IMAGE
    assert reason_of(b'<svg xmlns="http://www.w3.org/2000/svg"/>') == DropReason.NOT_AN_IMAGE
    assert reason_of(b"") == DropReason.NOT_AN_IMAGE
    assert reason_of(encode(photo(20, 20))) == DropReason.TOO_SMALL
    assert reason_of(encode(photo(1400, 100))) == DropReason.BAD_ASPECT_RATIO
    assert reason_of(encode(Image.new("RGB", (300, 300), (250, 250, 250)))) == DropReason.BLANK_IMAGE
    noisy_blank = np.full((300, 300, 3), 128, np.uint8) + np.random.default_rng(0).integers(0, 2, (300, 300, 3), dtype=np.uint8)
    assert reason_of(encode(Image.fromarray(noisy_blank), "PNG")) == DropReason.BLANK_IMAGE


def test_colour_contrast_without_luminance_contrast_is_not_blank():
    image = Image.new("RGB", (300, 300), (20, 130, 130))  # teal
    image.paste((220, 30, 30), (75, 75, 225, 225))  # red: nearly the same grey level
    decode_image(encode(image, "PNG"), build_config())


def test_pixel_limit_is_configurable():
    data = encode(photo(640, 480))
    assert reason_of(data, build_config(overrides=["max_pixels=100000"])) == DropReason.DECOMPRESSION_BOMB


def test_fetch_postprocess_keeps_the_ledger_phash_when_near_dedup_is_off():
    from pipeline.fetch import decode_and_describe
    from schemas import Col

    data = encode(photo())
    full = decode_and_describe({Col.IMAGE_BYTES: data}, build_config())
    light = decode_and_describe({Col.IMAGE_BYTES: data}, build_config(overrides=["dedup_near=false"]))
    assert len(full[Col.PHASH]) == len(light[Col.PHASH]) == 16
    assert full[Col.DEDUP_DESCRIPTOR] and light.get(Col.DEDUP_DESCRIPTOR) is None
    assert full[Col.SHA256] == light[Col.SHA256]
