"""Scale of hash-only dedup (the decide phase with CLIP off: hash bands over every sample) on
synthetic 64-bit hashes with planted near-duplicates, through `curate decide` on a features table.

Each size runs in its own process so its peak RSS is its own.
10% of the records are planted near-duplicates of another record (1-3 random bits flipped);
the rest are uniform random hashes. Records carry no descriptor or embedding and no mirror hash,
so this measures banding, bucket comparison, joins and union-find only.
Brute force = all-pairs Hamming distance, vectorised with numpy, for contrast.

    python benchmarks/dedup_scale.py [--sizes 100000 1000000] [--brute 10000 20000]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

PLANTED_SHARE = 0.10


def make_hashes(n: int, seed: int = 0) -> tuple[np.ndarray, int]:
    rng = np.random.default_rng(seed)
    hashes = rng.integers(0, 2**63, size=n, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, n, dtype=np.uint64)
    planted = int(n * PLANTED_SHARE)
    targets = rng.choice(n, size=planted, replace=False)
    sources = rng.integers(0, n, size=planted)
    for t, s in zip(targets, sources):
        if t == s:
            continue
        value = int(hashes[s])
        for bit in rng.choice(64, size=int(rng.integers(1, 4)), replace=False):
            value ^= 1 << int(bit)
        hashes[t] = value
    return hashes, planted


def run_beam(n: int) -> dict:
    """`curate decide` (dedup only) on an n-row features table of hash-only records."""
    import glob

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.cli import main as curate
    from schemas import FEATURES_SCHEMA, Col, Status

    hashes, planted = make_hashes(n)
    table = pa.table({
        Col.UID: [f"{i:032x}" for i in range(n)], Col.STATUS: [Status.KEPT] * n,
        Col.SHA256: [f"{i:064x}" for i in range(n)], Col.PHASH: [f"{int(h):016x}" for h in hashes.tolist()],
        Col.ORIGINAL_WIDTH: pa.array(np.full(n, 256, np.int32)), Col.ORIGINAL_HEIGHT: pa.array(np.full(n, 256, np.int32)),
        Col.CAPTION: ["a photo"] * n,
    })
    table = pa.table({name: table[name] if name in table.column_names else pa.nulls(n, FEATURES_SCHEMA.field(name).type)
                      for name in FEATURES_SCHEMA.names}).cast(FEATURES_SCHEMA)
    with tempfile.TemporaryDirectory() as folder:
        os.makedirs(os.path.join(folder, "features"))
        pq.write_table(table, os.path.join(folder, "features", "survivors.parquet"), row_group_size=4096)
        start = time.perf_counter()
        code = curate(["decide", "--output", folder, "--quiet", "--set", "clip_threshold=-1", "--set", "negatives_k=0",
                       "--set", "negatives_captions=false"])
        seconds = time.perf_counter() - start
        assert code == 0
        decisions = pa.concat_tables([pq.read_table(f) for f in glob.glob(os.path.join(folder, "decisions", "*.parquet"))])
        dropped = int(pa.compute.sum(pa.compute.equal(decisions[Col.STATUS], Status.DROPPED)).as_py() or 0)
        info = json.load(open(os.path.join(folder, "run", "decide.json")))
    counters = {k.split("/", 1)[1]: v for k, v in info["metrics"].items() if k.startswith("dedup/")}
    return {
        "n": n,
        "seconds": seconds,
        "dropped": dropped,
        "planted": planted,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "counters": counters,
    }


def run_brute(n: int) -> dict:
    hashes, _ = make_hashes(n)
    start = time.perf_counter()
    pairs = 0
    for i in range(0, n, 1024):
        dist = np.bitwise_count(hashes[i : i + 1024, None] ^ hashes[None, :])
        pairs += int(np.count_nonzero(dist <= 8))
    pairs = (pairs - n) // 2
    return {"n": n, "seconds": time.perf_counter() - start, "pairs": pairs,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="*", default=[100_000, 1_000_000])
    parser.add_argument("--brute", type=int, nargs="*", default=[10_000, 20_000])
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--one-brute", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_beam(args.one)))
        return
    if args.one_brute:
        print(json.dumps(run_brute(args.one_brute)))
        return

    def child(flag: str, n: int) -> dict:
        out = subprocess.run([sys.executable, __file__, flag, str(n)], capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    beam_results = []
    for n in args.sizes:
        r = child("--one", n)
        beam_results.append(r)
        c = r["counters"]
        print(f"curate decide (hash-only dedup) n={n:>9,}: {r['seconds']:8.1f} s  peak RSS {r['peak_rss_mb']:7.0f} MB  "
              f"dropped {r['dropped']:,} (planted {r['planted']:,})  candidates {c.get('candidate_edges', 0):,}  "
              f"edges {c.get('verified_edges', 0):,}  clusters {c.get('near_clusters', 0):,}", flush=True)
    if len(beam_results) >= 2:
        a, b = beam_results[0], beam_results[-1]
        print(f"time ratio n={b['n']:,}/n={a['n']:,}: {b['seconds'] / a['seconds']:.2f} "
              f"(size ratio {b['n'] / a['n']:.0f})")
    for n in args.brute:
        r = child("--one-brute", n)
        print(f"brute force all-pairs n={n:>7,}: {r['seconds']:8.2f} s  pairs within 8: {r['pairs']:,}  "
              f"(quadratic: 1M would take ~{r['seconds'] * (1e6 / n) ** 2 / 3600:.1f} h)", flush=True)


if __name__ == "__main__":
    main()
