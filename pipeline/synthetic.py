"""A synthetic captioned image set: shapes x colours x backgrounds.

Real images and real weights cannot be downloaded here, so the demo corpus, the tiny CLIP the
project trains for tests, and the hard-negative checks all draw from this one generator. Every
sample is a pure function of its attributes and an integer seed, so the set is reproducible.
Captions read like web alt text: "a red circle on a blue background".
"""

from __future__ import annotations

import dataclasses
import io
import random
from typing import Iterator

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "cross", "ring")
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 170),
    "orange": (250, 140, 20),
    "black": (15, 15, 15),
    "white": (245, 245, 245),
}
BACKGROUNDS = {
    "grey": (128, 128, 128),
    "pink": (250, 190, 210),
    "teal": (20, 130, 130),
    "beige": (230, 215, 180),
    "navy": (20, 30, 80),
}


@dataclasses.dataclass(frozen=True)
class Attributes:
    shape: str
    colour: str
    background: str

    def caption(self) -> str:
        return f"a {self.colour} {self.shape} on a {self.background} background"


def all_attributes() -> list[Attributes]:
    """Every (shape, colour, background) combination where the shape is visible on its background."""
    return [
        Attributes(shape, colour, background)
        for shape in SHAPES
        for colour in COLOURS
        for background in BACKGROUNDS
    ]


def _star_points(cx: float, cy: float, outer: float, inner: float, points: int = 5) -> list[tuple[float, float]]:
    import math

    result = []
    for i in range(points * 2):
        radius = outer if i % 2 == 0 else inner
        angle = math.pi / points * i - math.pi / 2
        result.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return result


def render(attrs: Attributes, size: int = 224, seed: int = 0) -> Image.Image:
    """Draw one sample. The seed moves, scales and slightly recolours the shape and adds noise dots."""
    rng = random.Random(f"{attrs}-{seed}")
    background = tuple(min(255, max(0, c + rng.randint(-12, 12))) for c in BACKGROUNDS[attrs.background])
    colour = tuple(min(255, max(0, c + rng.randint(-15, 15))) for c in COLOURS[attrs.colour])
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(5, 25)):  # texture so that no two samples are pixel-identical
        x, y = rng.randrange(size), rng.randrange(size)
        shade = tuple(min(255, max(0, c + rng.randint(-30, 30))) for c in background)
        draw.point((x, y), fill=shade)
    radius = size * rng.uniform(0.18, 0.32)
    cx = size * rng.uniform(0.35, 0.65)
    cy = size * rng.uniform(0.35, 0.65)
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if attrs.shape == "circle":
        draw.ellipse(box, fill=colour)
    elif attrs.shape == "square":
        draw.rectangle(box, fill=colour)
    elif attrs.shape == "triangle":
        draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=colour)
    elif attrs.shape == "star":
        draw.polygon(_star_points(cx, cy, radius, radius * 0.45), fill=colour)
    elif attrs.shape == "cross":
        bar = radius * 0.35
        draw.rectangle((cx - radius, cy - bar, cx + radius, cy + bar), fill=colour)
        draw.rectangle((cx - bar, cy - radius, cx + bar, cy + radius), fill=colour)
    elif attrs.shape == "ring":
        draw.ellipse(box, outline=colour, width=max(3, int(radius * 0.3)))
    else:
        raise ValueError(f"unknown shape {attrs.shape!r}")
    return image


def encode_jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def iter_samples(count: int, size: int = 224, seed: int = 0) -> Iterator[tuple[Attributes, Image.Image]]:
    """`count` samples cycling through all attribute combinations in a seeded order."""
    combos = all_attributes()
    rng = random.Random(seed)
    order = list(range(len(combos)))
    for index in range(count):
        if index % len(combos) == 0:
            rng.shuffle(order)
        attrs = combos[order[index % len(combos)]]
        yield attrs, render(attrs, size=size, seed=seed * 1_000_003 + index)
