"""Hard negatives: one-edit caption rules (pure), the neighbour search inside a group (pure) and
the decide phase's mining (one exact group, and the partitioned groups of a large dataset)."""

from __future__ import annotations

import numpy as np
import pytest

from schemas import Col
from tests.conftest import run_decide
from transforms import neighbours as nn
from transforms.negatives import caption_negatives

# ---------------------------------------------------------------- caption negatives (pure)


def _by_kind(caption):
    result = {}
    for text, kind in caption_negatives(caption):
        result.setdefault(kind, []).append(text)
    return result


def test_swap_objects():
    assert "a sofa on a dog" in _by_kind("a dog on a sofa")["swap"]


def test_swap_attributes_same_category_first():
    swaps = _by_kind("a red circle on a blue background")["swap"]
    assert swaps[0] == "a blue circle on a red background"


def test_attribute_change_keeps_everything_else():
    (negative,) = _by_kind("a red car")["attribute"]
    article, colour, noun = negative.split()
    assert (article, noun) == ("a", "car") and colour not in ("red",)


def test_object_change_same_category():
    from transforms.negatives import lexicon

    (negative,) = _by_kind("a red car")["object"]
    article, colour, noun = negative.split()
    assert (article, colour) == ("a", "red")
    assert noun != "car" and lexicon().object_category[noun] == "vehicle"


def test_article_and_case_and_plural_follow_the_edit():
    assert "a table on an apple" in _by_kind("an apple on a table")["swap"]
    swaps = _by_kind("Two red cars next to a glass vase")["swap"]
    assert "Two red vases next to a glass car" in swaps
    assert all(t.startswith("Red TRUCKS") or t.startswith("Big") for t in _by_kind("Red CARS and a big truck")["swap"])


def test_synonyms_are_not_negatives():
    # grey/gray is no change, so no attribute swap between them
    assert "swap" not in _by_kind("a grey cat near a gray wall")


def test_deterministic_and_never_the_source():
    captions = [
        "a dog on a sofa", "a small dog on a red sofa", "A RED CIRCLE ON A BLUE BACKGROUND",
        "a red circle on a red background", "two cats and two cats", "glass on a glass table",
    ]
    for caption in captions:
        first = caption_negatives(caption)
        assert first == caption_negatives(caption)
        assert all(text != caption for text, _ in first)
        assert all(kind in ("swap", "attribute", "object") for _, kind in first)
        assert len({text for text, _ in first}) == len(first)


@pytest.mark.parametrize(
    "caption",
    ["", "   ", None, 42, "hello world", "!!!", "\x00\ufffd\u202e", "<script>alert(1)</script>", "日本語のキャプション"],
)
def test_hostile_or_empty_captions(caption):
    assert caption_negatives(caption) == []


def test_huge_caption_is_cheap_and_safe():
    caption = "a red car " * 50_000
    result = caption_negatives(caption)
    assert result and all(text != caption for text, _ in result)


# ---------------------------------------------------------------- neighbour search (pure)


def _pool(vectors, captions, phashes=None, mirrors=None):
    """A Pool from rows as the decide phase makes them (uid order = index order)."""
    units, valid = nn.unit_rows(np.asarray(vectors, dtype=np.float32), np.ones(len(vectors), bool))
    assert valid.all()
    phashes = phashes or [None] * len(vectors)
    mirrors = mirrors or [None] * len(vectors)
    hashes = np.array([[int(p or "0", 16), int(m or "0", 16)] for p, m in zip(phashes, mirrors)], dtype=np.uint64)
    present = np.array([[p is not None, m is not None] for p, m in zip(phashes, mirrors)], dtype=bool)
    return nn.Pool(nn.search_vectors(units), np.array([nn.caption_id(c) for c in captions], dtype=np.uint64),
                   hashes, present)


def test_neighbours_skip_self_ceiling_phash_and_same_caption():
    def near(cos, axis):
        v = np.zeros(8, np.float32)
        v[0], v[axis] = cos, np.sqrt(1 - cos**2)
        return v

    base = near(1.0, 1)
    rows = [
        (base, "caption a", "0000000000000000"),
        (near(0.99, 1), "copy", None),  # above the ceiling
        (near(0.9, 2), "phash", "0000000000000003"),  # 2 bits from the anchor
        (near(0.89, 3), "Caption  A!", None),  # the same caption, once normalised
        (near(0.8, 4), "n1", None),
        (near(0.7, 5), "n2", None),
        (near(0.6, 6), "n3", None),
        (near(0.5, 7), "n4", None),
    ]
    pool = _pool([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])
    found, scores = nn.group_neighbours(pool, np.array([0]), 3, 0.95, 8)
    assert found[0].tolist() == [4, 5, 6]
    assert scores[0, 0] == pytest.approx(0.8, abs=1e-3)
    # fewer valid candidates than k: padded
    found, scores = nn.group_neighbours(pool, np.array([0]), 6, 0.95, 8)
    assert found[0].tolist()[:4] == [4, 5, 6, 7] and found[0, 4] == -1 and np.isnan(scores[0, 5])


