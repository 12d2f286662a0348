"""Hard negatives: one-edit caption rules (pure) and MineHardNegatives (exact and partitioned paths)."""

from __future__ import annotations

import functools
import pickle

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.util import assert_that

from pipeline.config import build_config
from schemas import Col
from tests.conftest import in_process_pipeline
from transforms.negatives import (
    MineHardNegatives,
    caption_negatives,
    exact_neighbours,
    members_of,
    top_k,
)

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


def _member(uid, vector, caption=None, phash=None):
    return members_of({Col.UID: uid, Col.CAPTION: caption or f"caption {uid}", Col.IMAGE_EMBEDDING: vector, Col.PHASH: phash})["image"]


def test_exact_neighbours_skip_self_ceiling_phash_and_same_caption():
    base = np.zeros(8, np.float32)
    base[0] = 1.0

    def near(cos, axis):
        v = np.zeros(8, np.float32)
        v[0], v[axis] = cos, np.sqrt(1 - cos**2)
        return v

    anchor = _member("a", base, phash="0000000000000000")
    pool = [
        anchor,
        _member("copy", near(0.99, 1)),  # above the ceiling
        _member("phash", near(0.9, 2), phash="0000000000000003"),  # 2 bits from the anchor
        _member("same", near(0.89, 3), caption="caption a"),  # same caption as the anchor
        _member("n1", near(0.8, 4)),
        _member("n2", near(0.7, 5)),
        _member("n3", near(0.6, 6)),
        _member("n4", near(0.5, 7)),
    ]
    found = exact_neighbours([anchor], pool, k=3, ceiling=0.95, radius=8)["a"]
    assert [uid for _, uid, _ in found] == ["n1", "n2", "n3"]
    assert found[0][0] == pytest.approx(0.8, abs=1e-3)


def _brute_force_neighbours(anchor, pool, k, ceiling, radius):
    """Reference: every pair scored in float64, filtered, sorted by (-cosine, uid)."""
    from transforms.negatives import normalised_caption, too_close

    def unit(member):
        v = np.frombuffer(member[2], dtype=np.float16).astype(np.float32)
        return (v / np.linalg.norm(v)).astype(np.float64)

    kept = []
    for other in pool:
        score = float(unit(other) @ unit(anchor))
        if other[0] == anchor[0] or score > ceiling or too_close(anchor, other, radius):
            continue
        if normalised_caption(other[1]) == normalised_caption(anchor[1]):
            continue
        kept.append((score, other[0]))
    return sorted(kept, key=lambda c: (-c[0], c[1]))[:k]


def test_exact_neighbours_match_brute_force_in_a_crowded_space():
    # A tight cluster where ~40% of pairs sit above the ceiling (the random-weights case), and a
    # looser one sharing one caption, whose valid neighbours lie 30-80 candidates deep (past the
    # first depth); some rows share a pHash.
    rng = np.random.default_rng(3)
    centre, other_centre = rng.normal(size=32), rng.normal(size=32)
    pool = []
    for i in range(400):
        if i % 4 == 0:
            vector, caption = other_centre + 0.25 * rng.normal(size=32), "the same caption"
        else:
            vector, caption = centre + (0.1 if i % 5 else 0.5) * rng.normal(size=32), f"caption {i}"
        phash = "0" * 16 if i % 11 == 0 else f"{int(rng.integers(1, 2**62)):016x}"
        pool.append(_member(f"u{i:03d}", vector.astype(np.float32), caption=caption, phash=phash))
    queries = pool[::9]
    found = exact_neighbours(queries, pool, k=3, ceiling=0.95, radius=8)
    assert set(found) == {q[0] for q in queries}
    for query in queries:
        expected = _brute_force_neighbours(query, pool, 3, 0.95, 8)
        assert len(expected) == 3
        assert [uid for _, uid, _ in found[query[0]]] == [uid for _, uid in expected]
        assert [score for score, _, _ in found[query[0]]] == pytest.approx([s for s, _ in expected], abs=1e-6)


def test_near_copies_agree_with_too_close_pair_by_pair():
    # the block search's array form of the pHash rule, against the per-pair rule, missing hashes included
    from transforms.negatives import _hash_arrays, _near_copies, too_close

    rng = np.random.default_rng(5)
    base = int(rng.integers(0, 2**63))
    members = []
    for i in range(40):
        flips = sum(1 << int(b) for b in rng.choice(64, size=int(rng.integers(0, 16)), replace=False))
        phash = None if i % 7 == 3 else f"{base ^ flips:016x}"
        mirror = None if i % 5 == 1 else f"{int(rng.integers(0, 2**63)) | (1 << 63):016x}"
        members.append(members_of({Col.UID: f"u{i}", Col.CAPTION: f"c {i}", Col.IMAGE_EMBEDDING: [1.0, 0.0],
                                   Col.PHASH: phash, Col.PHASH_MIRROR: mirror})["image"])
    hashes, present = _hash_arrays(members)
    candidates = np.tile(np.arange(len(members)), (len(members), 1))
    for radius in (-1, 0, 8):
        near = _near_copies(hashes, present, hashes[candidates], present[candidates], radius)
        expected = [[too_close(a, b, radius) for b in members] for a in members]
        assert near.tolist() == expected
        if radius == 8:
            assert 0 < near.sum() < near.size  # both outcomes are exercised


