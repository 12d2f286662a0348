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
import os
import re
from typing import Optional, Sequence

import numpy as np

KMEANS_ITERATIONS = 20
KMEANS_SEED = 1234
COARSE_PROBE = 2  # coarse cells whose fine centroids a sample is compared with
MIN_POINTS_PER_CENTROID = 4  # k-means needs several points per centroid
BALANCE = 2.0  # a group more than this many times the mean size is split
_FLOAT32_SLACK = 1e-4  # float32 cosines of unit vectors are off by ~1e-6 from float64 ones
_QUERY_BLOCK = 16_384  # queries per faiss call (faiss blocks its product itself; small calls are slow)
_FIRST_CANDIDATES = 16  # beyond k, candidates of a block's first look
_DEEP_ENTRIES = 8_000_000  # queries x pool cosines held at once by the deeper search


# ------------------------------------------------------------------------------------------------
# threads
# ------------------------------------------------------------------------------------------------

THREADS_ENV = "CURATE_THREADS_PER_WORKER"
_CONFIGURED: list = []


def configure_threads() -> None:
    """BLAS and faiss (OpenMP) threads of this process, once: the launcher sets THREADS_ENV to
    the cores per worker when it runs several worker processes (each single-threaded then: two
    processes of two threads on two cores spin against each other and run slower than one)."""
    if _CONFIGURED:
        return
    _CONFIGURED.append(True)
    threads = os.environ.get(THREADS_ENV)
    if not threads:
        return
    import faiss
    from threadpoolctl import threadpool_limits

    faiss.omp_set_num_threads(int(threads))
    threadpool_limits(int(threads))




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
    # each row's own dot (einsum sums a row the same way in any batch; np.linalg.norm's reduction
    # is several times slower)
    norms = np.sqrt(np.einsum("ij,ij->i", matrix, matrix))
    matrix = matrix / np.maximum(norms, 1e-12)[:, None]
    return np.ascontiguousarray(matrix, dtype=np.float32)


def normalised_caption(caption: str) -> str:
    return " ".join(re.findall(r"\w+", (caption or "").casefold()))


_WORD_BYTE = np.zeros(256, dtype=bool)
_WORD_BYTE[np.frombuffer(b"abcdefghijklmnopqrstuvwxyz0123456789_", dtype=np.uint8)] = True


def caption_keys(captions) -> np.ndarray:
    """A 64-bit key per caption that equal normalised captions share (`normalised_caption`): for
    an ASCII caption, a mix of the count, sum and sum of squares of its lowercased word bytes
    (computed over the whole column at once); for the others, a hash of the normalised caption.
    Different captions may share a key; `caption_ids` tells them apart."""
    import pyarrow as pa
    import pyarrow.compute as pc

    captions = pc.fill_null(captions, "")
    captions = captions.combine_chunks() if isinstance(captions, pa.ChunkedArray) else captions
    n = len(captions)
    ascii_rows = pc.string_is_ascii(captions).to_numpy(zero_copy_only=False)
    lowered = pc.ascii_lower(captions)
    offsets = np.frombuffer(lowered.buffers()[1], dtype=np.int32)[lowered.offset:lowered.offset + n + 1].astype(np.int64)
    data = np.frombuffer(lowered.buffers()[2], dtype=np.uint8) if lowered.buffers()[2] is not None else np.zeros(0, np.uint8)
    data = data[offsets[0]:offsets[-1]]
    word = _WORD_BYTE[data]
    values = data * word  # uint8: the word bytes, 0 elsewhere
    starts = offsets[:-1] - offsets[0]
    nonempty = offsets[1:] > offsets[:-1]
    count = np.zeros(n, dtype=np.uint64)
    total = np.zeros(n, dtype=np.uint64)
    squares = np.zeros(n, dtype=np.uint64)
    if len(data):
        where = starts[nonempty]
        count[nonempty] = np.add.reduceat(word, where, dtype=np.uint64)
        total[nonempty] = np.add.reduceat(values, where, dtype=np.uint64)
        squares[nonempty] = np.add.reduceat(np.square(values, dtype=np.uint16), where, dtype=np.uint64)
    keys = (count * np.uint64(0x9E3779B97F4A7C15)) ^ (total * np.uint64(0xC2B2AE3D27D4EB4F)) ^ (squares * np.uint64(0x165667B19E3779F9))
    for row in np.flatnonzero(~ascii_rows).tolist():
        keys[row] = caption_id(captions[row].as_py())
    return keys


