"""Neighbours in CLIP space (decide phase, pure): the groups a large dataset is searched in, and the
exact search inside one group. Used by hard-negative mining (the nearest other kept samples) and
by near-dedup (candidates are looked for among the samples of one group).

Groups. Up to an exact-search size every sample is in one group. Above it, an inverted-file
partitioning of the space, two levels deep, trained with faiss k-means on a deterministic sample
(the samples with the smallest uid hashes): coarse centroids cut the space into partitions of
tens of thousands of samples (what one worker holds at a time), and fine centroids, trained per
coarse cell, cut each partition into groups of about `group_size`. A sample's fine cells are its
`probe` nearest fine centroids under its two nearest coarse ones; it is a candidate in the group
of each and a query in the group of the first (its home). Near ties between centroids are settled
in float64 so a sample's cells never depend on the batch it was assigned in.

Search. `group_neighbours` returns, for each query, its k best valid neighbours in the group by
float64 cosine (ties by pool index, which is uid order), skipping itself, cosines above the
ceiling, pHash near-copies and identical normalised captions. faiss's top-k (BLAS product and a
heap in C++) finds the first candidates of a whole block; a query whose first candidates do not
settle it (too many skipped: a crowded space, many near-copies) is searched deeper on its own.
The answer is the exact top k either way: candidates are ranked by float32 cosine, re-scored in
float64, and a list is only settled once the next float32 cosine is below the k-th by more than
float32's error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
from typing import Optional, Sequence

import numpy as np

KMEANS_ITERATIONS = 20
KMEANS_SEED = 1234
COARSE_PROBE = 2  # coarse cells whose fine centroids a sample is compared with
MIN_POINTS_PER_CENTROID = 4  # k-means needs several points per centroid
_FLOAT32_SLACK = 1e-4  # float32 cosines of unit vectors are off by ~1e-6 from float64 ones
_QUERY_BLOCK = 16_384  # queries per faiss call (faiss blocks its product itself; small calls are slow)
_FIRST_CANDIDATES = 16  # beyond k, candidates of a block's first look
_DEEP_CHUNK = 256  # candidates checked at a time when a query is searched on its own


# ------------------------------------------------------------------------------------------------
# vectors
# ------------------------------------------------------------------------------------------------


def unit_rows(values: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stored embeddings [n, d] (any float type) -> (the float16 unit vectors a search works on,
    whether each row has one). A row has none when it is missing, not finite or zero. Each row
    is divided by its norm as a lone vector's norm is computed (`np.linalg.norm` of one row is a
    BLAS dot; the stacked product below is the same dot per row, bit for bit), so a sample gets
    the same vector in every batch."""
    vectors = np.ascontiguousarray(values, dtype=np.float32)
    valid = np.asarray(valid, dtype=bool).copy()
    if vectors.size == 0:
        return np.zeros(vectors.shape, dtype=np.float16), valid
    valid &= np.isfinite(vectors).all(axis=1)
    norms = np.sqrt(np.matmul(vectors[:, None, :], vectors[:, :, None])[:, 0, 0])
    valid &= norms > 0
    safe = np.where(valid, norms, 1.0).astype(np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        units = (vectors / safe[:, None]).astype(np.float16)
    units[~valid] = 0
    return units, valid


def search_vectors(units: np.ndarray) -> np.ndarray:
    """float16 unit vectors -> the float32 rows a search multiplies (renormalised after the
    float16 rounding)."""
    matrix = np.asarray(units, dtype=np.float32)
    if matrix.ndim != 2 or not len(matrix):
        return np.zeros((len(matrix), matrix.shape[-1] if matrix.ndim == 2 else 0), dtype=np.float32)
    matrix = matrix / np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)
    return np.ascontiguousarray(matrix, dtype=np.float32)


def normalised_caption(caption: str) -> str:
    return " ".join(re.findall(r"\w+", (caption or "").casefold()))