def test_centroids_and_assignment_are_deterministic():
    from transforms.negatives import _sample_key, assign, train_centroids

    members = [members_of(r)["image"] for r in _planted(count=120)]
    sample = [_sample_key(m) for m in reversed(members)]  # arrival order must not matter
    first = train_centroids(sample, count=120, exact_max=0, centroids=6, group_size=0)
    again = train_centroids(list(reversed(sample)), count=120, exact_max=0, centroids=6, group_size=0)
    assert first.shape == (6, 32) and np.array_equal(first, again)
    assert assign(members, first, 2) == assign(members, again, 2)
    assert train_centroids(sample, count=120, exact_max=120, centroids=6, group_size=0) is None  # small: exact


def test_top_k_ties_broken_by_uid_and_deduplicated():
    got = top_k([(0.5, "b", ""), (0.5, "a", ""), (0.5, "a", ""), (0.9, "c", "")], 3)
    assert [c[1] for c in got] == ["c", "a", "b"]


# ---------------------------------------------------------------- MineHardNegatives (Beam)


def _planted(count=240, dim=32, seed=0):
    """Clusters of 6 around random centres: each sample's true neighbours are its cluster mates."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(count // 6, dim))
    records = []
    for i in range(count):
        image = centres[i // 6] + 0.5 * rng.normal(size=dim)
        text = centres[i // 6] + 0.5 * rng.normal(size=dim)
        records.append({
            Col.UID: f"u{i:04d}",
            Col.CAPTION_CLEAN: f"a red car number {i}",
            Col.PHASH: f"{rng.integers(0, 2**63):016x}",
            Col.IMAGE_EMBEDDING: (image / np.linalg.norm(image)).astype(np.float16).tolist(),
            Col.TEXT_EMBEDDING: (text / np.linalg.norm(text)).astype(np.float16).tolist(),
        })
    return records


def _save(items, path):
    # the runner pickles the matcher, so results travel through a file, not a closure
    with open(path, "wb") as handle:
        pickle.dump(dict(items), handle)


def _run(records, tmp_path, **overrides):
    config = build_config(**overrides)
    path = tmp_path / f"result-{len(list(tmp_path.iterdir()))}.pkl"
    with in_process_pipeline() as p:
        result = p | "Create" >> beam.Create(records) | MineHardNegatives(config)
        assert_that(result, functools.partial(_save, path=str(path)))
    with open(path, "rb") as handle:
        return pickle.load(handle)


def _neighbours(result, uid, kind):
    return [n[Col.NEGATIVE_UID] for n in result[uid] if n[Col.NEGATIVE_KIND] == kind]


def test_exact_and_partitioned_paths_agree_on_planted_set(tmp_path):
    records = _planted()
    exact = _run(records, tmp_path)
    partitioned = _run(records, tmp_path, negatives_exact_max=0, negatives_centroids=8, negatives_probe=3, negatives_sample=240)
    assert set(exact) == set(partitioned) == {r[Col.UID] for r in records}
    agree = total = 0
    for uid in exact:
        for kind in ("image", "text"):
            expected = _neighbours(exact, uid, kind)
            assert len(expected) == 3
            # every neighbour is a cluster mate (the planted truth)
            assert all(int(n[1:]) // 6 == int(uid[1:]) // 6 for n in expected)
            agree += len(set(expected) & set(_neighbours(partitioned, uid, kind)))
            total += len(expected)
    assert agree / total >= 0.95


def test_self_and_over_ceiling_excluded_and_records_without_embeddings(tmp_path):
    records = _planted(count=60)
    # "twin" is a near copy of u0000 in both spaces: over the ceiling, never a negative
    twin = dict(records[0], **{Col.UID: "twin", Col.CAPTION_CLEAN: "a blue bicycle", Col.PHASH: None})
    bare = {Col.UID: "bare", Col.CAPTION: "a dog on a sofa", Col.IMAGE_EMBEDDING: None, Col.TEXT_EMBEDDING: None}
    empty = {Col.UID: "empty", Col.CAPTION: None, Col.IMAGE_EMBEDDING: [0.0] * 32, Col.TEXT_EMBEDDING: []}
    result = _run(records + [twin, bare, empty], tmp_path)
    assert set(result) == {r[Col.UID] for r in records} | {"twin", "bare", "empty"}
    for uid, negatives in result.items():
        uids = [n[Col.NEGATIVE_UID] for n in negatives if n[Col.NEGATIVE_UID] is not None]
        assert uid not in uids
        assert all(n[Col.NEGATIVE_SCORE] <= 0.95 for n in negatives if n[Col.NEGATIVE_SCORE] is not None)
    assert "twin" not in _neighbours(result, "u0000", "image") + _neighbours(result, "u0000", "text")
    assert "bare" not in {n[Col.NEGATIVE_UID] for negs in result.values() for n in negs}
    kinds = {n[Col.NEGATIVE_KIND] for n in result["bare"]}
    assert kinds and kinds <= {"swap", "attribute", "object"}
    assert all(n[Col.NEGATIVE_UID] is None and n[Col.NEGATIVE_SCORE] is None for n in result["bare"])
    assert result["empty"] == []
    # every negative is a valid HARD_NEGATIVE_TYPE row
    from schemas import HARD_NEGATIVE_TYPE
    import pyarrow as pa

    pa.array([n for negs in result.values() for n in negs], type=HARD_NEGATIVE_TYPE)