def _brute_force(pool, query, k, ceiling, radius):
    """Reference: every pair scored in float64, filtered, sorted by (-cosine, index)."""
    vectors = pool.vectors.astype(np.float64)
    kept = []
    for j in range(len(pool)):
        score = float((vectors[j] * vectors[query]).sum())
        if j == query or score > ceiling or pool.caption_ids[j] == pool.caption_ids[query]:
            continue
        if nn.near_copies(pool.hashes[[query]], pool.present[[query]], pool.hashes[[j]][None], pool.present[[j]][None],
                          radius)[0, 0]:
            continue
        kept.append((score, j))
    return sorted(kept, key=lambda c: (-c[0], c[1]))[:k]


def test_neighbours_match_brute_force_in_a_crowded_space():
    # A tight cluster where ~40% of pairs sit above the ceiling (the random-weights case), and a
    # looser one sharing one caption, whose valid neighbours lie 30-80 candidates deep (past the
    # first depth); some rows share a pHash.
    rng = np.random.default_rng(3)
    centre, other_centre = rng.normal(size=32), rng.normal(size=32)
    vectors, captions, phashes = [], [], []
    for i in range(400):
        if i % 4 == 0:
            vectors.append(other_centre + 0.25 * rng.normal(size=32))
            captions.append("the same caption")
        else:
            vectors.append(centre + (0.1 if i % 5 else 0.5) * rng.normal(size=32))
            captions.append(f"caption {i}")
        phashes.append("0" * 16 if i % 11 == 0 else f"{int(rng.integers(1, 2**62)):016x}")
    pool = _pool(vectors, captions, phashes)
    queries = np.arange(0, 400, 9)
    found, scores = nn.group_neighbours(pool, queries, 3, 0.95, 8)
    for row, query in enumerate(queries.tolist()):
        expected = _brute_force(pool, query, 3, 0.95, 8)
        assert len(expected) == 3
        assert found[row].tolist() == [j for _, j in expected]
        assert scores[row].tolist() == pytest.approx([s for s, _ in expected], abs=1e-6)


def test_near_copies_agree_with_the_rule_pair_by_pair():
    # the array form of the pHash rule against a plain loop, missing hashes and radius -1 included
    rng = np.random.default_rng(5)
    base = int(rng.integers(0, 2**63))
    hashes, present = [], []
    for i in range(40):
        flips = sum(1 << int(b) for b in rng.choice(64, size=int(rng.integers(0, 16)), replace=False))
        hashes.append([base ^ flips, int(rng.integers(0, 2**63)) | (1 << 63)])
        present.append([i % 7 != 3, i % 5 != 1])
    hashes, present = np.array(hashes, dtype=np.uint64), np.array(present, dtype=bool)
    candidates = np.tile(np.arange(40), (40, 1))
    for radius in (-1, 0, 8):
        near = nn.near_copies(hashes, present, hashes[candidates], present[candidates], radius)
        expected = [[radius >= 0 and bool(present[a, 0]) and any(
            present[a, m] and present[b, t] and bin(int(hashes[a, m]) ^ int(hashes[b, t])).count("1") <= radius
            for m in (0, 1) for t in (0, 1)) for b in range(40)] for a in range(40)]
        assert near.tolist() == expected
        if radius == 8:
            assert 0 < near.sum() < near.size  # both outcomes are exercised


def test_unit_rows_match_a_lone_vectors_norm_bit_for_bit():
    rng = np.random.default_rng(9)
    values = rng.normal(size=(300, 64)).astype(np.float16)
    values[5] = 0  # zero: no vector
    values[7, 3] = np.inf  # not finite: no vector
    units, valid = nn.unit_rows(values, np.ones(300, bool))
    assert not valid[5] and not valid[7] and valid.sum() == 298
    for i in np.flatnonzero(valid).tolist():
        vector = values[i].astype(np.float32)
        assert np.array_equal(units[i], (vector / np.linalg.norm(vector)).astype(np.float16))


