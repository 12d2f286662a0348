"""Hard negatives for every kept pair (decide phase): CLIP-space neighbours and one-edit captions.

Neighbour negatives. For each kept sample, the `negatives_k` nearest *other* kept samples by image
embedding (kind "image") and by caption embedding (kind "text"), each with the neighbour's uid,
caption and cosine. A neighbour is skipped when it is the sample itself, when its cosine is above
`negatives_ceiling`, when its pHash (or mirrored pHash) is within `dedup_radius` bits, or when its
normalised caption equals the anchor's: all of these are more likely true positives than negatives.

Scale. Up to `negatives_exact_max` samples: one group, exact search (`exact_neighbours`: a masked
numpy matrix product per block of queries). Above it: k-means centroids (faiss) trained on a
deterministic sample (the samples with the smallest uid hashes) go in as a side input; each sample
joins the groups of its `negatives_probe` nearest centroids as a candidate and queries in the group
of its nearest one; GroupByKey(centroid); exact search inside each group; the per-group top-k lists
of a uid are merged. No worker ever holds the whole embedding matrix, only one group.

Caption negatives (`caption_negatives`). Rule-based, offline, deterministic edits that change
exactly one thing, using the word lists in `transforms/data/negatives_lexicon.json`:
  swap       two objects ("a dog on a sofa" -> "a sofa on a dog") or two attributes
             ("a red circle on a blue background" -> "a blue circle on a red background"),
  attribute  one attribute replaced by another of its category ("red car" -> "blue car"),
  object     one object noun replaced by another of its category ("red car" -> "red truck").
Choices among several candidates are made by a stable hash of the caption (never Python's salted
`hash`), so every worker and every run produces the same negatives.
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Iterable, Optional, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from schemas import Col
from transforms.base import caption_of
from transforms.dedup import hamming

METRICS_NAMESPACE = "negatives"
LEXICON_PATH = Path(__file__).resolve().parent / "data" / "negatives_lexicon.json"
NEIGHBOUR_KINDS = ("image", "text")
CAPTION_KINDS = ("swap", "attribute", "object")
KMEANS_ITERATIONS = 20
KMEANS_SEED = 1234
EXACT_GROUP = -1  # centroid id of the single group of the exact path
# the only columns MineHardNegatives reads from a record (members_of, caption_of)
NEGATIVES_INPUT_COLUMNS = (Col.UID, Col.CAPTION, Col.CAPTION_CLEAN, Col.IMAGE_EMBEDDING, Col.TEXT_EMBEDDING, Col.PHASH, Col.PHASH_MIRROR)
MAX_CAPTION_TOKENS = 256  # edits are made in the first tokens only: hostile captions stay cheap

# ------------------------------------------------------------------------------------------------
# caption negatives (pure)
# ------------------------------------------------------------------------------------------------

_WORD = re.compile(r"[A-Za-z]+(?:['\u2019][A-Za-z]+)?")
# tokens after which an ambiguous word ("glass") is an object, not a modifier
_FUNCTION_WORDS = frozenset(
    "a an the and or but of on in at to with by from for under over near behind beside next is are was "
    "were be it its this that these those there here as into onto".split()
)


def _stable_int(*parts: str) -> int:
    return int.from_bytes(hashlib.sha256("\x1f".join(parts).encode("utf-8", "replace")).digest()[:8], "big")


def _pluralise(word: str, irregular: dict) -> str:
    if word in irregular:
        return irregular[word]
    if re.search(r"(s|x|z|ch|sh)$", word):
        return word + "es"
    if re.search(r"[^aeiou]y$", word):
        return word[:-1] + "ies"
    return word + "s"


class _Lexicon:
    def __init__(self, data: dict):
        irregular = dict(data.get("irregular_plurals", {}))
        self.attribute_category = {w: c for c, words in data["attributes"].items() for w in words}
        self.object_category = {w: c for c, words in data["objects"].items() for w in words}
        self.attributes = {c: list(words) for c, words in data["attributes"].items()}
        self.objects = {c: list(words) for c, words in data["objects"].items()}
        self.plural = {w: _pluralise(w, irregular) for w in self.object_category}
        self.singular = {p: w for w, p in self.plural.items() if p != w and p not in self.object_category}
        self.synonyms: dict[str, frozenset] = {}
        for group in data.get("synonyms", []):
            for word in group:
                self.synonyms[word] = frozenset(group)

    def same_meaning(self, a: str, b: str) -> bool:
        return a == b or b in self.synonyms.get(a, ())


@functools.lru_cache(maxsize=1)
def lexicon() -> _Lexicon:
    with open(LEXICON_PATH, encoding="utf-8") as handle:
        return _Lexicon(json.load(handle))


class _Slot:
    """One editable word of a caption: where it is and what the lexicon says it is."""

    __slots__ = ("index", "start", "end", "text", "word", "role", "category", "plural")

    def __init__(self, index, start, end, text, word, role, category, plural=False):
        self.index, self.start, self.end, self.text = index, start, end, text
        self.word, self.role, self.category, self.plural = word, role, category, plural


def _tag(caption: str, lex: _Lexicon) -> tuple[list, list[_Slot]]:
    tokens = [(m.start(), m.end(), m.group()) for m in _WORD.finditer(caption)][:MAX_CAPTION_TOKENS]
    slots = []
    for i, (start, end, text) in enumerate(tokens):
        lower = text.lower()
        following = tokens[i + 1][2].lower() if i + 1 < len(tokens) else ""
        # adjacent with no punctuation between them: "glass vase" is a modifier, "glass, vase" is not
        modifies = bool(following) and following not in _FUNCTION_WORDS and not caption[end:tokens[i + 1][0]].strip()
        is_attribute = lower in lex.attribute_category
        is_object = lower in lex.object_category or lower in lex.singular
        if is_attribute and (not is_object or modifies):
            slots.append(_Slot(i, start, end, text, lower, "attribute", lex.attribute_category[lower]))
        elif is_object:
            singular = lex.singular.get(lower, lower)
            slots.append(_Slot(i, start, end, text, singular, "object", lex.object_category[singular], lower != singular))
    return tokens, slots


def _match_case(template: str, word: str) -> str:
    if template.isupper() and len(template) > 1:
        return word.upper()
    if template[:1].isupper():
        return word[:1].upper() + word[1:]
    return word


def _article_for(word: str) -> str:
    lower = word.lower()
    if lower.startswith(("uni", "use", "usu", "one", "eu")):
        return "a"
    if lower.startswith(("hour", "honest", "heir")):
        return "an"
    return "an" if lower[:1] in "aeiou" else "a"


def _render(caption: str, tokens: list, edits: dict[int, str]) -> str:
    """Apply {token index: new word}, then fix "a"/"an" before each edited word."""
    replaced = {i: w for i, w in edits.items()}
    for i in edits:
        if i > 0:
            start, end, text = tokens[i - 1]
            between = caption[end:tokens[i][0]]
            if text.lower() in ("a", "an") and between.strip() == "":
                replaced.setdefault(i - 1, _match_case(text, _article_for(replaced[i])))
    pieces, cursor = [], 0
    for i in sorted(replaced):
        start, end, _ = tokens[i]
        pieces.append(caption[cursor:start])
        pieces.append(replaced[i])
        cursor = end
    pieces.append(caption[cursor:])
    return "".join(pieces)


def _surface(slot: _Slot, word: str, lex: _Lexicon) -> str:
    """`word` as it would read in `slot`: the slot's number (objects) and capitalisation."""
    if slot.role == "object" and slot.plural:
        word = lex.plural[word]
    return _match_case(slot.text, word)


