"""Near-duplicate precision/recall on real images, through `curate run` as a user runs it.

The set (deterministic; Debian packages openclipart-png, plasma-workspace-wallpapers,
gnome-backgrounds; `--install` apt-gets them):
  originals   clip art (a sample of everything, plus icon families that share a frame or layout:
              flat-theme and lemon-theme icons, AIGA symbols, map symbols, road signs, and the
              package's flat gradients), wallpapers (one per picture: the packages ship some
              pictures twice, at several sizes; pictures whose 64x64 thumbnails are nearly equal
              count once), look-alike distinct images: several wallpapers each cut into a grid of
              non-overlapping tiles (one original per tile: style-similar, different content), and
              synthetic flat gradients.
  copies      of a subset of the originals: resize 50%, JPEG q30, brightness +25%, crop 5% from
              each side, pad 10% each side white, pad 10% each side black, flip, resize 75% + JPEG
              q50, and the old benchmark's crop 2.5% / pad 5% black as extra columns.
Originals are split into a tune and a held-out half by a hash of their name (a wallpaper's tiles
go with their wallpaper). Each half becomes one WebDataset tar (KEY.png|jpg, KEY.txt, KEY.json
with a unique url) and is run through `curate run --set clip_enabled=false` (in-process
DirectRunner); the ledger's duplicate_of is read back:
  precision     over predicted pairs (a dropped duplicate, its duplicate_of): true when both come
                from one original; false pairs by kind: tiles of one photo / clip art of one
                family (folder) / other.
  recall        per transform: share of copies that end in their original's cluster.
imagehash pHash brute force (r=8, r=10, pairs within r) is scored on the same decoded images.

    python benchmarks/dedup.py [--half heldout|tune|both] [--work /tmp/dedup-bench] [--install]
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from collections import Counter, defaultdict

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

CLIPART = "/usr/share/openclipart/png"
WALLPAPER_DIRS = ["/usr/share/wallpapers", "/usr/share/backgrounds"]
PACKAGES = ["openclipart-png", "plasma-workspace-wallpapers", "gnome-backgrounds"]
MAX_SIDE = 640  # originals are shrunk to this (speed); tiles are cut from a 1600-px wallpaper
FAMILIES = {  # icon families: folder -> files taken
    "computer/icons/flat-theme/action": 70,
    "computer/icons/flat-theme/applications": 40,
    "computer/icons/lemon-theme/actions": 40,
    "transportation/aiga-symbols": 40,
    "signs_and_symbols/map_symbols": 40,
    "transportation/roadsigns": 30,
    "special/gradients": 60,
}
GENERAL_CLIPART = 420
TILED_WALLPAPERS = 10
TILE_GRID = (6, 6)
SYNTHETIC_GRADIENTS = 30
CAPTION = "a picture taken for the duplicate detection benchmark"


def _jpeg_bytes(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _crop(image: Image.Image, side_share: float) -> Image.Image:
    w, h = image.size
    dx, dy = round(w * side_share), round(h * side_share)
    return image.crop((dx, dy, w - dx, h - dy))


def _pad(image: Image.Image, side_share: float, fill) -> Image.Image:
    w, h = image.size
    return ImageOps.expand(image, border=(round(w * side_share), round(h * side_share)), fill=fill)


def _half(image: Image.Image, factor: float) -> Image.Image:
    return image.resize((max(1, round(image.width * factor)), max(1, round(image.height * factor))), Image.Resampling.LANCZOS)


# name -> (image -> (bytes, extension)); the first eight are the issue's, the last two the old benchmark's
TRANSFORMS = {
    "resize50": lambda im: (_png_bytes(_half(im, 0.5)), "png"),
    "jpeg30": lambda im: (_jpeg_bytes(im, 30), "jpg"),
    "bright25": lambda im: (_png_bytes(ImageEnhance.Brightness(im).enhance(1.25)), "png"),
    "crop5": lambda im: (_png_bytes(_crop(im, 0.05)), "png"),
    "padW10": lambda im: (_png_bytes(_pad(im, 0.10, (255, 255, 255))), "png"),
    "padB10": lambda im: (_png_bytes(_pad(im, 0.10, (0, 0, 0))), "png"),
    "flip": lambda im: (_png_bytes(im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)), "png"),
    "rs+jpeg": lambda im: (_jpeg_bytes(_half(im, 0.75), 50), "jpg"),
    "old_crop2.5": lambda im: (_png_bytes(_crop(im, 0.025)), "png"),
    "old_padB5": lambda im: (_png_bytes(_pad(im, 0.05, (0, 0, 0))), "png"),
}


def _on_white(image: Image.Image) -> Image.Image:
    if image.mode in ("RGBA", "LA", "P", "PA"):
        image = image.convert("RGBA")
        canvas = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(canvas, image)
    return image.convert("RGB")


def _load(path: str, side: int = MAX_SIDE) -> Image.Image:
    image = Image.open(path)
    image.draft("RGB", (side, side))
    image = _on_white(image)
    image.thumbnail((side, side), Image.Resampling.LANCZOS)
    return image


def _h(text: str) -> int:
    return int.from_bytes(hashlib.sha1(text.encode()).digest()[:8], "big")


def _clipart() -> list[tuple[str, str]]:
    """(name, family) of the clip art used: the named families, then a general sample."""
    chosen = {}
    for folder, count in FAMILIES.items():
        files = sorted(glob.glob(os.path.join(CLIPART, folder, "*.png")), key=_h)
        for path in files[:count]:
            chosen[path] = folder
    everything = sorted(glob.glob(os.path.join(CLIPART, "**", "*.png"), recursive=True), key=_h)
    for path in everything:
        if len(chosen) >= sum(FAMILIES.values()) + GENERAL_CLIPART:
            break
        chosen.setdefault(path, os.path.relpath(os.path.dirname(path), CLIPART))
    return sorted(chosen.items())


def _wallpapers() -> list[str]:
    paths = []
    for root in WALLPAPER_DIRS:
        for path in sorted(glob.glob(os.path.join(root, "**", "*"), recursive=True)):
            if path.lower().endswith((".png", ".jpg", ".jpeg", ".webp")) and "screenshot" not in path.lower():
                paths.append(path)
    return sorted(paths, key=lambda p: -os.path.getsize(p))  # the largest copy of a picture first


def _gradient(seed: int, size=(480, 360)) -> Image.Image:
    """A flat gradient: two or three colours blended linearly or radially, a little noise."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    if seed % 3 == 2:
        cx, cy = rng.uniform(0.2, 0.8, 2)
        t = np.sqrt((x - cx) ** 2 + (y - cy * h / w) ** 2)
    else:
        angle = rng.uniform(0, 2 * np.pi)
        t = np.cos(angle) * x + np.sin(angle) * y
    t = (t - t.min()) / max(1e-6, t.max() - t.min())
    a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    img = a * (1 - t[..., None]) + b * t[..., None] + rng.normal(0, 1.5, (h, w, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _signature(image: Image.Image) -> np.ndarray:
    return np.asarray(image.resize((64, 64), Image.Resampling.BOX), dtype=np.float32)


def build_originals() -> list[dict]:
    """[{name, kind, group, image, half}], one per distinct picture."""
    originals = []
    for path, family in _clipart():
        try:
            image = _load(path)
        except Exception:  # noqa: BLE001 - a broken package file is skipped
            continue
        if min(image.size) < 80:
            continue
        kind = "gradient" if family == "special/gradients" else ("icon" if family in FAMILIES else "clipart")
        originals.append({"name": os.path.relpath(path, CLIPART), "kind": kind, "group": family, "image": image})
    walls, tiled = [], 0
    for path in _wallpapers():
        try:
            image = _load(path, 1600)
        except Exception:  # noqa: BLE001
            continue
        walls.append((path, image))
    for k in range(SYNTHETIC_GRADIENTS):
        originals.append({"name": f"synthetic-gradient-{k}", "kind": "gradient", "group": "synthetic", "image": _gradient(k)})
    # one original per picture: files whose 64x64 thumbnails (or a flip of them) nearly agree are one
    kept, signatures = [], []
    for item in originals + [{"name": p, "kind": "wallpaper", "group": p, "image": im} for p, im in walls]:
        sig = _signature(item["image"])
        if signatures:
            stack = np.stack(signatures)
            diff = np.minimum(np.abs(stack - sig).mean(axis=(1, 2, 3)), np.abs(stack - sig[:, ::-1]).mean(axis=(1, 2, 3)))
            if diff.min() < 6.0:
                continue
        signatures.append(sig)
        kept.append(item)
    out = []
    for item in kept:
        if item["kind"] != "wallpaper":
            out.append(item)
            continue
        image = item["image"]
        if tiled < TILED_WALLPAPERS and _h(item["name"]) % 3 == 0:
            tiled += 1
            cols, rows = TILE_GRID
            tw, th = image.width // cols, image.height // rows
            for r in range(rows):
                for c in range(cols):
                    tile = image.crop((c * tw, r * th, (c + 1) * tw, (r + 1) * th))
                    out.append({"name": f"{item['name']}#tile{r}{c}", "kind": "tile", "group": item["name"], "image": tile,
                                "split": item["name"]})
        small = image.copy()
        small.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
        out.append({**item, "image": small})
    for item in out:
        item["half"] = "tune" if _h(item.get("split", item["name"])) % 2 == 0 else "heldout"
    return out


def _with_copies(item: dict) -> bool:
    """Which originals get the transformed copies: every wallpaper, a share of the rest."""
    share = {"wallpaper": 1, "tile": 4, "gradient": 3, "icon": 4, "clipart": 4}[item["kind"]]
    return _h("copies:" + item["name"]) % share == 0


def write_set(originals: list[dict], half: str, folder: str) -> dict:
    """The half's WebDataset tar -> {key: (original index, transform)}."""
    os.makedirs(folder, exist_ok=True)
    truth = {}
    path = os.path.join(folder, "00000.tar")
    with tarfile.open(path, "w") as tar:
        def add(key, data, ext, meta):
            for suffix, payload in ((ext, data), ("txt", CAPTION.encode()), ("json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size, info.mtime = len(payload), 0
                tar.addfile(info, io.BytesIO(payload))
        for index, item in enumerate(originals):
            if item["half"] != half:
                continue
            image = item["image"]
            entries = [("original", (_png_bytes(image), "png") if item["kind"] not in ("wallpaper", "tile") else (_jpeg_bytes(image, 92), "jpg"))]
            if _with_copies(item):
                entries += [(name, fn(image)) for name, fn in TRANSFORMS.items()]
            for transform, (data, ext) in entries:
                key = f"s{len(truth):06d}"
                truth[key] = (index, transform)
                add(key, data, ext, {"url": f"http://bench.invalid/{key}.{ext}"})
    with open(os.path.join(folder, "truth.json"), "w") as handle:
        json.dump(truth, handle)
    return truth


def run_curate(folder: str, out: str, extra: list[str], code: str) -> float:
    shutil.rmtree(out, ignore_errors=True)
    command = [shutil.which("curate") or "curate", "run", "--input", os.path.join(folder, "*.tar"), "--output", out,
               "--input-format", "webdataset", "--set", "clip_enabled=false", "--quiet", *extra]
    start = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=code) if code else None
    subprocess.run(command, check=True, env=env)
    return time.perf_counter() - start


def read_ledger(out: str) -> dict:
    import pyarrow.parquet as pq

    rows = {}
    for path in sorted(glob.glob(os.path.join(out, "ledger", "*.parquet"))):
        table = pq.read_table(path, columns=["uid", "status", "reason", "duplicate_of", "extra"]).to_pylist()
        for row in table:
            row["key"] = json.loads(row["extra"])["source_key"]
            rows[row["uid"]] = row
    return rows


def _kind_of_pair(a: dict, b: dict) -> str:
    if a["kind"] == "tile" and b["kind"] == "tile" and a["group"] == b["group"]:
        return "tiles of one photo"
    if a["kind"] in ("icon", "clipart", "gradient") and a["group"] == b["group"]:
        return "clip art of one family"
    return "other"


def score(name: str, pairs: set, clusters: dict, truth: dict, originals: list[dict], excluded: set) -> dict:
    """pairs: predicted (key, key); clusters: key -> cluster id (None: use pairs for recall)."""
    false = Counter()
    examples = []
    for a, b in pairs:
        oa, ob = truth[a][0], truth[b][0]
        if oa != ob:
            kind = _kind_of_pair(originals[oa], originals[ob])
            false[kind] += 1
            if len(examples) < 400:
                examples.append((kind, originals[oa]["name"], truth[a][1], originals[ob]["name"], truth[b][1]))
    tp = len(pairs) - sum(false.values())
    original_key = {v[0]: k for k, v in truth.items() if v[1] == "original"}
    recall = {}
    for transform in TRANSFORMS:
        hit = total = 0
        for key, (index, t) in truth.items():
            if t != transform or key in excluded or original_key[index] in excluded:
                continue
            total += 1
            other = original_key[index]
            if clusters is not None:
                hit += clusters[key] == clusters[other]
            else:
                hit += (min(key, other), max(key, other)) in pairs
        recall[transform] = hit / total if total else float("nan")
    return {"name": name, "pairs": len(pairs), "precision": tp / len(pairs) if pairs else 1.0, "recall": recall,
            "false": false, "examples": examples}


def imagehash_pairs(folder: str, truth: dict, radius: int) -> set:
    import imagehash

    keys, values = [], []
    with tarfile.open(os.path.join(folder, "00000.tar")) as tar:
        for member in tar.getmembers():
            key, ext = member.name.rsplit(".", 1)
            if ext in ("png", "jpg"):
                image = Image.open(tar.extractfile(member)).convert("RGB")
                keys.append(key)
                values.append(int(str(imagehash.phash(image)), 16))
    hashes = np.array(values, dtype=np.uint64)
    dist = np.bitwise_count(hashes[:, None] ^ hashes[None, :])
    i, j = np.nonzero(np.triu(dist <= radius, 1))
    return {(min(keys[a], keys[b]), max(keys[a], keys[b])) for a, b in zip(i.tolist(), j.tolist())}


def descriptor_cost(originals: list[dict], half: str, limit: int = 300) -> float:
    """ms per image of image_hashes (the fetch phase's descriptor) on this half's originals."""
    from transforms.dedup import image_hashes

    images = [o["image"] for o in originals if o["half"] == half][:limit]
    image_hashes(images[0])
    start = time.perf_counter()
    for image in images:
        image_hashes(image)
    return (time.perf_counter() - start) * 1000 / len(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--half", choices=("heldout", "tune", "both"), default="heldout")
    parser.add_argument("--work", default="/tmp/dedup-bench", help="set and run outputs (the set is built once)")
    parser.add_argument("--rebuild", action="store_true", help="build the set again")
    parser.add_argument("--set", action="append", default=[], help="extra --set key=value for curate run")
    parser.add_argument("--code", default="", help="run this checkout's code (e.g. an unpacked `git archive` of main: before/after)")
    parser.add_argument("--examples", type=int, default=0, help="print this many false pairs")
    parser.add_argument("--install", action="store_true", help="apt-get install the image packages first")
    args = parser.parse_args()
    if args.code:
        sys.path.insert(0, os.path.abspath(args.code))
    if args.install:
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES], check=True)
    import pickle

    cache = os.path.join(args.work, "originals.pkl")
    start = time.perf_counter()
    if args.rebuild or not os.path.exists(cache):
        originals = build_originals()
        os.makedirs(args.work, exist_ok=True)
        with open(cache, "wb") as handle:
            pickle.dump(originals, handle)
        for half in ("tune", "heldout"):
            write_set(originals, half, os.path.join(args.work, half))
    with open(cache, "rb") as handle:
        originals = pickle.load(handle)
    print(f"originals: {len(originals)} ({dict(sorted(Counter(o['kind'] for o in originals).items()))}), "
          f"set ready in {time.perf_counter() - start:.0f}s")
    for half in ("tune", "heldout") if args.half == "both" else (args.half,):
        folder = os.path.join(args.work, half)
        with open(os.path.join(folder, "truth.json")) as handle:
            truth = {k: tuple(v) for k, v in json.load(handle).items()}
        mine = [o for o in originals if o["half"] == half]
        with_copies = sum(1 for o in mine if _with_copies(o))
        print(f"\n== {half} half: {len(mine)} originals ({dict(sorted(Counter(o['kind'] for o in mine).items()))}), "
              f"{with_copies} with {len(TRANSFORMS)} copies each, {len(truth)} rows")
        out = os.path.join(args.work, f"out-{half}" + ("-code" if args.code else ""))
        seconds = run_curate(folder, out, [a for kv in args.set for a in ("--set", kv)], args.code)
        ledger = read_ledger(out)
        by_key = {row["key"]: row for row in ledger.values()}
        excluded = {k for k, row in by_key.items() if row["status"] != "kept" and not (row["reason"] or "").startswith("duplicate")}
        reasons = Counter(row["reason"] for row in by_key.values() if row["key"] in excluded)
        pairs, clusters = set(), {}
        for key, row in by_key.items():
            survivor = by_key[ledger[row["duplicate_of"]]["key"]] if row["duplicate_of"] else row
            clusters[key] = survivor["key"]
            if row["duplicate_of"]:
                pairs.add((min(key, survivor["key"]), max(key, survivor["key"])))
        results = [
            score("imagehash r=8", imagehash_pairs(folder, truth, 8), None, truth, originals, excluded),
            score("imagehash r=10", imagehash_pairs(folder, truth, 10), None, truth, originals, excluded),
            score("curate run", pairs, clusters, truth, originals, excluded),
        ]
        print(f"curate run: {seconds:.0f}s; rows dropped for other reasons (left out of recall): {dict(reasons)}; "
              f"image_hashes {descriptor_cost(originals, half):.2f} ms/image (originals up to {MAX_SIDE}px)")
        print(f"{'method':<15}{'pairs':>6}{'prec':>7}" + "".join(f"{t:>12}" for t in TRANSFORMS)
              + "   false pairs: tiles / families / other")
        for r in results:
            row = f"{r['name']:<15}{r['pairs']:>6}{r['precision']:>7.3f}" + "".join(f"{r['recall'][t]:>12.3f}" for t in TRANSFORMS)
            f = r["false"]
            print(row + f"   {f['tiles of one photo']} / {f['clip art of one family']} / {f['other']}")
        for example in results[-1]["examples"][:args.examples]:
            print("  false:", *example)


if __name__ == "__main__":
    main()
