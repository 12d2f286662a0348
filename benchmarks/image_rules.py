"""The decode stage's image rules (blank_image, too_small, bad_aspect_ratio) on real files.

Images (Debian packages, not needed by the tests):
  openclipart-png             /usr/share/openclipart: clip art, line drawings, outline maps
  plasma-workspace-wallpapers /usr/share/wallpapers: photos and renders, many sizes up to 5120x2880
  gnome-backgrounds           /usr/share/backgrounds
    apt-get install openclipart-png plasma-workspace-wallpapers gnome-backgrounds

Every file is decoded twice with the default config: BEFORE, the blank rule as it was before
issue 21 (`legacy_is_blank`: the per-channel std of the 32x32 box thumbnail alone decides) and
AFTER, today's `decode_image`. Symlinked copies count once. Prints drops per rule and set, the
files whose verdict changed, the decode time per image, the low-ink drawings (share of pixels off
the background colour under 1%) and what became of them, and writes a contact sheet per set and
rule to --out (each dropped image as stored and contrast-stretched, so faint strokes show).
--timing-repeats times both rules on a fixed mix (300 clip arts, 30 wallpapers) N times
(CPU seconds of this process: steadier than wall time on a shared machine).

    python benchmarks/image_rules.py --out /tmp/image_rules [--timing-repeats 5] [--timing-only]
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import random
import statistics
import sys
import time
from collections import Counter

import numpy as np
from PIL import Image, ImageDraw, ImageOps

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from pipeline.config import build_config  # noqa: E402
from transforms import decode  # noqa: E402

SETS = {
    "openclipart": ["/usr/share/openclipart/**/*.png"],
    "wallpapers": [f"/usr/share/{root}/**/*.{ext}" for root in ("wallpapers", "backgrounds")
                   for ext in ("jpg", "jpeg", "png", "webp")],
}
RULES = ("blank_image", "too_small", "bad_aspect_ratio")
CELL = 150


def legacy_is_blank(thumbnail: Image.Image, std_threshold: float) -> bool:
    """LEGACY: the blank rule before issue 21. Per-channel std of the 32x32 box thumbnail below
    the threshold was blank, with no look at the decoded pixels (thin strokes averaged away)."""
    spread = np.asarray(thumbnail, dtype=np.float32).reshape(-1, 3).std(axis=0)
    return float(spread.max()) < std_threshold


@contextlib.contextmanager
def legacy_rule():
    """decode_image with the legacy blank rule swapped in: same decode, same cost as before."""
    saved = decode.is_blank, decode.has_ink
    decode.is_blank, decode.has_ink = legacy_is_blank, lambda *_: False
    try:
        yield
    finally:
        decode.is_blank, decode.has_ink = saved


def files_of(patterns: list[str]) -> list[str]:
    """Real paths, each once (the packages ship many symlinked copies)."""
    return sorted({os.path.realpath(path) for pattern in patterns for path in glob.glob(pattern, recursive=True)
                   if os.path.isfile(path)})


def verdict(data: bytes, config) -> tuple[str, float, object]:
    start = time.perf_counter()
    try:
        decoded = decode.decode_image(data, config)
        outcome = "kept"
    except decode.ImageRejected as rejected:
        decoded, outcome = None, rejected.reason.value
    return outcome, time.perf_counter() - start, decoded


def plain_rgb(path: str) -> Image.Image:
    """The whole image as RGB on white, for the ink share and the contact sheet."""
    with Image.open(path) as image:
        image.load()
        return decode._to_rgb(image)


def ink_share(rgb: Image.Image) -> float:
    """Share of pixels more than 16 levels (some channel) off the median colour."""
    pixels = np.asarray(rgb, dtype=np.int16)
    background = np.median(pixels.reshape(-1, 3)[:: max(1, pixels.size // 3 // 65536)], axis=0)
    return float((np.abs(pixels - background).max(axis=2) > 16).mean())


def contact_sheet(entries: list[tuple[str, str]], title: str, path: str, columns: int = 8) -> None:
    """Each entry: (file, label). Two tiles per file: as stored, and autocontrast (faint ink shows)."""
    label_height = 28
    rows = max(1, -(-len(entries) // columns))
    sheet = Image.new("RGB", (columns * (2 * CELL + 20), 30 + rows * (CELL + label_height + 6)), (90, 90, 90))
    draw = ImageDraw.Draw(sheet)
    draw.text((6, 8), title, fill=(255, 255, 255))
    for index, (file, label) in enumerate(entries):
        x = (index % columns) * (2 * CELL + 20) + 4
        y = 30 + (index // columns) * (CELL + label_height + 6)
        try:
            tile = plain_rgb(file)
        except Exception:  # noqa: BLE001 - undecodable files get an empty tile
            tile = Image.new("RGB", (CELL, CELL), (255, 0, 255))
        tile.thumbnail((CELL, CELL), Image.Resampling.LANCZOS)
        for offset, shown in ((0, tile), (CELL + 6, ImageOps.autocontrast(tile, cutoff=0))):
            sheet.paste(shown, (x + offset + (CELL - shown.width) // 2, y + (CELL - shown.height) // 2))
        name = os.path.basename(file)
        draw.text((x, y + CELL + 2), name[:44], fill=(255, 255, 255))
        draw.text((x, y + CELL + 14), label[:44], fill=(255, 255, 160))
    sheet.save(path)


def run_set(name: str, files: list[str], config, out: str) -> dict:
    before, after, seconds_before, seconds_after = Counter(), Counter(), [], []
    dropped = {rule: [] for rule in RULES}
    rescued, newly_dropped, low_ink = [], [], []
    for index, file in enumerate(files):
        with open(file, "rb") as handle:
            data = handle.read()
        # Alternate which rule runs first, so file caching and clock drift favour neither.
        if index % 2:
            outcome_after, t_after, decoded = verdict(data, config)
            with legacy_rule():
                outcome_before, t_before, _ = verdict(data, config)
        else:
            with legacy_rule():
                outcome_before, t_before, _ = verdict(data, config)
            outcome_after, t_after, decoded = verdict(data, config)
        before[outcome_before] += 1
        after[outcome_after] += 1
        seconds_before.append(t_before)
        seconds_after.append(t_after)
        size = "x".join(map(str, Image.open(file).size))
        if outcome_after in dropped:
            dropped[outcome_after].append((file, f"{outcome_after} {size}"))
        if outcome_before == "blank_image" and outcome_after == "kept":
            rescued.append((file, f"kept now {size}"))
        if outcome_after == "blank_image" and outcome_before != "blank_image":
            newly_dropped.append((file, f"blank now {size}"))
        if outcome_after in ("kept", "blank_image"):
            share = ink_share(decoded.rgb if decoded is not None else plain_rgb(file))
            if share < 0.01:
                low_ink.append((file, outcome_after, share))
    sheets = []
    for rule, entries in dropped.items():
        if entries:
            path = os.path.join(out, f"{name}_{rule}_after.png")
            contact_sheet(entries, f"{name}: dropped as {rule} (left: as is, right: autocontrast)", path)
            sheets.append(path)
    if rescued:
        path = os.path.join(out, f"{name}_blank_before_kept_after.png")
        contact_sheet(rescued, f"{name}: blank_image before, kept now", path)
        sheets.append(path)
    low_ink.sort(key=lambda item: item[2])
    if low_ink:
        path = os.path.join(out, f"{name}_low_ink.png")
        contact_sheet([(file, f"{outcome} ink {share:.4f}") for file, outcome, share in low_ink[:240]],
                      f"{name}: decoded images with under 1% ink, least ink first", path)
        sheets.append(path)
    return {
        "files": len(files),
        "before": dict(before),
        "after": dict(after),
        "rescued": [file for file, _ in rescued],
        "newly_dropped": [file for file, _ in newly_dropped],
        "low_ink": len(low_ink),
        "low_ink_dropped": [file for file, outcome, _ in low_ink if outcome != "kept"],
        "ms_per_image_before": 1000 * statistics.mean(seconds_before),
        "ms_per_image_after": 1000 * statistics.mean(seconds_after),
        "sheets": sheets,
    }


def timing(sets: dict, config, repeats: int) -> dict:
    """Both rules over one fixed mix, alternating per repeat; the median of the per-repeat means."""
    rng = random.Random(0)
    mix = rng.sample(sets["openclipart"], min(300, len(sets["openclipart"])))
    mix += rng.sample(sets["wallpapers"], min(30, len(sets["wallpapers"])))
    blobs = []
    for file in mix:
        with open(file, "rb") as handle:
            blobs.append(handle.read())
    runs = {"before": [], "after": []}
    for repeat in range(repeats):
        order = ("before", "after") if repeat % 2 == 0 else ("after", "before")
        for which in order:
            with legacy_rule() if which == "before" else contextlib.nullcontext():
                start = time.process_time()
                for data in blobs:
                    verdict(data, config)
                runs[which].append(1000 * (time.process_time() - start) / len(blobs))
    before, after = statistics.median(runs["before"]), statistics.median(runs["after"])
    return {"images": len(blobs), "repeats": repeats, "cpu_ms_before": before, "cpu_ms_after": after,
            "ratio": after / before, "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/image_rules")
    parser.add_argument("--timing-repeats", type=int, default=5, help="0: skip the timing on the fixed mix")
    parser.add_argument("--timing-only", action="store_true", help="only the timing on the fixed mix")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    config = build_config()
    sets = {name: files_of(patterns) for name, patterns in SETS.items()}
    if not all(sets.values()):
        sys.exit("no images found: apt-get install openclipart-png plasma-workspace-wallpapers gnome-backgrounds")
    results = {} if args.timing_only else {name: run_set(name, files, config, args.out) for name, files in sets.items()}
    print(f"{'set':<12} {'files':>6} {'rule':<17} {'before':>7} {'after':>6}")
    for name, result in results.items():
        for rule in RULES:
            print(f"{name:<12} {result['files']:>6} {rule:<17} {result['before'].get(rule, 0):>7} "
                  f"{result['after'].get(rule, 0):>6}")
        others = {k: v for k, v in result["after"].items() if k not in RULES + ("kept",)}
        print(f"{name:<12} kept before {result['before'].get('kept', 0)}, after {result['after'].get('kept', 0)}"
              f"; other reasons after: {others or 'none'}")
        print(f"{name:<12} blank before, kept now: {len(result['rescued'])}; blank now, not before: "
              f"{len(result['newly_dropped'])}; low-ink (<1%) decoded: {result['low_ink']}, of them dropped: "
              f"{len(result['low_ink_dropped'])} {[os.path.basename(f) for f in result['low_ink_dropped']]}")
        print(f"{name:<12} wall ms/image in the pass: before {result['ms_per_image_before']:.2f}, "
              f"after {result['ms_per_image_after']:.2f}")
    if args.timing_repeats:
        results["timing"] = timing(sets, config, args.timing_repeats)
        t = results["timing"]
        print(f"timing, {t['images']} images x {t['repeats']} repeats (CPU ms/image, median of repeats): "
              f"before {t['cpu_ms_before']:.2f}, after {t['cpu_ms_after']:.2f}, ratio {t['ratio']:.3f}")
    with open(os.path.join(args.out, "summary.json"), "w") as handle:
        json.dump(results, handle, indent=1)
    print("contact sheets:", *[sheet for r in results.values() if "sheets" in r for sheet in r["sheets"]], sep="\n  ")


if __name__ == "__main__":
    main()
