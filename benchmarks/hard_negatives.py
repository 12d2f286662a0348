"""Scale benchmark of neighbour mining: the partitioned MineHardNegatives path at 100k and 1M.

    python benchmarks/hard_negatives.py [--sizes 100000,1000000] [--dim 512]

Synthetic 512-d unit embeddings with CLIP-like structure (coarse themes -> topics -> samples; the
generator is below), generated inside the pipeline from chunk seeds so no embedding matrix is ever
built outside it. Each size runs in its own process on Beam's in-process FnApiRunner (one worker,
the 2-core laptop case) through the partitioned path (k-means centroids side input, each sample to
its nearest `negatives_probe` centroids, GroupByKey(centroid), exact faiss inside groups, merge).
Printed: wall time and peak RSS (whole process tree) per size, time(1M)/time(100k), and recall@k
of the partitioned result against exact faiss (IndexFlatIP, same exclusions) on the 100k set.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import REPO, run_measured  # noqa: E402

CHUNK = 10_000
THEMES = 256
TOPICS = 20_000
SEED = 7
NOISE = 0.7


def _topics(dim: int) -> np.ndarray:
    """Topic centres: a theme direction plus a topic-specific one (themes overlap, topics nest)."""
    rng = np.random.default_rng(SEED)
    themes = rng.normal(size=(THEMES, dim)).astype(np.float32)
    topics = themes[rng.integers(0, THEMES, TOPICS)] + 0.9 * rng.normal(size=(TOPICS, dim)).astype(np.float32)
    return topics / np.linalg.norm(topics, axis=1, keepdims=True)


def uid_of(index: int) -> str:
    return hashlib.sha256(str(index).encode()).hexdigest()[:32]


def chunk_embeddings(chunk: int, dim: int, topics: np.ndarray) -> np.ndarray:
    """Rows [chunk*CHUNK, (chunk+1)*CHUNK): a topic centre plus noise, unit norm, float16 (as stored)."""
    rng = np.random.default_rng([SEED, chunk])
    assigned = rng.integers(0, len(topics), CHUNK)
    # noise of squared norm NOISE: two samples of one topic have cosine ~ 1 / (1 + NOISE) ~ 0.6
    vectors = topics[assigned] + np.sqrt(NOISE / dim) * rng.normal(size=(CHUNK, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors.astype(np.float16)


_TOPICS_CACHE: dict = {}


def chunk_records(chunk: int, dim: int):
    from schemas import Col

    topics = _TOPICS_CACHE.get(dim)
    if topics is None:
        topics = _TOPICS_CACHE[dim] = _topics(dim)
    vectors = chunk_embeddings(chunk, dim, topics)
    for row in range(CHUNK):
        index = chunk * CHUNK + row
        yield {
            Col.UID: uid_of(index),
            Col.CAPTION_CLEAN: f"sample {index}",
            Col.IMAGE_EMBEDDING: vectors[row],
            Col.TEXT_EMBEDDING: None,
        }


def _format(item) -> str:
    uid, negatives = item
    return uid + "\t" + ",".join(f"{n['uid']}:{n['score']:.6f}" for n in negatives if n["kind"] == "image")


def worker(size: int, dim: int, out: str, overrides: list[str]) -> None:
    """One pipeline run (in its own process, so its peak RSS is its own)."""
    import apache_beam as beam
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    from pipeline.config import build_config
    from transforms.negatives import MineHardNegatives

    config = build_config(overrides=["negatives_captions=false", "negatives_exact_max=0"] + overrides)
    started = time.perf_counter()
    with beam.Pipeline(runner=FnApiRunner()) as p:
        (
            p
            | "Chunks" >> beam.Create(list(range(size // CHUNK)))
            | "Reshuffle" >> beam.Reshuffle()
            | "Generate" >> beam.FlatMap(chunk_records, dim=dim)
            | "Mine" >> MineHardNegatives(config)
            | "Format" >> beam.Map(_format)
            | "Write" >> beam.io.WriteToText(out, shard_name_template="-SSSSS-of-NNNNN")
        )
    print(json.dumps({"pipeline_seconds": time.perf_counter() - started}))


def exact_reference(size: int, dim: int, k: int, ceiling: float, queries: int) -> dict[str, list[str]]:
    """Exact faiss over the whole set with the transform's exclusions (self, above the ceiling).

    `queries` > 0: only every (size // queries)-th sample queries (the search itself is exact over
    all `size` samples); the full 100k x 100k search takes minutes on 2 cores.
    """
    import faiss

    topics = _topics(dim)
    vectors = np.concatenate([chunk_embeddings(c, dim, topics) for c in range(size // CHUNK)]).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    uids = [uid_of(i) for i in range(size)]
    index = faiss.IndexFlatIP(dim)
    index.add(vectors)
    rows = np.arange(0, size, max(1, size // queries)) if queries else np.arange(size)
    started = time.perf_counter()
    scores, ids = index.search(vectors[rows], k + 8)
    seconds = time.perf_counter() - started
    result = {}
    for position, row in enumerate(rows):
        row = int(row)
        kept = [(-s, uids[j]) for s, j in zip(scores[position], ids[position]) if j >= 0 and j != row and s <= ceiling]
        result[uids[row]] = [u for _, u in sorted(kept)[:k]]
    return result, seconds


def read_result(out: str) -> dict[str, list[str]]:
    result = {}
    for path in sorted(Path(out).parent.glob(Path(out).name + "-*")):
        for line in path.read_text().splitlines():
            uid, _, rest = line.partition("\t")
            result[uid] = [item.split(":")[0] for item in rest.split(",") if item]
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--set", action="append", default=[], help="config override, key=value")
    parser.add_argument("--recall-queries", type=int, default=10_000, help="0: every sample queries")
    parser.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.dim, args.out, args.set)
        return

    from pipeline.config import build_config

    config = build_config(overrides=args.set)
    sizes = [int(s) for s in args.sizes.split(",")]
    timings = {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            out = str(Path(tmp) / f"neg{size}")
            command = [sys.executable, str(Path(__file__).resolve()), "--worker", str(size), "--dim", str(args.dim), "--out", out]
            for item in args.set:
                command += ["--set", item]
            measured = run_measured(command, cwd=REPO, timeout=3600)
            timings[size] = measured["seconds"]
            mined = read_result(out)
            print(f"partitioned n={size:>9,} d={args.dim}: {measured['seconds']:7.1f} s wall, "
                  f"peak RSS {measured['peak_rss_mb']:7.0f} MB, {len(mined):,} uids out")
            if size == min(sizes):
                exact, exact_seconds = exact_reference(size, args.dim, config.negatives_k, config.negatives_ceiling, args.recall_queries)
                hits = sum(len(set(mined.get(u, [])) & set(e)) for u, e in exact.items())
                total = sum(len(e) for e in exact.values())
                print(f"exact faiss IndexFlatIP n={size:,}: {len(exact):,} queries searched in {exact_seconds:.1f} s (in memory, not Beam)")
                print(f"recall@{config.negatives_k} partitioned vs exact on n={size:,} ({len(exact):,} queries): {hits / total:.4f}")
    if len(sizes) > 1:
        small, large = min(sizes), max(sizes)
        print(f"time({large:,})/time({small:,}) = {timings[large] / timings[small]:.2f} (target <= 12)")


if __name__ == "__main__":
    main()