def test_groups_and_assignment_are_deterministic_and_batch_independent():
    rng = np.random.default_rng(2)
    centres = rng.normal(size=(40, 32))
    points = nn.search_vectors(nn.unit_rows(centres[rng.integers(0, 40, 4000)] + 0.3 * rng.normal(size=(4000, 32)),
                                            np.ones(4000, bool))[0])
    first = nn.train_partitioning(points, 4000, group_size=100, partition_rows=1000)
    again = nn.train_partitioning(points.copy(), 4000, group_size=100, partition_rows=1000)
    assert first.partitions == 4 and 30 <= first.groups <= 50
    assert np.array_equal(first.fine, again.fine) and np.array_equal(first.fine_parent, again.fine_parent)
    whole = nn.assign_groups(points, first, 2)
    pieces = np.concatenate([nn.assign_groups(points[i:i + 333], first, 2) for i in range(0, 4000, 333)])
    assert np.array_equal(whole, pieces)  # a sample's groups never depend on its batch
    assert (whole[:, 0] != whole[:, 1]).all()
    # the home group is the nearest fine centroid under the two nearest coarse ones
    best = np.argmax(points @ first.fine.T, axis=1)
    assert (whole[:, 0] == best).mean() > 0.97
    # exactly: the two nearest fine centroids among those of the two nearest coarse cells (float64)
    exact = points.astype(np.float64)
    coarse = np.argsort(-(exact @ first.coarse.astype(np.float64).T), axis=1)[:, :2]
    allowed = (first.fine_parent[None, :] == coarse[:, :1]) | (first.fine_parent[None, :] == coarse[:, 1:])
    fine = np.where(allowed, exact @ first.fine.astype(np.float64).T, -np.inf)
    assert np.array_equal(whole, np.argsort(-fine, axis=1, kind="stable")[:, :2])


def test_caption_ids_are_equal_exactly_for_equal_normalised_captions():
    import pyarrow as pa

    words = ["dog", "god", "cat", "act", "red", "car", "arc"]
    rng = np.random.default_rng(4)
    captions = [" ".join(rng.choice(words, 3)) + rng.choice(["", ".", "!", " 12", " 21"]) for _ in range(400)]
    captions = [c.title() if i % 3 == 0 else c for i, c in enumerate(captions)]
    captions = captions + captions[:150] + [None, ""]  # copies of a sample in other groups; empty
    keys = nn.caption_keys(pa.array(captions))
    normal = [nn.normalised_caption(c or "") for c in captions]
    assert len(set(keys.tolist())) < len(set(normal))  # anagrams and reordered words share keys
    for given in (pa.array(captions), captions):
        ids = nn.caption_ids(keys, given).tolist()
        same_id = {(a, b) for a in range(0, len(ids), 7) for b in range(len(ids)) if ids[a] == ids[b]}
        same_text = {(a, b) for a in range(0, len(ids), 7) for b in range(len(ids)) if normal[a] == normal[b]}
        assert same_id == same_text


# ---------------------------------------------------------------- the decide phase's mining