def _swap_objects(caption, tokens, slots, lex) -> Optional[str]:
    objects = [s for s in slots if s.role == "object"]
    for i, a in enumerate(objects):
        for b in objects[i + 1:]:
            if not lex.same_meaning(a.word, b.word):
                return _render(caption, tokens, {a.index: _surface(a, b.word, lex), b.index: _surface(b, a.word, lex)})
    return None


def _swap_attributes(caption, tokens, slots, lex) -> Optional[str]:
    attributes = [s for s in slots if s.role == "attribute"]
    pairs = [
        (a, b)
        for i, a in enumerate(attributes)
        for b in attributes[i + 1:]
        # adjacent attributes describe the same thing: "big red car" -> "red big car" changes nothing
        if not lex.same_meaning(a.word, b.word) and b.index - a.index > 1
    ]
    if not pairs:
        return None
    # the same category first ("red ... blue"), then across categories ("small dog on a red sofa")
    a, b = sorted(pairs, key=lambda p: (p[0].category != p[1].category, p[0].index, p[1].index))[0]
    return _render(caption, tokens, {a.index: _surface(a, b.word, lex), b.index: _surface(b, a.word, lex)})


def _replace_one(caption, tokens, slots, lex, role: str) -> Optional[str]:
    candidates = [s for s in slots if s.role == role]
    if not candidates:
        return None
    present = {s.word for s in slots}
    table = lex.attributes if role == "attribute" else lex.objects
    # rotate through the slots from a hash-chosen start: the first slot that has a replacement wins
    start = _stable_int(caption, role) % len(candidates)
    for offset in range(len(candidates)):
        slot = candidates[(start + offset) % len(candidates)]
        options = [w for w in table[slot.category] if w not in present and not lex.same_meaning(slot.word, w)]
        if options:
            choice = options[_stable_int(caption, role, slot.word) % len(options)]
            return _render(caption, tokens, {slot.index: _surface(slot, choice, lex)})
    return None