def caption_id(caption: str) -> int:
    """64-bit id of a caption's normalised form: equal ids are equal captions for the skip rule."""
    digest = hashlib.blake2b(normalised_caption(caption).encode("utf-8", "replace"), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rescore(queries64: np.ndarray, pool_vectors: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """float64 cosines of queries [d] or [b, d] with the pool rows `indices` ([n] or [b, n]). The
    products are exact in float64 and summed along the vector (numpy's pairwise sum over the
    contiguous axis), so a pair gets the same bits in whichever block, group or direction."""
    return (pool_vectors[indices].astype(np.float64) * queries64[..., None, :]).sum(axis=-1)


def near_copies(anchor_hashes, anchor_present, other_hashes, other_present, radius: int) -> np.ndarray:
    """Whether a pHash (or mirrored pHash) of each anchor [b, 2] is within `radius` of one of its
    candidates' [b, n, 2] -> [b, n]: a near-duplicate, not a negative. An anchor without a pHash
    is near nothing."""
    near = np.zeros(other_hashes.shape[:2], dtype=bool)
    if radius < 0:
        return near
    for mine in (0, 1):
        for theirs in (0, 1):
            distance = np.bitwise_count(anchor_hashes[:, None, mine] ^ other_hashes[..., theirs])
            near |= anchor_present[:, None, mine] & other_present[..., theirs] & (distance <= radius)
    return near & anchor_present[:, None, 0]


# ------------------------------------------------------------------------------------------------
# the search inside one group
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Pool:
    """One group's samples in one space, as arrays; index order is uid order."""

    vectors: np.ndarray  # [n, d] float32 (`search_vectors`)
    caption_ids: np.ndarray  # [n] uint64 (`caption_id`)
    hashes: np.ndarray  # [n, 2] uint64: pHash, mirrored pHash
    present: np.ndarray  # [n, 2] bool: whether each hash is there

    def __len__(self) -> int:
        return len(self.vectors)


def _top_unsorted(cosines: np.ndarray, depth: int) -> np.ndarray:
    size = cosines.shape[-1]
    if depth >= size:
        return np.broadcast_to(np.arange(size), cosines.shape)
    return np.argpartition(cosines, size - depth, axis=-1)[..., size - depth:]


def _valid(pool: Pool, queries: np.ndarray, candidates: np.ndarray, cosines: np.ndarray, scores: np.ndarray,
           ceiling: float, radius: int) -> np.ndarray:
    """[b, n] whether each candidate of each query may be its negative."""
    safe = np.maximum(candidates, 0)
    return (
        (candidates >= 0) & (cosines <= ceiling + _FLOAT32_SLACK) & (scores <= ceiling)
        & (safe != queries[:, None])
        & (pool.caption_ids[safe] != pool.caption_ids[queries][:, None])
        & ~near_copies(pool.hashes[queries], pool.present[queries], pool.hashes[safe], pool.present[safe], radius)
    )


def _best(candidates: np.ndarray, scores: np.ndarray, keep: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the k kept candidates with the highest float64 score, ties by index; -1 / nan pad."""
    ranked_scores = np.where(keep, scores, -np.inf)
    ties = np.where(keep, candidates, np.iinfo(np.int64).max)
    order = np.lexsort((ties, -ranked_scores), axis=-1)[:, :k]
    chosen = np.take_along_axis(candidates, order, axis=-1)
    chosen_scores = np.take_along_axis(ranked_scores, order, axis=-1)
    missing = ~np.isfinite(chosen_scores)
    chosen = np.where(missing, -1, chosen)
    chosen_scores = np.where(missing, np.nan, chosen_scores)
    if chosen.shape[1] < k:
        pad = k - chosen.shape[1]
        chosen = np.pad(chosen, ((0, 0), (0, pad)), constant_values=-1)
        chosen_scores = np.pad(chosen_scores, ((0, 0), (0, pad)), constant_values=np.nan)
    return chosen, chosen_scores


def _search_alone(pool: Pool, query: int, k: int, ceiling: float, radius: int) -> tuple[np.ndarray, np.ndarray]:
    """One query against the whole pool, candidates checked best float32 cosine first, a chunk at a
    time, until k valid ones are found and the next cosine is below the k-th by more than float32's
    error."""
    cosines = pool.vectors @ pool.vectors[query]
    order = np.lexsort((np.arange(len(cosines)), -cosines))
    order = order[cosines[order] <= ceiling + _FLOAT32_SLACK]
    query64 = pool.vectors[query].astype(np.float64)
    queries = np.array([query])
    kept_candidates, kept_scores, kept_cosines = [], [], []
    found, cutoff = 0, -math.inf
    for start in range(0, len(order), _DEEP_CHUNK):
        chunk = order[start:start + _DEEP_CHUNK]
        chunk_cosines = cosines[chunk]
        if found >= k and chunk_cosines[0] < cutoff:
            break
        scores = rescore(query64, pool.vectors, chunk)
        valid = _valid(pool, queries, chunk[None, :], chunk_cosines[None, :], scores[None, :], ceiling, radius)[0]
        kept_candidates.append(chunk[valid])
        kept_scores.append(scores[valid])
        kept_cosines.append(chunk_cosines[valid])
        found += int(valid.sum())
        if found >= k:
            cutoff = np.concatenate(kept_cosines)[k - 1] - _FLOAT32_SLACK
    if not kept_candidates:
        return np.full(k, -1), np.full(k, np.nan)
    candidates = np.concatenate(kept_candidates)
    scores = np.concatenate(kept_scores)
    keep = np.ones(len(candidates), dtype=bool)
    if found >= k:
        keep = np.concatenate(kept_cosines) >= cutoff
    chosen, chosen_scores = _best(candidates[None, :], scores[None, :], keep[None, :], k)
    return chosen[0], chosen_scores[0]


def group_neighbours(pool: Pool, queries: np.ndarray, k: int, ceiling: float, radius: int,
                     threads: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """For each query (a pool index), its k best valid neighbours in the pool: ([q, k] pool
    indices, -1 where fewer; [q, k] float64 cosines, nan there), best first, ties by index."""
    import faiss

    queries = np.asarray(queries, dtype=np.int64)
    neighbours = np.full((len(queries), k), -1, dtype=np.int64)
    scores = np.full((len(queries), k), np.nan)
    if not len(queries) or not len(pool) or k <= 0:
        return neighbours, scores
    depth = min(len(pool), k + _FIRST_CANDIDATES)
    block = _QUERY_BLOCK
    if threads:
        faiss.omp_set_num_threads(threads)
    for start in range(0, len(queries), block):
        rows = queries[start:start + block]
        block_vectors = pool.vectors[rows]
        cosines, candidates = faiss.knn(block_vectors, pool.vectors, depth, metric=faiss.METRIC_INNER_PRODUCT)
        candidates = candidates.astype(np.int64)
        cosines = np.where(candidates >= 0, cosines, -np.inf).astype(np.float32)
        block_scores = rescore(block_vectors.astype(np.float64), pool.vectors, np.maximum(candidates, 0))
        valid = _valid(pool, rows, candidates, cosines, block_scores, ceiling, radius)
        # faiss lists candidates best first; a list settles a query when it holds k valid ones and
        # its last cosine is below the k-th valid one by more than float32's error (nothing it left
        # out can beat them), or when it holds the whole pool
        counted = np.cumsum(valid, axis=1)
        has_k = counted[:, -1] >= k
        kth = np.argmax(counted >= k, axis=1)
        cutoffs = cosines[np.arange(len(rows)), kth] - _FLOAT32_SLACK
        settled = (depth >= len(pool)) | (has_k & (cosines[:, -1] < cutoffs))
        keep = valid & np.where(has_k[:, None], cosines >= cutoffs[:, None], True)
        chosen, chosen_scores = _best(candidates, block_scores, keep, k)
        neighbours[start:start + len(rows)] = chosen
        scores[start:start + len(rows)] = chosen_scores
        for row in np.flatnonzero(~settled).tolist():
            neighbours[start + row], scores[start + row] = _search_alone(pool, int(rows[row]), k, ceiling, radius)
    return neighbours, scores


# ------------------------------------------------------------------------------------------------
# the groups: a two-level inverted file
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Partitioning:
    """Coarse centroids (one per partition) and fine centroids (one per group), float32 unit rows;
    `fine_parent[f]` is the coarse cell fine centroid f was trained in."""

    coarse: np.ndarray  # [c, d]
    fine: np.ndarray  # [f, d]
    fine_parent: np.ndarray  # [f] int32

    @property
    def partitions(self) -> int:
        return len(self.coarse)

    @property
    def groups(self) -> int:
        return len(self.fine)


def _kmeans(vectors: np.ndarray, count: int, seed: int) -> np.ndarray:
    import faiss

    if count <= 1 or len(vectors) <= count:
        centre = vectors.mean(axis=0, keepdims=True) if count <= 1 else vectors[:count]
        return np.ascontiguousarray(search_vectors(centre), dtype=np.float32)
    kmeans = faiss.Kmeans(vectors.shape[1], count, niter=KMEANS_ITERATIONS, seed=seed, spherical=True, verbose=False,
                          min_points_per_centroid=1, max_points_per_centroid=1 << 30)
    kmeans.train(np.ascontiguousarray(vectors, dtype=np.float32))
    return np.ascontiguousarray(kmeans.centroids, dtype=np.float32)


def plan_groups(count: int, group_size: int, partition_rows: int, centroids: int = 0) -> tuple[int, int]:
    """(partitions, groups) for `count` samples."""
    groups = centroids if centroids > 0 else math.ceil(count / max(1, group_size))
    partitions = max(1, min(groups, math.ceil(count / max(1, partition_rows))))
    return partitions, max(partitions, groups)


def sample_size(count: int, group_size: int, centroids: int, minimum: int) -> int:
    """Samples the k-means need: `minimum`, or more so that every fine centroid has a few points."""
    _, groups = plan_groups(count, group_size, 1 << 62, centroids)
    return min(count, max(minimum, MIN_POINTS_PER_CENTROID * 5 * groups))


def train_partitioning(sample: np.ndarray, count: int, group_size: int, partition_rows: int,
                       centroids: int = 0) -> Partitioning:
    """Two-level centroids from `sample` (float32 unit rows in a fixed order) for `count` samples."""
    partitions, groups = plan_groups(count, group_size, partition_rows, centroids)
    groups = max(1, min(groups, len(sample) // MIN_POINTS_PER_CENTROID))
    partitions = max(1, min(partitions, groups))
    coarse = _kmeans(sample, partitions, KMEANS_SEED)
    home = nearest_centroids(sample, coarse, 1)[:, 0]
    fine, parents = [], []
    for cell in range(len(coarse)):
        members = sample[home == cell]
        wanted = max(1, round(groups * len(members) / len(sample)))
        wanted = max(1, min(wanted, len(members) // MIN_POINTS_PER_CENTROID)) if len(members) else 1
        centres = _kmeans(members, wanted, KMEANS_SEED + 1 + cell) if len(members) else coarse[cell:cell + 1]
        fine.append(centres)
        parents.append(np.full(len(centres), cell, dtype=np.int32))
    return Partitioning(coarse, np.ascontiguousarray(np.concatenate(fine)), np.concatenate(parents))


def nearest_centroids(vectors: np.ndarray, centroids: np.ndarray, count: int) -> np.ndarray:
    """[n, count] indices of the nearest centroids (highest cosine first), near ties settled by
    float64 scores and then by index, so the answer never depends on the batch."""
    count = min(count, len(centroids))
    if not len(vectors):
        return np.zeros((0, count), dtype=np.int64)
    cosines = vectors @ centroids.T
    candidates = np.array(_top_unsorted(cosines, min(len(centroids), count + 2)))
    return _settle(vectors, centroids, candidates, count)


def _settle(vectors: np.ndarray, centroids: np.ndarray, candidates: np.ndarray, count: int) -> np.ndarray:
    """Per row, the `count` candidates (centroid indices, -1 = none) with the highest float64 cosine."""
    safe = np.maximum(candidates, 0)
    scores = rescore(vectors.astype(np.float64), centroids, safe)
    scores = np.where(candidates >= 0, scores, -np.inf)
    order = np.lexsort((np.where(candidates >= 0, candidates, np.iinfo(np.int64).max), -scores), axis=-1)[:, :count]
    return np.take_along_axis(candidates, order, axis=-1)


def assign_groups(vectors: np.ndarray, partitioning: Partitioning, probe: int) -> np.ndarray:
    """[n, probe] fine cells of each vector (its home first): the nearest fine centroids among
    those of its COARSE_PROBE nearest coarse cells."""
    probe = max(1, min(probe, partitioning.groups))
    if not len(vectors):
        return np.zeros((0, probe), dtype=np.int64)
    coarse = nearest_centroids(vectors, partitioning.coarse, COARSE_PROBE)
    fine_of = [np.flatnonzero(partitioning.fine_parent == cell) for cell in range(partitioning.partitions)]
    width = max(len(ids) for ids in fine_of)
    slots = coarse.shape[1] * width
    cosines = np.full((len(vectors), slots), -np.inf, dtype=np.float32)
    ids = np.full((len(vectors), slots), -1, dtype=np.int64)
    for position in range(coarse.shape[1]):
        for cell in np.unique(coarse[:, position]).tolist():
            rows = np.flatnonzero(coarse[:, position] == cell)
            fines = fine_of[cell]
            block = slice(position * width, position * width + len(fines))
            cosines[rows, block] = vectors[rows] @ partitioning.fine[fines].T
            ids[rows, block] = fines
    depth = min(slots, probe + 2)
    picked = np.take_along_axis(ids, np.array(_top_unsorted(cosines, depth)), axis=-1)
    return _settle(vectors, partitioning.fine, picked, probe)


def stable_hash64(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8", "replace")).digest()[:8], "big")


def smallest_hashes(keys: Sequence[int], count: int) -> np.ndarray:
    """Indices of the `count` smallest keys (a deterministic uniform sample when keys are hashes)."""
    keys = np.asarray(keys, dtype=np.uint64)
    if count >= len(keys):
        return np.argsort(keys, kind="stable")
    chosen = np.argpartition(keys, count)[:count]
    return chosen[np.argsort(keys[chosen], kind="stable")]