def _planted(count=240, dim=32, seed=0, spread=0.5):
    """Clusters of 6 around random centres: each sample's true neighbours are its cluster mates."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(count // 6, dim))
    records = []
    for i in range(count):
        image = centres[i // 6] + spread * rng.normal(size=dim)
        text = centres[i // 6] + spread * rng.normal(size=dim)
        records.append({
            Col.UID: f"{i:032x}",
            Col.CAPTION_CLEAN: f"a red car number {i}",
            Col.PHASH: f"{rng.integers(0, 2**63):016x}",
            Col.IMAGE_EMBEDDING: (image / np.linalg.norm(image)).astype(np.float16).tolist(),
            Col.TEXT_EMBEDDING: (text / np.linalg.norm(text)).astype(np.float16).tolist(),
        })
    return records


_MINING_ONLY = {"dedup_exact": False, "dedup_near": False}


def _mined(records, directory, **config):
    decisions, counters = run_decide(records, directory, **{**_MINING_ONLY, **config})
    return {uid: row[Col.HARD_NEGATIVES] for uid, row in decisions.items()}, counters


def _neighbours(result, uid, kind):
    return [n[Col.NEGATIVE_UID] for n in result[uid] if n[Col.NEGATIVE_KIND] == kind]


def test_exact_and_partitioned_paths_agree_on_planted_set(tmp_path):
    records = _planted(count=3000, spread=0.3)
    exact, _ = _mined(records, tmp_path / "exact")
    partitioned, counters = _mined(records, tmp_path / "groups", negatives_exact_max=100, negatives_group_size=150, negatives_probe=3,
                                   decide_partition_rows=1000, negatives_sample=3000)
    assert counters["image_searched"] == counters["text_searched"] == 3000
    assert set(exact) == set(partitioned) == {r[Col.UID] for r in records}
    agree = total = 0
    for uid in exact:
        for kind in ("image", "text"):
            expected = _neighbours(exact, uid, kind)
            assert len(expected) == 3
            agree += len(set(expected) & set(_neighbours(partitioned, uid, kind)))
            total += len(expected)
    assert agree / total >= 0.95, agree / total


def test_self_and_over_ceiling_excluded_and_records_without_embeddings(tmp_path):
    records = _planted(count=60)
    # "twin" is a near copy of the first record in both spaces: over the ceiling, never a negative
    first = records[0][Col.UID]
    twin = dict(records[0], **{Col.UID: "f" * 32, Col.CAPTION_CLEAN: "a blue bicycle", Col.PHASH: None})
    bare = {Col.UID: "e" * 32, Col.CAPTION: "a dog on a sofa", Col.IMAGE_EMBEDDING: None, Col.TEXT_EMBEDDING: None}
    empty = {Col.UID: "d" * 32, Col.CAPTION: None, Col.IMAGE_EMBEDDING: [0.0] * 32, Col.TEXT_EMBEDDING: []}
    result, _ = _mined(records + [twin, bare, empty], tmp_path)
    assert set(result) == {r[Col.UID] for r in records} | {twin[Col.UID], bare[Col.UID], empty[Col.UID]}
    for uid, negatives in result.items():
        uids = [n[Col.NEGATIVE_UID] for n in negatives if n[Col.NEGATIVE_UID] is not None]
        assert uid not in uids
        assert all(n[Col.NEGATIVE_SCORE] <= 0.95 for n in negatives if n[Col.NEGATIVE_SCORE] is not None)
    assert twin[Col.UID] not in _neighbours(result, first, "image") + _neighbours(result, first, "text")
    assert bare[Col.UID] not in {n[Col.NEGATIVE_UID] for negs in result.values() for n in negs}
    kinds = {n[Col.NEGATIVE_KIND] for n in result[bare[Col.UID]]}
    assert kinds and kinds <= {"swap", "attribute", "object"}
    assert all(n[Col.NEGATIVE_UID] is None and n[Col.NEGATIVE_SCORE] is None for n in result[bare[Col.UID]])
    assert result[empty[Col.UID]] == []


def test_dropped_samples_are_never_negatives_nor_get_any(tmp_path):
    records = _planted(count=60)
    copy = dict(records[3], **{Col.UID: "0" * 31 + "z", Col.SHA256: "s" * 64})
    original = dict(records[3], **{Col.SHA256: "s" * 64})
    records = [r for i, r in enumerate(records) if i != 3] + [original, copy]
    decisions, _ = run_decide(records, tmp_path)
    dropped = [uid for uid, row in decisions.items() if row[Col.STATUS] == "dropped"]
    assert dropped == [max(copy[Col.UID], original[Col.UID])]  # an exact duplicate: the higher uid goes
    assert decisions[dropped[0]][Col.HARD_NEGATIVES] is None
    mined = {n[Col.NEGATIVE_UID] for row in decisions.values() for n in row[Col.HARD_NEGATIVES] or []}
    assert dropped[0] not in mined


def test_recall_estimate_is_what_the_exact_search_says(tmp_path):
    """decide's recall counters: the sampled queries (smallest uid hashes of the kept samples:
    here the lowest uids) checked against an exact search over every kept sample. On the exact
    path they find everything; on a partitioned search with one probe the estimate must be the
    share of the exact run's neighbours that the partitioned run's decisions carry."""
    records = _planted(count=3000, spread=0.6)
    queries = 60
    exact, exact_counters = _mined(records, tmp_path / "exact", negatives_recall_queries=queries)
    assert exact_counters["image_recall_queries"] == exact_counters["text_recall_queries"] == queries
    assert exact_counters["image_recall_exact"] == exact_counters["image_recall_found"] == 3 * queries
    assert exact_counters["text_recall_exact"] == exact_counters["text_recall_found"] == 3 * queries
    partitioned, counters = _mined(records, tmp_path / "groups", negatives_recall_queries=queries, negatives_exact_max=100,
                                   negatives_group_size=150, negatives_probe=1, decide_partition_rows=1000,
                                   negatives_sample=3000)
    sampled = sorted(r[Col.UID] for r in records)[:queries]
    for kind in ("image", "text"):
        truth = {uid: _neighbours(exact, uid, kind) for uid in sampled}
        hits = sum(len(set(truth[uid]) & set(_neighbours(partitioned, uid, kind))) for uid in sampled)
        assert counters[f"{kind}_recall_queries"] == queries
        assert counters[f"{kind}_recall_exact"] == sum(len(t) for t in truth.values()) == 3 * queries
        assert counters[f"{kind}_recall_found"] == hits
        assert hits < 3 * queries, kind  # one probe misses some: the estimate is not trivially 1


def test_no_recall_estimate_when_asked_for_none(tmp_path):
    _, counters = _mined(_planted(count=60), tmp_path, negatives_recall_queries=0)
    assert not any("recall" in name for name in counters)