def caption_negatives(caption: str) -> list[tuple[str, str]]:
    """(negative caption, kind) pairs, kinds among swap / attribute / object; [] when no rule applies.

    Each negative changes exactly one thing; deterministic; never the source caption.
    """
    if not isinstance(caption, str) or not caption.strip():
        return []
    lex = lexicon()
    tokens, slots = _tag(caption, lex)
    if not slots:
        return []
    proposals = [
        (_swap_objects(caption, tokens, slots, lex), "swap"),
        (_swap_attributes(caption, tokens, slots, lex), "swap"),
        (_replace_one(caption, tokens, slots, lex, "attribute"), "attribute"),
        (_replace_one(caption, tokens, slots, lex, "object"), "object"),
    ]
    seen = {caption}
    result = []
    for negative, kind in proposals:
        if negative is not None and negative not in seen:
            seen.add(negative)
            result.append((negative, kind))
    return result


# ------------------------------------------------------------------------------------------------
# neighbour negatives (pure)
# ------------------------------------------------------------------------------------------------

# One sample in one embedding space, as it travels through the shuffle: small and cheap to pickle.
# (uid, caption, float16 unit vector bytes, phash int or None, mirrored phash int or None)
Member = tuple


def unit_vector(value) -> Optional[np.ndarray]:
    """float32 L2-normalised copy, or None for a missing, empty, non-finite or zero vector."""
    if value is None:
        return None
    try:
        vector = np.asarray(value, dtype=np.float32).reshape(-1)
    except (TypeError, ValueError):
        return None
    if vector.size == 0 or not np.all(np.isfinite(vector)):
        return None
    norm = float(np.linalg.norm(vector))
    if norm == 0.0:
        return None
    return vector / norm


def _phash_int(value) -> Optional[int]:
    if value is None:
        return None
    try:
        return int(value, 16) if isinstance(value, str) else int(value)
    except (TypeError, ValueError):
        return None


def normalised_caption(caption: str) -> str:
    return " ".join(re.findall(r"\w+", (caption or "").casefold()))


def members_of(record: dict) -> dict[str, Member]:
    """{space: member} for each embedding space in which the record has a usable vector."""
    uid = str(record[Col.UID])
    caption = caption_of(record)
    phash, mirror = _phash_int(record.get(Col.PHASH)), _phash_int(record.get(Col.PHASH_MIRROR))
    result = {}
    for space, column in zip(NEIGHBOUR_KINDS, (Col.IMAGE_EMBEDDING, Col.TEXT_EMBEDDING)):
        vector = unit_vector(record.get(column))
        if vector is not None:
            result[space] = (uid, caption, vector.astype(np.float16).tobytes(), phash, mirror)
    return result


def _vectors(members: Sequence[Member]) -> np.ndarray:
    matrix = np.stack([np.frombuffer(m[2], dtype=np.float16) for m in members]).astype(np.float32)
    matrix /= np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)  # fp16 rounding
    return np.ascontiguousarray(matrix)


_SEARCH_ENTRIES = 4_000_000  # queries x pool cosines per block of the exact search (16 MB)
_FLOAT32_SLACK = 1e-4  # float32 cosines of unit vectors are off by ~1e-6 from float64 ones


def too_close(anchor: Member, other: Member, radius: int) -> bool:
    """pHash (or its mirror) within the dedup radius: a near-duplicate, not a negative."""
    if radius < 0 or anchor[3] is None:
        return False
    for mine in (anchor[3], anchor[4]):
        for theirs in (other[3], other[4]):
            if mine is not None and theirs is not None and hamming(mine, theirs) <= radius:
                return True
    return False