def caption_ids(keys: np.ndarray, captions) -> np.ndarray:
    """Equal ids exactly for equal normalised captions (`captions`: an Arrow string array or a
    list): rows sharing a `caption_keys` key are told apart by their normalised captions, in
    Python only for the distinct texts of keys that several distinct texts share (rows of one
    text, like a sample's copies in other groups, share its id without a look)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    unique, ids, counts = np.unique(keys, return_inverse=True, return_counts=True)
    ids = ids.astype(np.int64)
    shared = np.flatnonzero(counts[ids] > 1)
    if not len(shared):
        return ids.astype(np.uint64)
    texts = pc.fill_null(pa.array(captions, pa.string()) if isinstance(captions, list) else captions, "")
    texts = texts.take(pa.array(shared))
    text_ids = texts.dictionary_encode().indices.to_numpy(zero_copy_only=False).astype(np.int64)
    # keys with more than one distinct text among their rows
    texts_per_key = int(text_ids.max()) + 1
    pairs = np.unique(ids[shared] * texts_per_key + text_ids)
    key_of_pair = pairs // texts_per_key
    repeated = key_of_pair[1:][key_of_pair[1:] == key_of_pair[:-1]]
    mixed = np.flatnonzero(np.isin(ids[shared], repeated))
    names: dict = {}
    named: dict = {}
    for position, text in zip(mixed.tolist(), texts.take(pa.array(mixed)).to_pylist()):
        if text not in named:
            named[text] = names.setdefault((int(ids[shared[position]]), normalised_caption(text)), len(names))
        ids[shared[position]] = len(unique) + named[text]
    return ids.astype(np.uint64)


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

    def take(self, rows) -> "Pool":
        """The rows `rows` (indices; a slice gives views)."""
        return Pool(self.vectors[rows], self.caption_ids[rows], self.hashes[rows], self.present[rows])


def _top_unsorted(cosines: np.ndarray, depth: int) -> np.ndarray:
    size = cosines.shape[-1]
    if depth >= size:
        return np.broadcast_to(np.arange(size), cosines.shape)
    return np.argpartition(cosines, size - depth, axis=-1)[..., size - depth:]


def _rules(pool: Pool, queries: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """[b, n] whether each candidate passes the rules that do not need a score: a sample (not a
    pad), not the query itself, another caption, not a pHash near-copy."""
    safe = np.maximum(candidates, 0)
    return (
        (candidates >= 0) & (safe != queries[:, None])
        & (pool.caption_ids[safe] != pool.caption_ids[queries][:, None])
        & ~near_copies(pool.hashes[queries], pool.present[queries], pool.hashes[safe], pool.present[safe], _RADIUS[0])
    )


_RADIUS = [8]  # the near-copy radius of the search in progress (set by group_neighbours)


def _valid(pool: Pool, queries: np.ndarray, candidates: np.ndarray, cosines: np.ndarray, scores: np.ndarray,
           ceiling: float, radius: int) -> np.ndarray:
    """[b, n] whether each candidate of each query may be its negative."""
    _RADIUS[0] = radius
    return _rules(pool, queries, candidates) & (cosines <= ceiling + _FLOAT32_SLACK) & (scores <= ceiling)


def _pair_scores(pool: Pool, queries: np.ndarray, candidates: np.ndarray, where: np.ndarray) -> np.ndarray:
    """[b, n] float64 cosines where `where`, nan elsewhere (only the pairs that decide anything
    are scored in float64)."""
    scores = np.full(candidates.shape, np.nan)
    rows, columns = np.nonzero(where)
    vectors = pool.vectors
    # a product of two float32 values is exact in float64: einsum multiplies and sums in float64
    # without a float64 copy of the pool, and small chunks keep both gathered blocks in cache.
    for start in range(0, len(rows), _PAIR_CHUNK):
        r, c = rows[start:start + _PAIR_CHUNK], columns[start:start + _PAIR_CHUNK]
        scores[r, c] = np.einsum("ij,ij->i", vectors[candidates[r, c]], vectors[queries[r]], dtype=np.float64)
    return scores


_PAIR_CHUNK = 512


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


def _search_deep(pool: Pool, rows: np.ndarray, k: int, ceiling: float, first: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The queries whose first candidates did not settle them (a crowded space: most cosines over
    the ceiling, many near-copies or repeated captions), against the whole pool: their cosines
    with every sample, those over the ceiling masked out, ranked a depth at a time (4x deeper each
    round) until each has k valid ones and the next cosine is below the k-th by more than float32's
    error, or no unmasked cosine is left."""
    found = np.full((len(rows), k), -1, dtype=np.int64)
    found_scores = np.full((len(rows), k), np.nan)
    size = len(pool) - first
    chunk = max(1, _DEEP_ENTRIES // size)
    for start in range(0, len(rows), chunk):
        part = np.arange(start, min(start + chunk, len(rows)))
        cosines = pool.vectors[rows[part]] @ pool.vectors[first:].T
        np.putmask(cosines, cosines > ceiling + _FLOAT32_SLACK, -np.inf)
        depth = min(size, k + _FIRST_CANDIDATES)
        while len(part):
            local = part - start
            top = np.array(_top_unsorted(cosines[local], depth))
            top_cosines = np.take_along_axis(cosines[local], top, axis=-1)
            order = np.lexsort((top, -top_cosines), axis=-1)
            candidates = np.take_along_axis(top, order, axis=-1) + first
            ranked = np.take_along_axis(top_cosines, order, axis=-1)
            queries = rows[part]
            scores = _pair_scores(pool, queries, candidates, np.isfinite(ranked))
            valid = _rules(pool, queries, candidates) & np.isfinite(ranked) & (scores <= ceiling)
            counted = np.cumsum(valid, axis=1)
            has_k = counted[:, -1] >= k
            kth = np.argmax(counted >= k, axis=1)
            cutoffs = np.where(has_k, ranked[np.arange(len(part)), kth] - _FLOAT32_SLACK, -np.inf)
            last = ranked[:, -1]
            settled = (depth >= size) | ~np.isfinite(last) | (has_k & (last < cutoffs))
            keep = valid & np.where(has_k[:, None], ranked >= cutoffs[:, None], True)
            chosen, chosen_scores = _best(candidates, np.nan_to_num(scores, nan=-np.inf), keep, k)
            found[part[settled]] = chosen[settled]
            found_scores[part[settled]] = chosen_scores[settled]
            part = part[~settled]
            depth = min(size, depth * 4)
    return found, found_scores


def group_neighbours(pool: Pool, queries: np.ndarray, k: int, ceiling: float, radius: int,
                     threads: Optional[int] = None, first: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """For each query (a pool index), its k best valid neighbours in the pool: ([q, k] pool
    indices, -1 where fewer; [q, k] float64 cosines, nan there), best first, ties by index.
    Candidates are the pool rows from `first` on (the rows before it are queries only)."""
    import faiss

    queries = np.asarray(queries, dtype=np.int64)
    neighbours = np.full((len(queries), k), -1, dtype=np.int64)
    scores = np.full((len(queries), k), np.nan)
    size = len(pool) - first
    if not len(queries) or size <= 0 or k <= 0:
        return neighbours, scores
    depth = min(size, k + _FIRST_CANDIDATES)
    block = _QUERY_BLOCK
    if threads:
        faiss.omp_set_num_threads(threads)
    _RADIUS[0] = radius
    for start in range(0, len(queries), block):
        rows = queries[start:start + block]
        cosines, candidates = faiss.knn(pool.vectors[rows], pool.vectors[first:], depth, metric=faiss.METRIC_INNER_PRODUCT)
        candidates = np.where(candidates >= 0, candidates.astype(np.int64) + first, -1)
        cosines = np.where(candidates >= 0, cosines, -np.inf).astype(np.float32)
        # faiss lists candidates best first. Candidates the rules and the float32 cosine allow are
        # scored in float64 down to just below the k-th of them (what ranks them exactly), and near
        # the ceiling (what decides them); the rest cannot be among the best k.
        maybe = _rules(pool, rows, candidates) & (cosines <= ceiling + _FLOAT32_SLACK)
        counted = np.cumsum(maybe, axis=1)
        has_k = counted[:, -1] >= k
        kth = np.argmax(counted >= k, axis=1)
        kth_cosines = np.where(has_k, cosines[np.arange(len(rows)), kth], -np.inf)
        need = maybe & ((cosines >= kth_cosines[:, None] - 2 * _FLOAT32_SLACK) | (cosines > ceiling - _FLOAT32_SLACK))
        block_scores = _pair_scores(pool, rows, candidates, need)
        valid = need & (block_scores <= ceiling)
        # a candidate the float64 ceiling took out moves the k-th: such a row is searched alone
        lost = (need & ~valid).any(axis=1)
        cutoffs = kth_cosines - _FLOAT32_SLACK
        # settled: k valid found and nothing left out of the list can beat them, or the list is the pool
        settled = ~lost & ((depth >= size) | (has_k & (cosines[:, -1] < cutoffs)))
        keep = valid & np.where(has_k[:, None], cosines >= cutoffs[:, None], True)
        chosen, chosen_scores = _best(candidates, np.nan_to_num(block_scores, nan=-np.inf), keep, k)
        neighbours[start:start + len(rows)] = chosen
        scores[start:start + len(rows)] = chosen_scores
        deeper = np.flatnonzero(~settled)
        if len(deeper):
            neighbours[start + deeper], scores[start + deeper] = _search_deep(pool, rows[deeper], k, ceiling, first)
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
        if len(members) and len(centres) > 1:
            centres = _balanced(members, centres, KMEANS_SEED + 100_003 * (cell + 1))
        fine.append(centres)
        parents.append(np.full(len(centres), cell, dtype=np.int32))
    return Partitioning(coarse, np.ascontiguousarray(np.concatenate(fine)), np.concatenate(parents))


def _balanced(members: np.ndarray, centres: np.ndarray, seed: int) -> np.ndarray:
    """k-means on Zipf-like data (a few huge topics) leaves some groups many times the target,
    and a group costs its queries times its pool: a centroid holding more than BALANCE times the
    mean share of the sample is replaced by centroids of its own points, enough for the mean."""
    own = nearest_centroids(members, centres, 1)[:, 0]
    counts = np.bincount(own, minlength=len(centres))
    target = len(members) / len(centres)
    pieces = []
    for index, count in enumerate(counts.tolist()):
        if count > BALANCE * target and count >= 2 * MIN_POINTS_PER_CENTROID:
            parts = min(math.ceil(count / target), count // MIN_POINTS_PER_CENTROID)
            pieces.append(_kmeans(members[own == index], parts, seed + index))
        else:
            pieces.append(centres[index:index + 1])
    return np.ascontiguousarray(np.concatenate(pieces), dtype=np.float32)


def nearest_centroids(vectors: np.ndarray, centroids: np.ndarray, count: int) -> np.ndarray:
    """[n, count] indices of the nearest centroids (highest cosine first), near ties settled by
    float64 scores and then by index, so the answer never depends on the batch."""
    count = min(count, len(centroids))
    if not len(vectors):
        return np.zeros((0, count), dtype=np.int64)
    cosines = vectors @ centroids.T
    candidates = np.array(_top_unsorted(cosines, min(len(centroids), count + 2)))
    return _settle(vectors, centroids, candidates, np.take_along_axis(cosines, candidates, axis=-1), count)


_LAST = np.iinfo(np.int64).max


def _settle(vectors: np.ndarray, centroids: np.ndarray, candidates: np.ndarray, cosines: np.ndarray,
            count: int) -> np.ndarray:
    """Per row, the `count` candidates (centroid indices, -1 = none) with the highest cosine, ties
    by index. float32 cosines decide where the ranking they give is clear by more than float32's
    error; rows with a closer call are settled in float64."""
    ids = np.where(candidates >= 0, candidates, _LAST)
    cosines = np.where(candidates >= 0, cosines, -np.inf).astype(np.float32)
    order = np.lexsort((ids, -cosines), axis=-1)
    ranked = np.take_along_axis(cosines, order, axis=-1)
    depth = min(count + 1, ranked.shape[1])
    gaps = ranked[:, :depth - 1] - ranked[:, 1:depth] if depth > 1 else np.full((len(ranked), 1), np.inf)
    close = np.flatnonzero((gaps < _FLOAT32_SLACK).any(axis=1) & np.isfinite(ranked[:, :depth]).all(axis=1))
    chosen = np.take_along_axis(candidates, order, axis=-1)[:, :count]
    if len(close):
        safe = np.maximum(candidates[close], 0)
        scores = rescore(vectors[close].astype(np.float64), centroids, safe)
        scores = np.where(candidates[close] >= 0, scores, -np.inf)
        exact = np.lexsort((ids[close], -scores), axis=-1)[:, :count]
        chosen[close] = np.take_along_axis(candidates[close], exact, axis=-1)
    return chosen


def assign_groups(vectors: np.ndarray, partitioning: Partitioning, probe: int) -> np.ndarray:
    """[n, probe] fine cells of each vector (its home first): the nearest fine centroids among
    those of its COARSE_PROBE nearest coarse cells."""
    import faiss

    probe = max(1, min(probe, partitioning.groups))
    if not len(vectors):
        return np.zeros((0, probe), dtype=np.int64)
    coarse = nearest_centroids(vectors, partitioning.coarse, COARSE_PROBE)
    # per coarse cell, its rows' nearest few of its fine centroids (faiss's top-k: a numpy
    # partition of every row's cosines costs more than the product); `_settle` ranks the union
    depth = probe + 2
    candidates = np.full((len(vectors), coarse.shape[1] * depth), -1, dtype=np.int64)
    cosines = np.full(candidates.shape, -np.inf, dtype=np.float32)
    for position in range(coarse.shape[1]):
        for cell in np.unique(coarse[:, position]).tolist():
            rows = np.flatnonzero(coarse[:, position] == cell)
            fines = np.flatnonzero(partitioning.fine_parent == cell)
            if not len(fines):
                continue
            width = min(depth, len(fines))
            found, ids = faiss.knn(vectors[rows], partitioning.fine[fines], width, metric=faiss.METRIC_INNER_PRODUCT)
            block = slice(position * depth, position * depth + width)
            candidates[rows, block] = np.where(ids >= 0, fines[np.maximum(ids, 0)], -1)
            cosines[rows, block] = found
    return _settle(vectors, partitioning.fine, candidates, cosines, probe)


def stable_hash64(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8", "replace")).digest()[:8], "big")


def smallest_hashes(keys: Sequence[int], count: int) -> np.ndarray:
    """Indices of the `count` smallest keys (a deterministic uniform sample when keys are hashes)."""
    keys = np.asarray(keys, dtype=np.uint64)
    if count >= len(keys):
        return np.argsort(keys, kind="stable")
    chosen = np.argpartition(keys, count)[:count]
    return chosen[np.argsort(keys[chosen], kind="stable")]
