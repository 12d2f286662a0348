"""Near-duplicate precision/recall on real images: imagehash brute force vs our Deduplicate.

Images (Debian packages, installed by --install or beforehand with apt-get):
  openclipart-png             one clip art per family (series such as playing cards are
                              near-identical by design), composited on white
  plasma-workspace-wallpapers one picture per theme (a theme ships one picture at many sizes)
  gnome-backgrounds           one picture per theme (light/dark variants count as one theme)
Each source image gets these variants: resize 50%, JPEG q30, brightness +25%, 5% crop (2.5% of
each side, centred: 5% of width and of height in total), 10% pad (5% of width / height in black on
each side: 10% in total), horizontal flip, resize 75% + JPEG q50. A predicted pair is true when both images come from the
same source. Recall per transform = share of (original, variant) pairs predicted. For our
transform a pair is predicted when both land in the same cluster (transitive, the stricter test).

    python benchmarks/dedup.py [--max-clipart 1500] [--install]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

import imagehash
import numpy as np
from PIL import Image, ImageEnhance, ImageOps

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import apache_beam as beam  # noqa: E402
from apache_beam.runners.portability.fn_api_runner import FnApiRunner  # noqa: E402

from pipeline.config import CurateConfig  # noqa: E402
from schemas import Col  # noqa: E402
from transforms.dedup import Deduplicate, image_hashes  # noqa: E402

CLIPART = "/usr/share/openclipart/png"
WALLPAPER_DIRS = ["/usr/share/wallpapers", "/usr/share/backgrounds"]
PACKAGES = ["openclipart-png", "plasma-workspace-wallpapers", "gnome-backgrounds"]
MAX_SIDE = 1024  # sources are shrunk to this first so the benchmark runs in minutes


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def _crop(image: Image.Image, share: float) -> Image.Image:
    w, h = image.size
    dx, dy = round(w * share / 2), round(h * share / 2)  # share of each side, centred
    return image.crop((dx, dy, w - dx, h - dy))


def _pad(image: Image.Image, share: float) -> Image.Image:
    w, h = image.size
    return ImageOps.expand(image, border=(round(w * share / 2), round(h * share / 2)), fill=(0, 0, 0))


TRANSFORMS = {
    "resize50": lambda im: im.resize((max(1, im.width // 2), max(1, im.height // 2)), Image.Resampling.LANCZOS),
    "jpeg30": lambda im: _jpeg(im, 30),
    "bright25": lambda im: ImageEnhance.Brightness(im).enhance(1.25),
    "crop5": lambda im: _crop(im, 0.05),
    "pad10": lambda im: _pad(im, 0.10),
    "flip": lambda im: im.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
    "resize_jpeg": lambda im: _jpeg(
        im.resize((max(1, im.width * 3 // 4), max(1, im.height * 3 // 4)), Image.Resampling.LANCZOS), 50
    ),
}


def _load(path: str) -> Image.Image:
    image = Image.open(path)
    image.draft("RGB", (MAX_SIDE, MAX_SIDE))
    if image.mode in ("RGBA", "LA", "P"):
        image = image.convert("RGBA")
        canvas = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(canvas, image)
    image = image.convert("RGB")
    image.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
    return image


def clipart_sources(limit: int) -> list[str]:
    families = {}
    for folder, _, files in sorted(os.walk(CLIPART)):
        for name in sorted(files):
            if name.endswith(".png"):
                family = (folder, re.split(r"[_\d\-]", name[:-4].lower())[0])
                families.setdefault(family, os.path.join(folder, name))
    paths = [families[k] for k in sorted(families)]
    step = max(1, len(paths) // limit) if limit else 1
    return paths[::step][:limit] if limit else paths


def wallpaper_sources() -> list[str]:
    themes = {}
    for root in WALLPAPER_DIRS:
        for folder, _, files in sorted(os.walk(root)):
            for name in sorted(files):
                if not name.lower().endswith((".png", ".jpg", ".jpeg", ".webp")) or name.startswith("screenshot"):
                    continue
                path = os.path.join(folder, name)
                if "/contents/" in path:  # plasma: <Theme>/contents/images*/WxH.ext
                    theme = path.split("/contents/")[0]
                else:  # gnome: name-l.webp / name-d.webp
                    theme = os.path.join(folder, re.sub(r"-[ld]$", "", os.path.splitext(name)[0]))
                themes.setdefault(theme, []).append(path)
    # the largest file of each theme is its full-resolution picture
    return [max(sorted(paths), key=os.path.getsize) for _, paths in sorted(themes.items())]


def build_set(max_clipart: int):
    """-> list of (source id, transform name or 'original', image)."""
    images = []
    skipped = repeated = 0
    seen = []
    for source, path in enumerate(clipart_sources(max_clipart) + wallpaper_sources()):
        try:
            original = _load(path)
        except Exception:  # noqa: BLE001 - a broken package file is skipped and counted
            skipped += 1
            continue
        if min(original.size) < 32:
            skipped += 1
            continue
        # the packages ship some pictures twice under different names: one source each
        thumb = np.asarray(original.resize((32, 32), Image.Resampling.BOX), dtype=np.float32).ravel()
        if seen and np.min(np.abs(np.stack(seen) - thumb).mean(axis=1)) < 4:
            repeated += 1
            continue
        seen.append(thumb)
        images.append((source, "original", original))
        for name, fn in TRANSFORMS.items():
            images.append((source, name, fn(original)))
    return images, skipped, repeated


def _predicted_pairs_brute(hashes: np.ndarray, radius: int) -> set:
    pairs = set()
    for start in range(0, len(hashes), 1024):
        dist = np.bitwise_count(hashes[start : start + 1024, None] ^ hashes[None, :])
        for i, j in zip(*np.nonzero(dist <= radius)):
            if i + start < j:
                pairs.add((int(i + start), int(j)))
    return pairs


def _score(name: str, pairs: set, meta: list, blank: set) -> dict:
    sources = [m[0] for m in meta]
    tp = sum(1 for i, j in pairs if sources[i] == sources[j])
    precision = tp / len(pairs) if pairs else 1.0
    recall = {}
    index = {(s, t): k for k, (s, t) in enumerate(meta)}
    for transform in TRANSFORMS:
        wanted = [
            (index[(s, "original")], k)
            for k, (s, t) in enumerate(meta)
            if t == transform and index[(s, "original")] not in blank
        ]
        hit = sum(1 for a, b in wanted if (min(a, b), max(a, b)) in pairs)
        recall[transform] = hit / len(wanted) if wanted else float("nan")
    return {"name": name, "pairs": len(pairs), "precision": precision, "recall": recall}


def run_ours(meta_images, config: CurateConfig):
    records = []
    hash_seconds = 0.0
    blank = set()
    for k, (_, _, image) in enumerate(meta_images):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        start = time.perf_counter()
        features = image_hashes(image)
        hash_seconds += time.perf_counter() - start
        if features[Col.PHASH] is None:
            blank.add(k)
        records.append(
            {
                Col.UID: f"{k:06d}",
                Col.SHA256: hashlib.sha256(buffer.getvalue()).hexdigest(),
                Col.ORIGINAL_WIDTH: image.width,
                Col.ORIGINAL_HEIGHT: image.height,
                Col.CLIP_SCORE: None,
                Col.IMAGE_EMBEDDING: None,
                **features,
            }
        )
    with tempfile.TemporaryDirectory() as folder:
        with beam.Pipeline(runner=FnApiRunner()) as pipeline:
            (
                pipeline
                | beam.Create(records)
                | Deduplicate(config)
                | beam.Map(lambda d: json.dumps([d[Col.UID], d[Col.DUPLICATE_OF]]))
                | beam.io.WriteToText(os.path.join(folder, "decisions"))
            )
        decisions = []
        for name in sorted(os.listdir(folder)):
            with open(os.path.join(folder, name), encoding="utf-8") as handle:
                decisions += [json.loads(line) for line in handle]
    clusters = defaultdict(list)
    for uid, survivor in decisions:
        clusters[survivor].append(uid)
    pairs = set()
    for survivor, members in clusters.items():
        ids = sorted(int(u) for u in [survivor] + members)
        for a in range(len(ids)):
            for b in range(a + 1, len(ids)):
                pairs.add((ids[a], ids[b]))
    return pairs, blank, hash_seconds / max(1, len(meta_images))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-clipart", type=int, default=1500, help="clip art families sampled (0 = all)")
    parser.add_argument("--radius", type=int, default=8)
    parser.add_argument("--install", action="store_true", help="apt-get install the image packages first")
    args = parser.parse_args()
    if args.install:
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES], check=True)

    start = time.perf_counter()
    meta_images, skipped, repeated = build_set(args.max_clipart)
    meta = [(s, t) for s, t, _ in meta_images]
    n_sources = len({s for s, _ in meta})
    print(f"set: {n_sources} sources ({skipped} unreadable or tiny and {repeated} repeated pictures skipped), {len(meta)} images, "
          f"built in {time.perf_counter() - start:.0f}s")

    plain = np.array([int(str(imagehash.phash(im)), 16) for _, _, im in meta_images], dtype=np.uint64)
    config = CurateConfig(dedup_radius=args.radius)
    ours_pairs, blank, us_per_image = run_ours(meta_images, config)
    results = [
        _score("imagehash r=8", _predicted_pairs_brute(plain, 8), meta, blank),
        _score("imagehash r=10", _predicted_pairs_brute(plain, 10), meta, blank),
        _score(f"ours r={args.radius}", ours_pairs, meta, blank),
    ]
    print(f"blank/near-uniform images kept out of the hash space: {len(blank)}; "
          f"image_hashes: {us_per_image * 1e6:.0f} us/image (images up to {MAX_SIDE}px)")
    header = f"{'method':<16}{'pairs':>8}{'precision':>11}" + "".join(f"{t:>12}" for t in TRANSFORMS)
    print(header)
    for r in results:
        row = f"{r['name']:<16}{r['pairs']:>8}{r['precision']:>11.3f}"
        row += "".join(f"{r['recall'][t]:>12.3f}" for t in TRANSFORMS)
        print(row)
    print("(columns after precision: recall of (original, variant) pairs per transform)")


if __name__ == "__main__":
    main()