def _top_unsorted(cosines: np.ndarray, depth: int) -> np.ndarray:
    """Indices of the `depth` highest cosines along the last axis, in no order (one row or a block)."""
    size = cosines.shape[-1]
    if depth >= size:
        return np.broadcast_to(np.arange(size), cosines.shape)
    return np.argpartition(cosines, size - depth, axis=-1)[..., size - depth:]


def _ranked(cosines: np.ndarray, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Candidate indices (one row or a block) best cosine first, ties by index, and their cosines;
    masked cosines (-inf) come last."""
    candidate_cosines = np.take_along_axis(cosines, candidates, axis=-1)
    order = np.lexsort((candidates, -candidate_cosines), axis=-1)
    return np.take_along_axis(candidates, order, axis=-1), np.take_along_axis(candidate_cosines, order, axis=-1)


def _rescore(query64: np.ndarray, pool_vectors: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """float64 cosines of a query [d] (or a block of them, [b, d]) with the pool rows `indices`
    ([n], or [b, n]). The products are exact in float64 and summed along the vector (numpy's
    pairwise sum over the contiguous axis), so a pair gets the same bits in whichever block,
    group or direction it is scored."""
    return (pool_vectors[indices].astype(np.float64) * query64[..., None, :]).sum(axis=-1)


def _hash_arrays(members: Sequence[Member]) -> tuple[np.ndarray, np.ndarray]:
    """([n, 2] uint64 pHash and mirrored pHash, [n, 2] whether each is there) of members."""
    values = np.array([[m[3] or 0, m[4] or 0] for m in members], dtype=np.uint64).reshape(-1, 2)
    present = np.array([[m[3] is not None, m[4] is not None] for m in members], dtype=bool).reshape(-1, 2)
    return values, present


def _near_copies(anchor_hashes, anchor_present, other_hashes, other_present, radius: int) -> np.ndarray:
    """`too_close` for a block: anchors [b, 2] against their candidates [b, n, 2] -> [b, n] bool."""
    near = np.zeros(other_hashes.shape[:2], dtype=bool)
    if radius < 0:
        return near
    for mine in (0, 1):
        for theirs in (0, 1):
            distance = np.bitwise_count(anchor_hashes[:, None, mine] ^ other_hashes[..., theirs])
            near |= anchor_present[:, None, mine] & other_present[..., theirs] & (distance <= radius)
    return near & anchor_present[:, None, 0]  # an anchor without a pHash is near nothing


def exact_neighbours(
    queries: Sequence[Member], pool: Sequence[Member], k: int, ceiling: float, radius: int
) -> dict[str, list[tuple[float, str, str]]]:
    """uid -> up to k (cosine, neighbour uid, neighbour caption), best first, ties by uid.

    Exact search of `queries` against `pool`, skipping self, cosines above `ceiling`, pHash
    near-duplicates and identical captions. Written by hand on a numpy matrix product rather than
    faiss's IndexFlatIP: faiss returns the top cosines and cannot skip those above the ceiling, so
    in a crowded space (random weights, or many near-copies) every query needed a search nearly as
    deep as the pool, redone from scratch at each deeper round. Here each block of queries takes
    one product, cosines over the ceiling are masked out, and candidates are checked best first
    until k are found.
    """
    if not queries or not pool or k <= 0:
        return {}
    pool_vectors = _vectors(pool)
    query_vectors = _vectors(queries)
    pool_captions = [normalised_caption(m[1]) for m in pool]
    # what the skip rules compare, as arrays: small ints for uids and captions, pHashes as uint64
    uid_ids: dict[str, int] = {}
    pool_uid_ids = np.array([uid_ids.setdefault(m[0], len(uid_ids)) for m in pool])
    query_uid_ids = np.array([uid_ids.get(m[0], -1) for m in queries])
    caption_ids: dict[str, int] = {}
    pool_caption_ids = np.array([caption_ids.setdefault(c, len(caption_ids)) for c in pool_captions])
    query_caption_ids = np.array([caption_ids.get(normalised_caption(m[1]), -1) for m in queries])
    pool_hashes, query_hashes = _hash_arrays(pool), _hash_arrays(queries)
    block = max(1, _SEARCH_ENTRIES // len(pool))
    depth = min(len(pool), k + 16)

    def search_block(start: int) -> dict[str, list]:
        stop = min(start + block, len(queries))
        block_queries = query_vectors[start:stop]
        cosines = block_queries @ pool_vectors.T
        np.putmask(cosines, cosines > ceiling + _FLOAT32_SLACK, -np.inf)
        # The first candidates of the whole block, ranked, re-scored and checked in a few array
        # calls; most rows are settled by them. The rest search deeper one by one (_first_valid).
        ranked, ranked_cosines = _ranked(cosines, np.array(_top_unsorted(cosines, depth)))
        block_queries64 = block_queries.astype(np.float64)
        scores = _rescore(block_queries64, pool_vectors, ranked)
        valid = (
            np.isfinite(ranked_cosines) & (scores <= ceiling)
            & (pool_uid_ids[ranked] != query_uid_ids[start:stop, None])
            & (pool_caption_ids[ranked] != query_caption_ids[start:stop, None])
            & ~_near_copies(query_hashes[0][start:stop], query_hashes[1][start:stop],
                            pool_hashes[0][ranked], pool_hashes[1][ranked], radius)
        )
        # Settled: k valid ones found and the list reaches below the k-th by more than float32's
        # error (no later candidate can beat them), or no finite cosine is left beyond the list.
        counted = np.cumsum(valid, axis=1)
        has_k = counted[:, -1] >= k
        kth = np.argmax(counted >= k, axis=1)
        cutoffs = ranked_cosines[np.arange(len(ranked)), kth] - _FLOAT32_SLACK
        last = ranked_cosines[:, -1]
        settled = ~np.isfinite(last) | (depth >= len(pool)) | (has_k & (last < cutoffs))
        found = {}
        for row in range(len(ranked)):
            query = queries[start + row]
            if settled[row]:
                keep = valid[row] & (ranked_cosines[row] >= cutoffs[row]) if has_k[row] else valid[row]
                found[query[0]] = top_k(
                    [(score, pool[j][0], pool[j][1]) for j, score in zip(ranked[row][keep].tolist(), scores[row][keep].tolist())],
                    k,
                )
            else:
                found[query[0]] = _first_valid(
                    query, block_queries64[row], cosines[row], ranked[row].tolist(), ranked_cosines[row].tolist(),
                    scores[row].tolist(), pool, pool_vectors, pool_captions, k, ceiling, radius,
                )
        return found

    starts = range(0, len(queries), block)
    if len(starts) == 1:
        return search_block(0)
    # Blocks on every core at once: numpy's product, mask and partition release the GIL, so one
    # block's array work overlaps another's Python checks. One BLAS thread each: OpenBLAS's own
    # threads would compete with the other blocks and spin (measured at 10k x 10k: 1.4x the CPU
    # seconds, 1.3x the wall time). Each query's answer is its own: no order matters.
    from threadpoolctl import threadpool_limits

    result: dict[str, list] = {}
    threads = max(2, min(len(starts), os.cpu_count() or 2))
    with threadpool_limits(1, user_api="blas"), concurrent.futures.ThreadPoolExecutor(
        threads, thread_name_prefix="negatives"
    ) as pool_threads:
        for found in pool_threads.map(search_block, starts):
            result.update(found)
    return result


def _first_valid(anchor, anchor64, cosines, ranked, ranked_cosines, scores, pool, pool_vectors, pool_captions, k,
                 ceiling, radius) -> list:
    """The anchor's best k valid neighbours. `ranked` are its first candidates best first (float32
    `cosines`, float64 `scores`: the same pair scores the same bits wherever it is met); each is
    checked in turn until k are found and the rest are below the k-th by more than float32's
    error; else the search goes 4x deeper in the anchor's row of `cosines`."""
    anchor_caption = normalised_caption(anchor[1])
    anchor_uid = anchor[0]
    found, visited = [], set()
    cutoff = -math.inf
    depth = len(ranked)
    while True:
        finite = 0
        for j, cosine, score in zip(ranked, ranked_cosines, scores):
            if cosine == -math.inf:
                break  # masked: no finite cosine from here on
            finite += 1
            if j in visited:
                continue
            visited.add(j)
            if cosine < cutoff:
                return top_k(found, k)
            other = pool[j]
            if score > ceiling or other[0] == anchor_uid or pool_captions[j] == anchor_caption:
                continue
            if too_close(anchor, other, radius):
                continue
            found.append((score, other[0], other[1]))
            if len(found) == k:
                cutoff = cosine - _FLOAT32_SLACK
        if finite < depth or depth >= cosines.size:
            return top_k(found, k)  # no finite cosine left
        depth = min(depth * 4, cosines.size)
        deeper, deeper_cosines = _ranked(cosines, _top_unsorted(cosines, depth))
        ranked, ranked_cosines = deeper.tolist(), deeper_cosines.tolist()
        scores = _rescore(anchor64, pool_vectors, deeper).tolist()


