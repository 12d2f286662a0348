"""Threshold curves of the near-dup verification on the tune half of benchmarks/dedup.py's set.

Pair level, in process: image_hashes of every image of the half, every pair whose hash variants
are within r (brute force), verify_pair on each; precision over verified pairs (false ones by kind)
and recall of (copy, original) pairs per copy kind. Each SPEC sets module constants of
transforms/dedup.py (comma-separated NAME=VALUE, cumulative) and prints one line of the curve.
The first spec should be the loosest: later specs only re-verify the pairs it verified.

    python benchmarks/dedup.py --half tune        # builds the set once
    python benchmarks/dedup_curves.py _MIN_LAYOUT_CORRELATION=-1 _MIN_LAYOUT_CORRELATION=0.8 ...
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import sys
import tarfile
import time
from collections import Counter

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from schemas import Col  # noqa: E402
from transforms import dedup  # noqa: E402


def _kind(x: dict, y: dict) -> str:
    if x["kind"] == "tile" and y["kind"] == "tile" and x["group"] == y["group"]:
        return "tiles"
    return "family" if x["group"] == y["group"] else "other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("specs", nargs="+")
    parser.add_argument("--work", default="/tmp/dedup-bench")
    parser.add_argument("--half", default="tune")
    parser.add_argument("--radius", type=int, default=8)
    args = parser.parse_args()
    truth = {k: tuple(v) for k, v in json.load(open(f"{args.work}/{args.half}/truth.json")).items()}
    with open(f"{args.work}/originals.pkl", "rb") as handle:
        originals = pickle.load(handle)
    images = {}
    with tarfile.open(f"{args.work}/{args.half}/00000.tar") as tar:
        for member in tar.getmembers():
            key, ext = member.name.rsplit(".", 1)
            if ext in ("png", "jpg"):
                images[key] = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")
    keys = sorted(images)
    feats = [dedup.image_hashes(images[k]) for k in keys]
    import pyarrow as pa

    values, present = dedup.variant_matrix(pa.array([f[Col.DEDUP_DESCRIPTOR] for f in feats], pa.binary()),
                                           pa.array([f[Col.PHASH] for f in feats]), pa.array([f[Col.PHASH_MIRROR] for f in feats]))
    close = np.zeros((len(keys), len(keys)), dtype=bool)
    for i in range(dedup.VARIANTS):
        for j in range(dedup.VARIANTS):
            both = present[:, i][:, None] & present[:, j][None, :]
            if both.any():
                close |= both & (np.bitwise_count(values[:, i][:, None] ^ values[:, j][None, :]) <= args.radius)
    candidates = [tuple(p) for p in np.argwhere(np.triu(close | close.T, 1)).tolist()]
    parsed = [dedup.parse_descriptor(f[Col.DEDUP_DESCRIPTOR]) for f in feats]
    index = {k: i for i, k in enumerate(keys)}
    original_key = {v[0]: k for k, v in truth.items() if v[1] == "original"}
    wanted = {}
    for key, (o, transform) in truth.items():
        a, b = index[key], index[original_key[o]]
        if transform != "original" and parsed[a] is not None and parsed[b] is not None:
            wanted[(min(a, b), max(a, b))] = transform
    print(f"{args.half}: {len(keys)} images, {len(candidates)} candidate pairs within r={args.radius}")
    pool = None
    for spec in args.specs:
        for item in spec.split(","):
            name, value = item.split("=")
            setattr(dedup, name, float(value))
        start = time.perf_counter()
        verified = [p for p in (pool or candidates) if dedup.verify_pair((parsed[p[0]], None), (parsed[p[1]], None), True, 0.8, 0.9, 16.0, args.radius)]
        pool = pool or verified
        false = Counter(_kind(originals[truth[keys[a]][0]], originals[truth[keys[b]][0]])
                        for a, b in verified if truth[keys[a]][0] != truth[keys[b]][0])
        found = set(verified)
        hit, total = Counter(), Counter(wanted.values())
        for pair, transform in wanted.items():
            hit[transform] += pair in found
        n_false = sum(false.values())
        print(f"{spec:<40} verified {len(verified):5d} false {n_false:4d} (tiles {false['tiles']} / families {false['family']} / "
              f"other {false['other']}) prec {1 - n_false / max(1, len(verified)):.3f} | "
              + " ".join(f"{t} {hit[t] / total[t]:.3f}" for t in total) + f"  [{time.perf_counter() - start:.0f}s]", flush=True)


if __name__ == "__main__":
    main()
