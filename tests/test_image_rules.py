"""The blank-image rule on synthetic material: line art, text and outlines are kept, blank is not.

The 32x32 box thumbnail averages thin strokes away (a one-pixel outline map on white has a
thumbnail std under 3), so these cases would all be `blank_image` under the thumbnail alone.
"""

from __future__ import annotations

import glob
import io
import json
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw, ImageFont

from pipeline.config import build_config
from schemas import Col, DropReason
from tests.conftest import run_cli
from transforms.decode import ImageRejected, blank_thumbnail, decode_image, is_blank

WHITE = (255, 255, 255)


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def outcome(data: bytes, config=None) -> str:
    try:
        decode_image(data, config or build_config())
    except ImageRejected as rejected:
        return rejected.reason.value
    return "kept"


def thumbnail_looks_uniform(image: Image.Image) -> bool:
    """The case under test really is one the thumbnail alone would call blank."""
    return is_blank(blank_thumbnail(image.convert("RGB")), build_config().blank_std_threshold)


def outline(side: int, inset: int) -> Image.Image:
    image = Image.new("RGB", (side, side), WHITE)
    ImageDraw.Draw(image).rectangle((inset, inset, side - 1 - inset, side - 1 - inset), outline=(0, 0, 0), width=1)
    return image


def line_drawing(width: int = 794, height: int = 1123) -> Image.Image:
    """Thin-stroke outline 'map' on white, the shape of the page that was dropped."""
    image = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(image)
    rng = np.random.default_rng(7)
    for _ in range(3):  # three closed outlines made of wobbly one-pixel segments
        centre = rng.uniform(0.25, 0.75, 2) * (width, height)
        angles = np.linspace(0, 2 * np.pi, 60)
        radius = rng.uniform(60, 180) * (1 + 0.2 * rng.standard_normal(60).cumsum() / 8)
        points = [(float(centre[0] + r * np.cos(a)), float(centre[1] + r * np.sin(a))) for r, a in zip(radius, angles)]
        draw.line(points + points[:1], fill=(30, 30, 30), width=1)
    return image