def top_k(candidates: Iterable[tuple[float, str, str]], k: int) -> list[tuple[float, str, str]]:
    """Best k by cosine, one entry per uid, ties broken by uid (arrival order never matters)."""
    best: dict[str, tuple] = {}
    for candidate in candidates:
        previous = best.get(candidate[1])
        if previous is None or candidate[0] > previous[0]:
            best[candidate[1]] = candidate
    return sorted(best.values(), key=lambda c: (-c[0], c[1]))[:k]


def train_centroids(sample: Sequence[tuple], count: int, exact_max: int, centroids: int, group_size: int) -> Optional[np.ndarray]:
    """k-means centroids (faiss, spherical, seeded) for the partitioned path; None for the exact path.

    `sample` holds (uid hash, member) pairs; its order is fixed by the hashes.
    """
    import faiss

    if count <= exact_max or len(sample) < 2:
        return None
    wanted = centroids if centroids > 0 else math.ceil(count / max(1, group_size))
    wanted = max(2, min(wanted, len(sample) // 4))  # k-means needs several points per centroid
    vectors = _vectors([member for _, member in sorted(sample, key=lambda s: (s[0], s[1][0]))])
    kmeans = faiss.Kmeans(vectors.shape[1], wanted, niter=KMEANS_ITERATIONS, seed=KMEANS_SEED, spherical=True, verbose=False)
    kmeans.train(vectors)
    return np.ascontiguousarray(kmeans.centroids, dtype=np.float32)


def assign(members: Sequence[Member], centroids: Optional[np.ndarray], probe: int) -> list[tuple[int, int]]:
    """For each member, (centroid, rank) for its `probe` nearest centroids; the exact group if none."""
    if centroids is None:
        return [[(EXACT_GROUP, 0)] for _ in members]
    import faiss

    probe = max(1, min(probe, len(centroids)))
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(centroids)
    _, ids = index.search(_vectors(members), probe)
    return [[(int(c), rank) for rank, c in enumerate(row)] for row in ids]


def negative_dict(uid: Optional[str], caption: str, score: Optional[float], kind: str) -> dict:
    return {
        Col.NEGATIVE_UID: uid,
        Col.NEGATIVE_CAPTION: caption,
        Col.NEGATIVE_SCORE: None if score is None else float(np.float32(score)),
        Col.NEGATIVE_KIND: kind,
    }


def merge_negatives(uid: str, entries: Iterable[tuple], k: int) -> tuple[str, list[dict]]:
    """All partial results of one uid -> its final list: image, then text, then caption negatives."""
    neighbours: dict[str, list] = {kind: [] for kind in NEIGHBOUR_KINDS}
    captions: list = []
    for kind, payload in entries:
        if kind == "caption":
            captions = list(payload)
        else:
            neighbours[kind].extend(payload)
    result = [negative_dict(n[1], n[2], n[0], kind) for kind in NEIGHBOUR_KINDS for n in top_k(neighbours[kind], k)]
    result += [negative_dict(None, text, None, kind) for text, kind in captions]
    return uid, result


# ------------------------------------------------------------------------------------------------
# the PTransform
# ------------------------------------------------------------------------------------------------


class _AssignDoFn(beam.DoFn):
    """A batch of members -> ((space, centroid), (member, rank)), rank 0 being the nearest centroid."""

    def __init__(self, space: str, probe: int):
        self._space = space
        self._probe = probe
        self._partitioned = Metrics.counter(METRICS_NAMESPACE, f"{space}_partitioned")
        self._exact = Metrics.counter(METRICS_NAMESPACE, f"{space}_exact")

    def process(self, batch, centroids):
        (self._exact if centroids is None else self._partitioned).inc(len(batch))
        for member, assignments in zip(batch, assign(batch, centroids, self._probe)):
            for centroid, rank in assignments:
                yield (self._space, centroid), (member, rank)


class _SearchGroupDoFn(beam.DoFn):
    """One group -> (uid, (space, neighbours)) for each member that queries in this group."""

    def __init__(self, k: int, ceiling: float, radius: int):
        self._k, self._ceiling, self._radius = k, ceiling, radius
        self._group_size = Metrics.distribution(METRICS_NAMESPACE, "group_size")

    def process(self, element):
        (space, _), values = element
        # sorted by uid: the group's content, not arrival order, decides faiss' input order
        values = sorted(values, key=lambda v: (v[0][0], v[1]))
        pool = [member for member, _ in values]
        queries = [member for member, rank in values if rank == 0]
        self._group_size.update(len(pool))
        for uid, found in sorted(exact_neighbours(queries, pool, self._k, self._ceiling, self._radius).items()):
            yield uid, (space, found)


def _sample_key(member: Member) -> tuple:
    return _stable_int(member[0]), member


class MineHardNegatives(beam.PTransform):
    """kept feature records -> (uid, [negative dicts]) for every input uid.

    Negative dicts are keyed by Col.NEGATIVE_UID / NEGATIVE_CAPTION / NEGATIVE_SCORE /
    NEGATIVE_KIND (HARD_NEGATIVE_TYPE); caption negatives have no uid and no score. Records without
    embeddings get caption negatives only.
    """

    def __init__(self, config, label: str = "MineHardNegatives"):
        super().__init__(label=label)
        self._k = int(config.negatives_k)
        self._ceiling = float(config.negatives_ceiling)
        self._radius = int(config.dedup_radius) if getattr(config, "dedup_near", True) else -1
        self._exact_max = int(getattr(config, "negatives_exact_max", 50_000))
        self._centroids = int(getattr(config, "negatives_centroids", 0))
        self._group_size = int(getattr(config, "negatives_group_size", 1000))
        self._probe = int(getattr(config, "negatives_probe", 3))
        self._sample = int(getattr(config, "negatives_sample", 65_536))
        self._captions = bool(getattr(config, "negatives_captions", True))
        if self._k < 0 or self._probe < 1 or self._sample < 2:
            raise ValueError("negatives_k must be >= 0, negatives_probe >= 1, negatives_sample >= 2")

    def expand(self, records):
        k = self._k
        return (
            self.partials(records)
            | "AllPartials" >> beam.Flatten()
            | "ByUid" >> beam.GroupByKey()
            | "Merge" >> beam.MapTuple(lambda uid, entries: merge_negatives(uid, entries, k))
        )

    def partials(self, records) -> list:
        """The unmerged results, (uid, (kind, payload)) with kind "caption", "image" or "text", for
        a caller that groups them by uid together with its own entries (`merge_negatives` takes
        them); `expand` groups and merges them alone."""
        with_captions = self._captions
        caption_entries = records | "CaptionNegatives" >> beam.Map(
            lambda r: (str(r[Col.UID]), ("caption", caption_negatives(caption_of(r)) if with_captions else []))
        )
        partials = [caption_entries]
        if self._k > 0:
            members = records | "Members" >> beam.Map(members_of)
            for space in NEIGHBOUR_KINDS:
                partials.append(self._neighbours(members, space))
        return partials

    def _neighbours(self, members, space: str):
        exact_max, centroids, group_size = self._exact_max, self._centroids, self._group_size
        in_space = members | f"{space}Members" >> beam.FlatMap(lambda m: [m[space]] if space in m else [])
        count = in_space | f"{space}Count" >> beam.combiners.Count.Globally()
        trained = (
            in_space
            | f"{space}SampleKey" >> beam.Map(_sample_key)
            # the samples with the smallest uid hashes: a uniform sample that is the same every run
            | f"{space}Sample" >> beam.combiners.Top.Smallest(self._sample, key=lambda s: (s[0], s[1][0]))
            | f"{space}Centroids" >> beam.Map(
                lambda sample, n: train_centroids(sample, n, exact_max, centroids, group_size),
                n=beam.pvalue.AsSingleton(count),
            )
        )
        return (
            in_space
            | f"{space}Batch" >> beam.BatchElements(min_batch_size=64, max_batch_size=2048)
            | f"{space}Assign" >> beam.ParDo(_AssignDoFn(space, self._probe), centroids=beam.pvalue.AsSingleton(trained))
            | f"{space}ByCentroid" >> beam.GroupByKey()
            | f"{space}Search" >> beam.ParDo(_SearchGroupDoFn(self._k, self._ceiling, self._radius))
        )
