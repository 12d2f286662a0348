"""Neighbour mining alone: the decide phase's partitioned search (transforms/neighbours.py: two-level
k-means groups, each sample a candidate in its `probe` nearest groups and a query in its nearest,
exact search inside each group) against exact search over every sample (faiss's brute-force
top-k with the same skip rules), on three embedding distributions, as a curve of recall@3 against
the candidates scanned per query for several group sizes and probes.

    python benchmarks/hard_negatives.py [--rows 100000] [--queries 1000] [--kinds themes,graded,plateau]
                                        [--group-sizes 500,1000,2000] [--probes 1,2,3]
                                        [--ivf-lists 25,100] [--ivf-candidates 1000,2000,4000,8000]
                                        [--cells 2,4,16] [--neighbour-lists 16,64] [--list-size 64]

Distributions (512-d unit vectors):
- themes: coarse themes -> topics -> samples (the generator below): clear topic clusters;
- graded, plateau: benchmarks/scale.py's (shared direction, Zipf topics, sub-topics; graded adds a
  16-d style shared by all topics, so neighbours cross topic lines; plateau has flat neighbourhoods).
On none of them, nor on uniform random vectors, can a partitioned search that scans a fixed few
thousand candidates per query find the exact top 3 of every query: the curve shows what a scan
budget buys on each. The last two columns bound it: the share of the exact top 3 that have a copy
in the query's home partition, and in its home group. `--cells` prints the same bound for plain
coarse k-means partitions (a query sent to its 1-4 nearest), `--neighbour-lists` a design measured
but not built (small lists, each list's queries searching its nearest lists; a partition copies
every list its own lists need) with its recall, candidates and copies of each row. The pipeline's
public path is measured in benchmarks/scale.py.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


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


def vectors_of(kind: str, rows: int, dim: int = 512) -> np.ndarray:
    if kind == "themes":
        topics = _topics(dim)
        return np.concatenate([chunk_embeddings(c, dim, topics) for c in range(-(-rows // CHUNK))])[:rows]
    import scale

    rng = np.random.default_rng(11)
    space = scale.Space(1, kind)
    p = 1.0 / (np.arange(scale.TOPICS) + 10.0) ** 1.1
    topic = rng.choice(scale.TOPICS, rows, p=p / p.sum())
    sub = rng.integers(0, scale.SUBTOPICS, rows)
    return np.concatenate([space.vectors(topic[i:i + 50_000], sub[i:i + 50_000], rng) for i in range(0, rows, 50_000)])


def coverage(part, cells: np.ndarray, queries: np.ndarray, exact: np.ndarray) -> tuple[float, float]:
    """Shares of the queries' exact neighbours that have a copy in the query's home partition and
    in its home group: what any search inside them can find at best."""
    parts = part.fine_parent[cells]
    truth = exact >= 0
    rows = np.where(truth, exact, 0)
    in_partition = (parts[rows] == parts[queries, 0][:, None, None]).any(axis=2) & truth
    in_group = (cells[rows] == cells[queries, 0][:, None, None]).any(axis=2) & truth
    return in_partition.sum() / max(1, truth.sum()), in_group.sum() / max(1, truth.sum())


def partitioned(pool, vectors, group_size: int, probe: int, queries: np.ndarray,
                exact: np.ndarray) -> tuple[dict, float, float, tuple[float, float]]:
    """The decide phase's search, in memory: ({query: neighbour set}, candidates per query, seconds,
    `coverage`)."""
    from transforms import neighbours as nn

    started = time.perf_counter()
    order = np.argsort(np.array([int(uid_of(i)[:15], 16) for i in range(len(vectors))]))
    sample = vectors[order[:nn.sample_size(len(vectors), group_size, 0, 65_536)]]
    part = nn.train_partitioning(sample, len(vectors), group_size, 65_536)
    cells = nn.assign_groups(vectors, part, probe)
    wanted = np.zeros(len(vectors), dtype=bool)
    wanted[queries] = True
    found, scanned = {}, 0
    for group in range(part.groups):
        members = np.flatnonzero((cells == group).any(axis=1))
        homes = members[(cells[members, 0] == group) & wanted[members]]
        if not len(homes):
            continue
        scanned += len(homes) * len(members)
        sub = nn.Pool(vectors[members], pool.caption_ids[members], pool.hashes[members], pool.present[members])
        neighbours, _ = nn.group_neighbours(sub, np.searchsorted(members, homes), 3, 0.95, 8)
        for home, row in zip(homes.tolist(), neighbours):
            found[home] = set(members[row[row >= 0]].tolist())
    return found, scanned / len(queries), time.perf_counter() - started, coverage(part, cells, queries, exact)


def inverted_file(vectors: np.ndarray, per_list: int, candidates: int, queries: np.ndarray,
                  ceiling: float = 0.95) -> tuple[dict, float, float]:
    """The peer: faiss's IndexIVFFlat with `per_list` samples a list (k-means on a sample of 40 per
    list), each query probing as many lists as `candidates` needs; the top 3 other samples under
    the ceiling (the generated captions and hashes never trigger the other skip rules). Returns
    ({query: neighbour set}, candidates per query, seconds)."""
    import faiss

    started = time.perf_counter()
    lists = max(1, len(vectors) // per_list)
    rng = np.random.default_rng(5)
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(vectors.shape[1]), vectors.shape[1], lists, faiss.METRIC_INNER_PRODUCT)
    index.train(vectors[rng.choice(len(vectors), min(len(vectors), 40 * lists), replace=False)])
    index.add(vectors)
    index.nprobe = max(1, min(lists, candidates // per_list))
    scores, found = index.search(vectors[queries], 12)
    result = {}
    for query, row, row_scores in zip(queries.tolist(), found, scores):
        keep = (row >= 0) & (row != query) & (row_scores <= ceiling)
        result[query] = set(row[keep][:3].tolist())
    return result, index.nprobe * per_list, time.perf_counter() - started


def cell_bound(vectors: np.ndarray, cells: int, queries: np.ndarray, exact: np.ndarray) -> list[float]:
    """Shares of the queries' exact neighbours whose nearest of `cells` k-means cells (a
    partition) is among the query's 1, 2, 3, 4 nearest cells: what any search that sends a query
    to that many partitions, each holding its own samples once, can find at best."""
    from transforms import neighbours as nn

    rng = np.random.default_rng(4)
    sample = vectors[np.sort(rng.choice(len(vectors), min(len(vectors), 65_536), replace=False))]
    centroids = nn._kmeans(sample, cells, nn.KMEANS_SEED)
    truth = exact[exact >= 0]
    home_of_truth = nn.nearest_centroids(vectors[truth], centroids, 1)[:, 0]
    query_cells = np.repeat(nn.nearest_centroids(vectors[queries], centroids, 4), (exact >= 0).sum(axis=1), axis=0)
    return [float(np.mean((home_of_truth[:, None] == query_cells[:, :t]).any(axis=1))) for t in range(1, 5)]


def list_neighbourhoods(vectors: np.ndarray, list_size: int, partition_rows: int, neighbour_lists: int,
                        queries: np.ndarray, exact: np.ndarray) -> tuple[float, float, float]:
    """A design that was measured, not built: small k-means lists (two-level, as the decide phase
    trains them), the queries of a list searching the rows of its `neighbour_lists` nearest lists;
    a partition is a coarse cell and holds a copy of every list its own lists need. Returns
    (recall@3, candidates per query, copies of a row over all partitions)."""
    import faiss
    from transforms import neighbours as nn

    rng = np.random.default_rng(4)
    sample = vectors[np.sort(rng.choice(len(vectors), min(len(vectors), max(65_536, 8 * len(vectors) // list_size)),
                                        replace=False))]
    part = nn.train_partitioning(sample, len(vectors), list_size, partition_rows)
    home = np.concatenate([nn.assign_groups(vectors[i:i + 65_536], part, 1)[:, 0] for i in range(0, len(vectors), 65_536)])
    sizes = np.bincount(home, minlength=part.groups)
    order, starts = np.argsort(home, kind="stable"), np.r_[0, np.cumsum(sizes)]
    near = faiss.knn(part.fine, part.fine, min(neighbour_lists, part.groups), metric=faiss.METRIC_INNER_PRODUCT)[1]
    found, scanned = {}, 0
    for query in queries.tolist():
        pool = np.concatenate([order[starts[g]:starts[g + 1]] for g in near[home[query]]])
        scanned += len(pool)
        cosines = vectors[pool] @ vectors[query]
        keep = (pool != query) & (cosines <= 0.95)
        found[query] = set(pool[keep][np.argsort(-cosines[keep], kind="stable")[:3]].tolist())
    needed = np.zeros((part.partitions, part.groups), dtype=bool)
    needed[np.repeat(part.fine_parent, near.shape[1]), near.ravel()] = True
    copies = float((needed.sum(axis=0) * sizes).sum() / len(vectors))
    return recall_of(found, queries, exact), scanned / len(queries), copies


def recall_of(found: dict, queries: np.ndarray, exact: np.ndarray) -> float:
    """Share of the queries' exact neighbours (`exact`: [q, 3] indices, -1 pads) that `found` has."""
    hits = sum(len(set(row[row >= 0].tolist()) & found.get(int(q), set())) for q, row in zip(queries, exact))
    return hits / max(1, int((exact >= 0).sum()))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--kinds", default="themes,graded,plateau")
    parser.add_argument("--group-sizes", default="500,1000,2000")
    parser.add_argument("--probes", default="1,2,3")
    parser.add_argument("--ivf-lists", default="", help="per-list sizes of a faiss IndexIVFFlat run beside ours, e.g. 25,100")
    parser.add_argument("--ivf-candidates", default="1000,2000,4000,8000")
    parser.add_argument("--cells", default="", help="coarse cell counts whose partition bound to print, e.g. 2,4,16")
    parser.add_argument("--neighbour-lists", default="", help="list neighbourhood sizes to measure, e.g. 16,64")
    parser.add_argument("--list-size", type=int, default=64)
    args = parser.parse_args()
    from transforms import neighbours as nn

    print("| embeddings | group size | probe | candidates / query | recall@3 | seconds | exact seconds | "
          "exact top 3 in home partition | in home group |")
    print("|---|---|---|---|---|---|---|---|---|")
    for kind in args.kinds.split(","):
        raw = vectors_of(kind, args.rows)
        units, _ = nn.unit_rows(raw, np.ones(len(raw), dtype=bool))
        vectors = nn.search_vectors(units)
        rng = np.random.default_rng(3)
        pool = nn.Pool(vectors, rng.integers(0, 2**63, len(vectors)).astype(np.uint64),
                       rng.integers(0, 2**63, (len(vectors), 2)).astype(np.uint64), np.ones((len(vectors), 2), bool))
        queries = np.sort(rng.choice(len(vectors), args.queries, replace=False))
        started = time.perf_counter()
        exact, _ = nn.group_neighbours(pool, queries, 3, 0.95, 8)  # over every sample: the reference
        exact_seconds = time.perf_counter() - started
        for group_size in [int(g) for g in args.group_sizes.split(",")]:
            for probe in [int(p) for p in args.probes.split(",")]:
                found, scanned, seconds, (in_partition, in_group) = partitioned(pool, vectors, group_size, probe, queries, exact)
                recall = recall_of(found, queries, exact)
                print(f"| {kind} | {group_size} | {probe} | {scanned:,.0f} | {recall:.3f} | {seconds:.1f} | "
                      f"{exact_seconds:.1f} | {in_partition:.3f} | {in_group:.3f} |", flush=True)
        for per_list in [int(p) for p in args.ivf_lists.split(",") if p]:
            for candidates in [int(c) for c in args.ivf_candidates.split(",") if c]:
                found, scanned, seconds = inverted_file(vectors, per_list, candidates, queries)
                recall = recall_of(found, queries, exact)
                print(f"| {kind} | faiss IVF, {per_list} a list | - | {scanned:,.0f} | {recall:.3f} | {seconds:.1f} | "
                      f"{exact_seconds:.1f} | - | - |", flush=True)
        for cells in [int(c) for c in args.cells.split(",") if c]:
            shares = cell_bound(vectors, cells, queries, exact)
            print(f"| {kind} | {cells} coarse cells | exact top 3 in the query's nearest 1 / 2 / 3 / 4 cells: "
                  + " / ".join(f"{share:.3f}" for share in shares) + " |", flush=True)
        for lists in [int(m) for m in args.neighbour_lists.split(",") if m]:
            recall, scanned, copies = list_neighbourhoods(vectors, args.list_size, 65_536, lists, queries, exact)
            print(f"| {kind} | lists of {args.list_size}, {lists} neighbour lists | - | {scanned:,.0f} | {recall:.3f} | - | - | "
                  f"copies of a row: {copies:.2f} | - |", flush=True)


if __name__ == "__main__":
    main()