def text_image(side: int, font_size: float | None, text: str) -> Image.Image:
    image = Image.new("RGB", (side, side), WHITE)
    font = ImageFont.load_default(size=font_size) if font_size else ImageFont.load_default()
    ImageDraw.Draw(image).text((side // 8, side // 2), text, fill=(0, 0, 0), font=font)
    return image


@pytest.mark.parametrize("side", [64, 256, 1000, 2048, 4096])
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_one_pixel_outline_is_kept_at_any_size(side, fmt):
    # On the border and inside (a JPEG's DCT draft downscale treats the two differently).
    for inset in (0, side // 7 + 3):
        image = outline(side, inset)
        if side >= 1000:
            assert thumbnail_looks_uniform(image), (side, inset)
        assert outcome(encode(image, fmt, **({"quality": 75} if fmt == "JPEG" else {}))) == "kept", (side, inset)


def test_thin_line_drawing_on_white_is_kept():
    image = line_drawing()
    assert thumbnail_looks_uniform(image)
    assert outcome(encode(image, "PNG")) == "kept"
    assert outcome(encode(image, "JPEG", quality=85)) == "kept"
    # The same strokes on a transparent background (how clip art ships) composite onto white.
    rgba = Image.new("RGBA", image.size, (0, 0, 0, 0))
    rgba.putalpha(Image.eval(image.convert("L"), lambda v: 255 - v))
    assert outcome(encode(rgba, "PNG")) == "kept"


@pytest.mark.parametrize("side, font_size, text", [
    (200, None, "Hi"),  # the default bitmap-sized font, a two-letter word
    (400, None, "Hello, world"),
    (2000, 40, "Hello, world"),
    (4000, 80, "A line of text on a large canvas"),
])
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_rendered_text_on_white_is_kept(side, font_size, text, fmt):
    image = text_image(side, font_size, text)
    assert thumbnail_looks_uniform(image)
    assert outcome(encode(image, fmt)) == "kept"


@pytest.mark.parametrize("colour", [WHITE, (0, 0, 0), (128, 128, 128), (20, 130, 200)])
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_uniform_images_are_blank(colour, fmt):
    assert outcome(encode(Image.new("RGB", (640, 480), colour), fmt)) == DropReason.BLANK_IMAGE.value
    if colour in (WHITE, (20, 130, 200)):  # a large canvas takes the box-reduced path
        assert outcome(encode(Image.new("RGB", (4096, 4096), colour), fmt)) == DropReason.BLANK_IMAGE.value


@pytest.mark.parametrize("sigma", [1.0, 2.0, 8.0])
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_uniform_with_sensor_noise_is_blank(sigma, fmt):
    rng = np.random.default_rng(int(sigma))
    pixels = np.clip(rng.normal(150.0, sigma, (600, 800, 3)), 0, 255).astype(np.uint8)
    assert outcome(encode(Image.fromarray(pixels), fmt)) == DropReason.BLANK_IMAGE.value


def test_gradient_spanning_under_two_levels_is_blank():
    ramp = np.tile(np.linspace(100.0, 101.99, 1200), (900, 1)).astype(np.uint8)
    assert set(np.unique(ramp)) == {100, 101}
    image = Image.fromarray(np.stack([ramp, ramp, ramp], axis=2))
    assert outcome(encode(image, "PNG")) == DropReason.BLANK_IMAGE.value
    assert outcome(encode(image, "JPEG")) == DropReason.BLANK_IMAGE.value


def test_isolated_dust_pixels_are_still_blank_but_a_short_stroke_is_not():
    # Decided: single stray pixels (dust, salt noise) never count as ink, however many; a stroke
    # of a few connected pixels does once they add up to blank_min_ink_pixels.
    rng = np.random.default_rng(3)
    pixels = np.full((800, 800, 3), 255, np.uint8)
    spots = rng.choice(800 * 800, 60, replace=False)
    pixels.reshape(-1, 3)[spots] = 0
    touching = sum(abs(int(a) - int(b)) in (1, 800) for a in spots for b in spots)
    assert touching == 0
    assert outcome(encode(Image.fromarray(pixels), "PNG")) == DropReason.BLANK_IMAGE.value
    speck = np.full((800, 800, 3), 255, np.uint8)
    speck[400:403, 400:403] = 0  # one 3x3 speck: 9 connected pixels, under the minimum
    assert outcome(encode(Image.fromarray(speck), "PNG")) == DropReason.BLANK_IMAGE.value
    stroke = np.full((800, 800, 3), 255, np.uint8)
    stroke[400, 300:340] = 0  # a 40-pixel dash
    assert outcome(encode(Image.fromarray(stroke), "PNG")) == "kept"


def test_ink_settings_decide():
    image = encode(line_drawing(), "PNG")
    assert outcome(image, build_config(overrides=["blank_min_ink_pixels=1000000"])) == DropReason.BLANK_IMAGE.value
    assert outcome(image, build_config(overrides=["blank_ink_contrast=250"])) == DropReason.BLANK_IMAGE.value
    assert outcome(image, build_config(overrides=["blank_std_threshold=0"])) == "kept"


def _tar_member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def test_line_art_is_kept_and_blank_dropped_through_curate_fetch(tmp_path):
    """The public path: `curate fetch` on a WebDataset shard (the phase that decodes), the features
    table's verdicts (one row per input row, drops included)."""
    images = {
        "outline": encode(outline(2048, 300), "PNG"),
        "drawing": encode(line_drawing(), "JPEG", quality=85),
        "text": encode(text_image(400, None, "Hello, world"), "PNG"),
        "blank": encode(Image.new("RGB", (640, 480), (250, 250, 250)), "JPEG"),
        "noisy": encode(Image.fromarray(np.clip(np.random.default_rng(0).normal(90, 2, (480, 640, 3)), 0, 255)
                                        .astype(np.uint8)), "PNG"),
    }
    with tarfile.open(tmp_path / "00000.tar", "w") as archive:
        for index, (name, data) in enumerate(images.items()):
            key = f"{index:09d}"
            _tar_member(archive, f"{key}.png", data)  # webdataset input: the bytes decide the format
            _tar_member(archive, f"{key}.txt", f"a picture called {name} in this shard".encode())
            _tar_member(archive, f"{key}.json", json.dumps({"url": f"http://h/{name}"}).encode())
    out = tmp_path / "out"
    assert run_cli("fetch", "--input", str(tmp_path / "00000.tar"), "--output", str(out),
                   "--set", "clip_enabled=false", "--set", "langid_backend=none") == 0
    rows = pq.read_table(glob.glob(f"{out}/features/*.parquet"), columns=[Col.URL, Col.REASON]).to_pylist()
    verdicts = {row[Col.URL].rsplit("/", 1)[1]: row[Col.REASON] for row in rows}
    blank = DropReason.BLANK_IMAGE.value
    assert verdicts == {"outline": None, "drawing": None, "text": None, "blank": blank, "noisy": blank}
