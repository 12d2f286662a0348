"""Dedup: pure functions (banding, hamming, union-find, survivor rule, blank, mirror) and the decide
phase's dedup on small hand-made feature records (over all samples, and inside CLIP groups)."""

from __future__ import annotations

import hashlib
import io
import random

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

from pipeline import synthetic
from schemas import Col, DropReason
from tests.conftest import run_decide
from transforms import dedup
from transforms.dedup import (
    DESCRIPTOR_BYTES,
    BucketStats,
    UnionFind,
    band_keys,
    band_masks,
    clusters_from_edges,
    first_agreeing_band,
    hamming,
    image_hashes,
    near_pairs,
    quality_key,
    verify_pair,
)


# ---------------------------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------------------------


def natural_image(seed: int, size=(320, 240)) -> Image.Image:
    """A photo-like image: smooth gradients, a few soft blobs and noise, no uniform border."""
    rng = np.random.default_rng(seed)
    h, w = size[1], size[0]
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.zeros((h, w, 3))
    for c in range(3):
        a, b, p = rng.uniform(-1, 1, 3)
        img[..., c] = 128 + 80 * np.sin(6 * (a * x + b * y) + 6 * p)
    for _ in range(4):
        cx, cy, r = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.7), rng.uniform(0.05, 0.2)
        blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))
        img += blob[..., None] * rng.uniform(-120, 120, 3)
    img += rng.normal(0, 6, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def phash_int(features: dict) -> int:
    return int(features[Col.PHASH], 16)


def best_distance(a: dict, b: dict) -> int:
    """Smallest Hamming distance over the hash variants, as the transform searches them."""
    va = [v for _, v in dedup.hash_variants(a)]
    vb = [v for _, v in dedup.hash_variants(b)]
    return min(hamming(x, y) for x in va for y in vb)


# ---------------------------------------------------------------------------------------------
# pure functions
# ---------------------------------------------------------------------------------------------


def test_hamming():
    assert hamming(0, 0) == 0
    assert hamming(0b1011, 0b0001) == 2
    assert hamming(2**64 - 1, 0) == 64


@pytest.mark.parametrize("radius", [0, 3, 8, 10, 15])
def test_band_masks_partition_the_64_bits(radius):
    masks = band_masks(radius)
    assert len(masks) == radius + 1
    assert sum(masks) == 2**64 - 1  # disjoint and complete
    for a in masks:
        for b in masks:
            assert a == b or a & b == 0


def test_pigeonhole_every_pair_within_radius_shares_a_band():
    rng = random.Random(1)
    radius = 8
    masks = band_masks(radius)
    for _ in range(2000):
        a = rng.getrandbits(64)
        b = a
        for bit in rng.sample(range(64), rng.randint(0, radius)):
            b ^= 1 << bit
        shared = set(band_keys(a, masks)) & set(band_keys(b, masks))
        assert shared, (hex(a), hex(b))
        assert first_agreeing_band(a, b, masks) < len(masks)


def test_band_masks_refuses_more_bands_than_bits():
    with pytest.raises(ValueError):
        band_masks(64)


def brute(vals, radius):
    return {
        (i, j)
        for i in range(len(vals))
        for j in range(i + 1, len(vals))
        if hamming(int(vals[i]), int(vals[j])) <= radius
    }


@pytest.mark.parametrize("max_bucket", [10_000, 40, 7])
def test_near_pairs_equals_brute_force_even_when_split(max_bucket):
    """Splitting an oversize set (recursive pigeonhole) finds exactly the brute-force pairs, once each."""
    rng = random.Random(2)
    base = [rng.getrandbits(64) for _ in range(30)]
    vals = []
    for b in base:  # clusters of near values plus skew: many share the top 16 bits
        vals.append(b)
        for _ in range(4):
            v = b
            for bit in rng.sample(range(64), rng.randint(1, 9)):
                v ^= 1 << bit
            vals.append(v)
    vals += [(0xABCD << 48) | rng.getrandbits(48) for _ in range(100)]
    vals = np.array(sorted(set(vals)), dtype=np.uint64)
    stats = BucketStats()
    pairs = near_pairs(vals, 8, max_bucket, 0, stats)
    got = [tuple(p) for p in pairs.tolist()]
    assert len(got) == len(set(got))  # no pair reported twice
    assert set(got) == brute(vals, 8)
    assert (stats.oversize > 0) == (len(vals) > max_bucket)


def test_union_find_and_clusters_transitive():
    uf = UnionFind()
    uf.union("a", "b")
    uf.union("b", "c")
    uf.union("x", "y")
    assert uf.find("a") == uf.find("c")
    assert uf.find("a") != uf.find("x")
    q = {u: (0, 0, 0.0, u) for u in "abcxy"}
    assert clusters_from_edges([("a", "b"), ("b", "c"), ("x", "y")], q) == [("a", ["b", "c"]), ("x", ["y"])]


def test_survivor_rule_resolution_then_clip_then_uid():
    def rec(uid, w, h, clip):
        return {Col.UID: uid, Col.ORIGINAL_WIDTH: w, Col.ORIGINAL_HEIGHT: h, Col.CLIP_SCORE: clip}

    records = [rec("c", 100, 100, 0.9), rec("b", 200, 100, 0.1), rec("a", 200, 100, None), rec("d", 200, 100, 0.1)]
    assert sorted(records, key=quality_key)[0][Col.UID] == "b"  # biggest, clip present, then uid b<d
    assert [r[Col.UID] for r in sorted(records, key=quality_key)] == ["b", "d", "a", "c"]


def test_blank_and_near_uniform_images_stay_out_of_the_hash_space():
    for image in (
        Image.new("RGB", (300, 200), (255, 255, 255)),
        Image.new("RGB", (300, 200), (12, 80, 200)),
        Image.fromarray(np.clip(np.random.default_rng(0).normal(128, 1, (200, 300, 3)), 0, 255).astype(np.uint8)),
    ):
        assert image_hashes(image) == {Col.PHASH: None, Col.PHASH_MIRROR: None, Col.DEDUP_DESCRIPTOR: None}


def test_image_hashes_shape():
    features = image_hashes(natural_image(0))
    assert len(features[Col.PHASH]) == 16 and features[Col.PHASH] == features[Col.PHASH].lower()
    int(features[Col.PHASH], 16)
    assert len(features[Col.PHASH_MIRROR]) == 16
    assert len(features[Col.DEDUP_DESCRIPTOR]) == DESCRIPTOR_BYTES <= 1024


def test_phash_is_imagehash_phash_for_small_images():
    import imagehash

    image = natural_image(3, size=(128, 96))
    assert image_hashes(image)[Col.PHASH] == str(imagehash.phash(image))


def test_mirror_invariance_on_a_flipped_image():
    image = natural_image(1)
    flipped = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    a, b = image_hashes(image), image_hashes(flipped)
    assert hamming(phash_int(a), phash_int(b)) > 8  # plain pHash misses the flip...
    assert hamming(phash_int(a), int(b[Col.PHASH_MIRROR], 16)) <= 2  # ...the mirror hash finds it
    assert verify_pair((a[Col.DEDUP_DESCRIPTOR], None), (b[Col.DEDUP_DESCRIPTOR], None), True, 0.8, 0.9)


def test_padding_is_trimmed_and_edits_stay_close():
    image = natural_image(2)
    a = image_hashes(image)
    padded = ImageOps.expand(image, border=(16, 12), fill=(0, 0, 0))
    buffer = io.BytesIO()
    image.resize((160, 120)).save(buffer, format="JPEG", quality=30)
    recompressed = Image.open(buffer).convert("RGB")
    for edited in (padded, recompressed):
        b = image_hashes(edited)
        assert best_distance(a, b) <= 8
        assert verify_pair((a[Col.DEDUP_DESCRIPTOR], None), (b[Col.DEDUP_DESCRIPTOR], None), False, 0.8, 0.9)


def test_verification_rejects_a_recoloured_image():
    attrs = synthetic.Attributes("star", "blue", "grey")
    image = synthetic.render(attrs, seed=0)
    recoloured = synthetic.render(synthetic.Attributes("star", "yellow", "grey"), seed=0)
    a, b = image_hashes(image), image_hashes(recoloured)
    assert not verify_pair((a[Col.DEDUP_DESCRIPTOR], None), (b[Col.DEDUP_DESCRIPTOR], None), False, 0.8, 0.9)


def test_verification_prefers_embeddings_when_both_exist():
    d = bytes(DESCRIPTOR_BYTES)
    assert verify_pair((d, np.array([1.0, 0.0])), (d, np.array([0.99, 0.1])), False, 0.8, 0.9)
    assert not verify_pair((d, np.array([1.0, 0.0])), (d, np.array([0.0, 1.0])), False, 0.8, 0.9)


# ---------------------------------------------------------------------------------------------
# the decide phase's dedup
# ---------------------------------------------------------------------------------------------


def record(uid, image=None, *, sha=None, phash=None, size=(320, 240), clip=None, embedding=None):
    features = image_hashes(image) if image is not None else {
        Col.PHASH: phash, Col.PHASH_MIRROR: None, Col.DEDUP_DESCRIPTOR: None}
    if sha is None:
        sha = hashlib.sha256(image.tobytes() if image is not None else uid.encode()).hexdigest()
    return {
        Col.UID: uid,
        Col.SHA256: sha,
        Col.ORIGINAL_WIDTH: size[0],
        Col.ORIGINAL_HEIGHT: size[1],
        Col.CLIP_SCORE: clip,
        Col.IMAGE_EMBEDDING: embedding,
        **features,
    }




_DEDUP_ONLY = {"negatives_k": 0, "negatives_captions": False}


def dedup_drops(records, directory, **config) -> tuple[list, dict]:
    """The decide phase with dedup only -> (sorted drops as dicts, counters)."""
    decisions, counters = run_decide(records, directory, **{**_DEDUP_ONLY, **config})
    drops = [
        {Col.UID: uid, Col.DUPLICATE_OF: row[Col.DUPLICATE_OF], Col.REASON: row[Col.REASON]}
        for uid, row in sorted(decisions.items())
        if row[Col.REASON] in (DropReason.DUPLICATE_EXACT.value, DropReason.DUPLICATE_NEAR.value)
    ]
    return drops, counters


_RUNS = iter(range(10**6))


def decide(records, expected, **config):
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as directory:
        drops, counters = dedup_drops(records, Path(directory) / f"run{next(_RUNS)}", **config)
    assert drops == sorted(expected, key=lambda d: d[Col.UID])
    return counters


def drop(uid, of, reason):
    return {Col.UID: uid, Col.DUPLICATE_OF: of, Col.REASON: reason.value}


EXACT, NEAR = DropReason.DUPLICATE_EXACT, DropReason.DUPLICATE_NEAR


def test_exact_duplicates_collapse_deterministically():
    image = natural_image(5)
    other = natural_image(6)
    records = [
        record("u3", image, sha="s1", clip=0.2),
        record("u1", image, sha="s1", clip=0.3),  # best clip score: survives
        record("u2", image, sha="s1", clip=None),
        record("u9", other),
    ]
    decide(records, [drop("u3", "u1", EXACT), drop("u2", "u1", EXACT)], dedup_near=False)
    decide(list(reversed(records)), [drop("u3", "u1", EXACT), drop("u2", "u1", EXACT)])


def test_near_duplicate_cluster_with_transitive_chain_and_no_chained_duplicate_of():
    # hashes: a - b (4 bits) - c (4 more bits): a..c are 8 apart, b..d 9; all one cluster by chain
    a = 0x0F0F_0F0F_0F0F_0F0F
    b = a ^ 0b1111
    c = b ^ (0b1111 << 20)
    d = c ^ (0b11111 << 40)  # 5 from c, 9 from b, 13 from a: only reachable through c
    far = a ^ (2**64 - 1)
    records = [
        record("ua", phash=f"{a:016x}", size=(100, 100)),
        record("ub", phash=f"{b:016x}", size=(400, 300)),  # largest: survivor
        record("uc", phash=f"{c:016x}", size=(100, 100)),
        record("ud", phash=f"{d:016x}", size=(100, 100)),
        record("ue", phash=f"{far:016x}", size=(100, 100)),
        record("uf", sha=None, phash=None),  # blank: no hash, never clustered
    ]
    expected = [drop("ua", "ub", NEAR), drop("uc", "ub", NEAR), drop("ud", "ub", NEAR)]
    decide(records, expected)
    decide(list(reversed(records)), expected)


def test_real_images_flip_pad_recompress_cluster_distinct_images_do_not():
    base = natural_image(7)
    buffer = io.BytesIO()
    base.save(buffer, format="JPEG", quality=30)
    records = [
        record("orig", base, size=(320, 240)),
        record("flip", base.transpose(Image.Transpose.FLIP_LEFT_RIGHT), size=(320, 240), clip=0.1),
        record("pad", ImageOps.expand(base, border=(16, 12), fill=(255, 255, 255)), size=(352, 264)),
        record("jpeg", Image.open(buffer).convert("RGB"), size=(320, 240), clip=0.5),
    ] + [record(f"other{i}", natural_image(100 + i)) for i in range(6)]
    decide(records, [drop("orig", "pad", NEAR), drop("flip", "pad", NEAR), drop("jpeg", "pad", NEAR)])


def test_exact_group_whose_survivor_is_near_dropped_points_to_the_cluster_survivor():
    a = 0x1234_5678_9ABC_DEF0
    records = [
        record("big", phash=f"{a ^ 1:016x}", size=(1000, 1000)),
        record("s1", sha="same", phash=f"{a:016x}", size=(100, 100), clip=0.9),
        record("s2", sha="same", phash=f"{a:016x}", size=(100, 100), clip=0.1),
    ]
    decide(records, [drop("s1", "big", NEAR), drop("s2", "big", NEAR)])


def test_oversize_bucket_is_split_counted_and_nothing_truncated():
    rng = random.Random(3)
    top = 0xFF << 56  # every hash shares the top band: one huge bucket
    records, expected = [], []
    for i in range(60):
        value = top | rng.getrandbits(56)
        records.append(record(f"k{i:03d}", phash=f"{value:016x}", size=(200, 200)))
        records.append(record(f"z{i:03d}", phash=f"{value ^ 0b101:016x}", size=(100, 100)))
        expected.append(drop(f"z{i:03d}", f"k{i:03d}", NEAR))
    counters = decide(records, expected, dedup_max_bucket=16)
    assert counters["near_duplicates"] == 60


def test_oversize_buckets_are_split_without_losing_a_pair():
    # near_pairs itself: one huge bucket split again on its free bits finds what brute force finds
    rng = random.Random(4)
    values = np.array(sorted({(0xFF << 56) | rng.getrandbits(56) for _ in range(400)}), dtype=np.uint64)
    values = np.concatenate([values, values[:100] ^ np.uint64(0b1011)])
    stats = BucketStats()
    split = {tuple(p) for p in near_pairs(values, 8, 16, 0, stats).tolist()}
    brute = {tuple(p) for p in near_pairs(values, 8, 10**9).tolist()}
    assert stats.oversize >= 1 and split == brute and len(brute) >= 100


def test_identical_hashes_are_chained_not_cliqued():
    value = 0x0123_4567_89AB_CDEF
    records = [record(f"m{i:02d}", phash=f"{value:016x}", size=(100, 100)) for i in range(30)]
    expected = [drop(f"m{i:02d}", "m00", NEAR) for i in range(1, 30)]
    counters = decide(records, expected)
    assert counters["candidate_edges"] == 29  # a path, not 435 clique edges


# ---------------------------------------------------------------------------------------------
# regression: the demo corpus (flat shapes on flat backgrounds) merged distinct pictures
# ---------------------------------------------------------------------------------------------


def _fetched(uid: str, image: Image.Image, quality: int = 90) -> dict:
    """A feature record as the fetch phase builds it: JPEG bytes -> decoded RGB -> image_hashes."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    data = buffer.getvalue()
    decoded = Image.open(io.BytesIO(data)).convert("RGB")
    return {
        Col.UID: uid,
        Col.SHA256: hashlib.sha256(data).hexdigest(),
        Col.ORIGINAL_WIDTH: decoded.width,
        Col.ORIGINAL_HEIGHT: decoded.height,
        Col.CLIP_SCORE: None,
        Col.IMAGE_EMBEDDING: None,
        **image_hashes(decoded),
    }

def assert_dedup_decisions(records: list[dict], expected: list[dict]) -> None:
    """Run the decide phase's dedup (default config) and compare its drop decisions."""
    decide(records, expected)


def _fetched_all(images: dict) -> list[dict]:
    return [_fetched(uid, image) for uid, image in images.items()]



def _recolour(image: Image.Image, old: tuple, new: tuple, tol: int = 40) -> Image.Image:
    """The same picture with every pixel near `old` painted `new` (same layout, other colour)."""
    pixels = np.asarray(image).astype(np.int16)
    near = np.abs(pixels - np.array(old)).max(axis=2) <= tol
    out = pixels.copy()
    out[near] = new
    return Image.fromarray(out.astype(np.uint8))


def test_synthetic_shapes_distinct_pictures_stay_apart_edited_copies_merge():
    size = 448
    base_attrs = synthetic.Attributes("triangle", "red", "beige")
    base = synthetic.render(base_attrs, size=size, seed=3)
    w, h = base.size
    dx, dy = round(w * 0.025), round(h * 0.025)  # 5 % crop in total, 2.5 % per side
    px, py = round(w * 0.05), round(h * 0.05)  # 10 % pad in total, 5 % per side
    copies = {
        "copy_resized_jpeg": _fetched("copy_resized_jpeg", base.resize((w * 3 // 4, h * 3 // 4)), quality=60),
        "copy_bright": _fetched("copy_bright", ImageEnhance.Brightness(base).enhance(1.25)),
        "copy_flip": _fetched("copy_flip", base.transpose(Image.Transpose.FLIP_LEFT_RIGHT)),
        "copy_crop": _fetched("copy_crop", base.crop((dx, dy, w - dx, h - dy))),
        "copy_pad": _fetched("copy_pad", ImageOps.expand(base, border=(px, py), fill=(0, 0, 0))),
    }
    # a red square placed well off-centre, so that a quarter turn moves it elsewhere
    square_attrs = synthetic.Attributes("square", "red", "grey")
    square_seed = next(
        s for s in range(200)
        if abs(np.mean(np.nonzero(np.asarray(synthetic.render(square_attrs, size=size, seed=s))[..., 1] < 60)[1]) - size / 2)
        > size * 0.12
    )
    square = synthetic.render(square_attrs, size=size, seed=square_seed)
    background = synthetic.BACKGROUNDS["beige"]
    distinct = {
        "base": base,
        # same picture (same layout), another background or another shape colour
        "recoloured_background_grey": _recolour(base, background, synthetic.BACKGROUNDS["grey"]),
        "recoloured_background_pink": _recolour(base, background, synthetic.BACKGROUNDS["pink"]),
        "recoloured_shape_orange": _recolour(base, synthetic.COLOURS["red"], synthetic.COLOURS["orange"]),
        # what the demo corpus merged: same shape + colour on other backgrounds, other colours
        **{
            f"triangle_red_{bg}": synthetic.render(synthetic.Attributes("triangle", "red", bg), size=size, seed=3)
            for bg in ("grey", "pink", "teal", "navy")
        },
        **{
            f"triangle_{c}_beige": synthetic.render(synthetic.Attributes("triangle", c, "beige"), size=size, seed=3)
            for c in ("orange", "purple", "blue")
        },
        "star_black_grey": synthetic.render(synthetic.Attributes("star", "black", "grey"), size=size, seed=1),
        "star_black_beige": synthetic.render(synthetic.Attributes("star", "black", "beige"), size=size, seed=1),
        "circle_green_grey": synthetic.render(synthetic.Attributes("circle", "green", "grey"), size=size, seed=2),
        "circle_green_beige": synthetic.render(synthetic.Attributes("circle", "green", "beige"), size=size, seed=2),
        "square_orange_pink": synthetic.render(synthetic.Attributes("square", "orange", "pink"), size=size, seed=4),
        "square_red_navy": synthetic.render(synthetic.Attributes("square", "red", "navy"), size=size, seed=4),
        "cross_yellow_teal": synthetic.render(synthetic.Attributes("cross", "yellow", "teal"), size=size, seed=5),
        "cross_orange_navy": synthetic.render(synthetic.Attributes("cross", "orange", "navy"), size=size, seed=5),
        "square_red_grey": square,
        "square_red_grey_rotated": square.transpose(Image.Transpose.ROTATE_90),
    }
    records = [_fetched(uid, image) for uid, image in distinct.items()] + list(copies.values())
    assert all(r[Col.PHASH] is not None for r in records)
    # the padded copy is the largest: it survives, every other copy of the base points to it
    expected = [drop(uid, "copy_pad", NEAR) for uid in ("base", "copy_resized_jpeg", "copy_bright", "copy_flip", "copy_crop")]
    assert_dedup_decisions(records, expected)


def test_equal_grey_colours_are_hashed_not_treated_as_blank():
    """Red on teal has (almost) no grey contrast; it must still get hashes, and its resized
    JPEG copy must land within the radius (the strongest colour channel is hashed)."""
    import io

    from pipeline.synthetic import Attributes, render

    image = render(Attributes("cross", "red", "teal"), size=320, seed=5)
    copy = image.resize((240, 240))
    buffer = io.BytesIO()
    copy.save(buffer, format="JPEG", quality=60)
    copy = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    first, second = image_hashes(image), image_hashes(copy)
    assert first[Col.PHASH] is not None and second[Col.PHASH] is not None
    distance = bin(int(first[Col.PHASH], 16) ^ int(second[Col.PHASH], 16)).count("1")
    assert distance <= 8
    flat = Image.new("RGB", (200, 200), (120, 40, 200))
    assert image_hashes(flat)[Col.PHASH] is None


# ---------------------------------------------------------------------------------------------
# descriptor v3: robust hash, object view
# ---------------------------------------------------------------------------------------------


def _jpeg_copy(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def _small_object_on_canvas(shape: str, size=(600, 800), colour=(30, 30, 30)) -> Image.Image:
    """A small drawn object in the middle of a large white canvas (like much clip art)."""
    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    cx, cy = size[0] // 2, size[1] // 2
    if shape == "lips":
        draw.ellipse((cx - 90, cy - 45, cx + 90, cy + 45), fill=(200, 20, 40))
        draw.line((cx - 85, cy, cx + 85, cy), fill=(90, 0, 10), width=6)
    elif shape == "figure":
        draw.ellipse((cx - 30, cy - 90, cx + 30, cy - 30), fill=colour)
        draw.rectangle((cx - 35, cy - 25, cx + 35, cy + 60), fill=colour)
        draw.rectangle((cx - 35, cy + 60, cx - 10, cy + 110), fill=colour)
        draw.rectangle((cx + 10, cy + 60, cx + 35, cy + 110), fill=colour)
    return image


def test_robust_hash_is_stable_on_a_symmetric_picture_and_mirrors_exactly():
    """A symmetric picture (a disc on white) has many zero DCT coefficients: pHash's bits for them
    are noise, the robust hash's dead zone makes them 0, so a JPEG copy stays close."""
    image = Image.new("RGB", (640, 420), (255, 255, 255))
    ImageDraw.Draw(image).ellipse((220, 110, 420, 310), fill=(200, 0, 20))
    a = dedup.parse_descriptor(image_hashes(image)[Col.DEDUP_DESCRIPTOR])
    for copy in (_jpeg_copy(image, 30), _jpeg_copy(image.resize((320, 210)), 50)):
        b = dedup.parse_descriptor(image_hashes(copy)[Col.DEDUP_DESCRIPTOR])
        assert hamming(a.hashes[0][0], b.hashes[0][0]) <= 2
    photo = natural_image(4)
    p = dedup.parse_descriptor(image_hashes(photo)[Col.DEDUP_DESCRIPTOR])
    f = dedup.parse_descriptor(image_hashes(photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT))[Col.DEDUP_DESCRIPTOR])
    assert hamming(p.hashes[0][1], f.hashes[0][0]) <= 2
    assert hamming(p.hashes[0][0], f.hashes[0][0]) > 8


def test_object_view_of_a_padded_clip_art_is_the_object():
    """Clip art on white: trimmed view = the object. Its black-padded copy: trimmed view = the white
    canvas, object view = the object again (the innermost of two borders)."""
    art = _small_object_on_canvas("figure")
    padded = ImageOps.expand(art, border=(30, 40), fill=(0, 0, 0))
    a = dedup.parse_descriptor(image_hashes(art)[Col.DEDUP_DESCRIPTOR])
    b = dedup.parse_descriptor(image_hashes(padded)[Col.DEDUP_DESCRIPTOR])
    assert a.innermost == 1 and b.innermost == 2
    assert abs(int(a.aspects[1]) - int(b.aspects[2])) <= 6  # the box moves a little at lower resolution
    assert abs(int(a.aspects[0]) - int(b.aspects[1])) <= 3


def test_small_objects_on_like_canvases_are_told_apart_by_the_object_view():
    """Two small, different objects on the same large white canvas have near-identical full views;
    the object view rejects them, also for their padded copies, while real copies still verify."""
    figure, lips = _small_object_on_canvas("figure"), _small_object_on_canvas("lips")
    pad = lambda im: ImageOps.expand(im, border=(30, 40), fill=(0, 0, 0))  # noqa: E731
    d = {name: image_hashes(im)[Col.DEDUP_DESCRIPTOR] for name, im in {
        "figure": figure, "lips": lips, "figure_pad": pad(figure), "lips_pad": pad(lips),
        "figure_jpeg": _jpeg_copy(figure.resize((300, 400)), 40),
        "figure_flip": figure.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
    }.items()}
    ok = lambda x, y: verify_pair((d[x], None), (d[y], None), True, 0.8, 0.9)  # noqa: E731
    full_a, full_b = dedup.parse_descriptor(d["figure"]), dedup.parse_descriptor(d["lips"])
    assert dedup.thumb_correlation(full_a.thumbs[0], full_b.thumbs[0]) > 0.5  # the canvases look alike
    assert not ok("figure", "lips") and not ok("figure_pad", "lips_pad") and not ok("figure_pad", "lips")
    assert ok("figure", "figure_pad") and ok("figure", "figure_jpeg") and ok("figure", "figure_flip")
    assert ok("figure_pad", "figure_jpeg")
    records = _fetched_all({
        "figure": figure, "lips": lips, "figure_pad": pad(figure), "lips_pad": pad(lips),
        "figure_jpeg": _jpeg_copy(figure.resize((300, 400)), 40),
    })
    expected = [drop("figure", "figure_pad", NEAR), drop("figure_jpeg", "figure_pad", NEAR), drop("lips", "lips_pad", NEAR)]
    assert_dedup_decisions(records, expected)


def test_old_descriptor_versions_fall_back_to_the_hash_columns():
    features = image_hashes(natural_image(5))
    old = bytes((2,)) + features[Col.DEDUP_DESCRIPTOR][1:]
    assert dedup.parse_descriptor(old) is None
    variants = dedup.hash_variants({**features, Col.DEDUP_DESCRIPTOR: old})
    assert variants[0] == (0, int(features[Col.PHASH], 16))


def _pale_edged_art(shape: str) -> Image.Image:
    """Clip art on white whose object has wide pale edges (a light halo around a dark figure):
    brightening by 25 % clips the halo to white, so the object box of the copy shrinks."""
    image = Image.new("RGB", (400, 400), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    draw.ellipse((40, 40, 360, 360), fill=(222, 226, 230))  # pale halo: becomes white when brightened
    draw.ellipse((80, 80, 320, 320), fill=(150, 160, 175))
    if shape == "triangle":
        draw.polygon([(200, 110), (300, 290), (100, 290)], fill=(20, 20, 20))
        draw.rectangle((185, 180, 215, 260), fill=(240, 200, 0))
    else:
        draw.rectangle((120, 150, 280, 250), fill=(20, 20, 20))
        draw.ellipse((170, 170, 230, 230), fill=(240, 200, 0))
    return image


def test_brightened_copy_of_a_pale_picture_is_still_found():
    """+25 % brightness turns the pale halo into background: the copy's object box lies inside the
    original's and is smaller. It still verifies (as do its JPEG and padded copies), while another
    figure in the same halo is kept apart."""
    art = _pale_edged_art("triangle")
    bright = ImageEnhance.Brightness(art).enhance(1.25)
    a = dedup.parse_descriptor(image_hashes(art)[Col.DEDUP_DESCRIPTOR])
    b = dedup.parse_descriptor(image_hashes(bright)[Col.DEDUP_DESCRIPTOR])
    box_a, box_b = dedup._inner_box(a, 0), dedup._inner_box(b, 0)
    assert box_b[2] - box_b[0] < 0.9 * (box_a[2] - box_a[0])  # the copy's object shrank
    assert hamming(a.hashes[0][0], b.hashes[0][0]) <= 8
    feats = {
        "art": image_hashes(art), "bright": image_hashes(bright),
        "bright_jpeg": image_hashes(_jpeg_copy(bright, 40)),
        "other": image_hashes(_pale_edged_art("box")),
        "other_bright": image_hashes(ImageEnhance.Brightness(_pale_edged_art("box")).enhance(1.25)),
    }
    ok = lambda x, y: verify_pair((feats[x][Col.DEDUP_DESCRIPTOR], None), (feats[y][Col.DEDUP_DESCRIPTOR], None), True, 0.8, 0.9)  # noqa: E731
    assert ok("art", "bright") and ok("bright", "art") and ok("art", "bright_jpeg")
    assert dedup._shrunken_object(a, 0, b, 0, False)  # what lets the objects agree
    for x, y in (("art", "other"), ("art", "other_bright"), ("bright", "other"), ("bright", "other_bright")):
        assert not ok(x, y), (x, y)


def _pale_photo(seed: int) -> Image.Image:
    """A photo-like image in light tones only (grey levels 120-255)."""
    pixels = np.asarray(natural_image(seed), dtype=np.float64)
    return Image.fromarray((120 + pixels * (135 / 255)).astype(np.uint8))


def test_brightened_copy_of_a_pale_photo_is_found_by_the_brightened_hash():
    """+25 % brightness clips much of a pale photo to white: its robust hash moves further than the
    radius (the log takes a gain out, not the clipping), but lands on the original's brightened
    hash. The copy (and a JPEG of it) is a band candidate, verifies and joins the original's
    cluster; another pale photo and its brightened copy stay apart."""
    photo, other = _pale_photo(2), _pale_photo(7)
    bright = ImageEnhance.Brightness(photo).enhance(1.25)
    fa, fb = image_hashes(photo), image_hashes(bright)
    a, b = dedup.parse_descriptor(fa[Col.DEDUP_DESCRIPTOR]), dedup.parse_descriptor(fb[Col.DEDUP_DESCRIPTOR])
    assert hamming(a.hashes[0][0], b.hashes[0][0]) > 8  # the plain hashes alone: no candidate
    assert hamming(a.bright[0][0], b.hashes[0][0]) <= 2
    assert best_distance(fa, fb) <= 8
    assert verify_pair((fa[Col.DEDUP_DESCRIPTOR], None), (fb[Col.DEDUP_DESCRIPTOR], None), True, 0.8, 0.9)
    records = _fetched_all({
        "photo": photo.resize((640, 480)),
        "bright": bright,
        "bright_jpeg": _jpeg_copy(bright, 40),
        "other": other.resize((640, 480)),
        "other_bright": ImageEnhance.Brightness(other).enhance(1.25),
    })
    expected = [drop("bright", "photo", NEAR), drop("bright_jpeg", "photo", NEAR), drop("other_bright", "other", NEAR)]
    assert_dedup_decisions(records, expected)


def test_colour_distance_models_a_brightening_clipped_at_white():
    """Light blue stripes brightened by 25 % clip in the blue channel only (they turn cyan): no
    single gain fits all channels, the clipped brightening does."""
    flag = Image.new("RGB", (450, 300), (255, 255, 255))
    draw = ImageDraw.Draw(flag)
    draw.rectangle((0, 0, 450, 100), fill=(116, 172, 223))
    draw.rectangle((0, 200, 450, 300), fill=(116, 172, 223))
    draw.ellipse((200, 125, 250, 175), fill=(240, 190, 40))
    bright = ImageEnhance.Brightness(flag).enhance(1.25)
    a = dedup.parse_descriptor(image_hashes(flag)[Col.DEDUP_DESCRIPTOR])
    b = dedup.parse_descriptor(image_hashes(bright)[Col.DEDUP_DESCRIPTOR])
    assert dedup.colour_distance(a.thumbs[0], b.thumbs[0]) <= 4  # a linear fit alone: about 11
    assert dedup.colour_distance(b.thumbs[0], a.thumbs[0]) <= 4


def test_object_views_are_compared_level_by_level():
    """A framed picture on white (white -> frame -> inside): its JPEG copy may or may not trim the
    frame, and its black-padded copy has one more level outside. Views are matched by level (the
    padded copy's object view is the framed picture, not the inside of the frame), so all verify."""
    image = Image.new("RGB", (300, 300), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    draw.rectangle((30, 30, 270, 270), fill=(60, 60, 60))  # a thick uniform frame
    draw.rectangle((45, 45, 255, 255), fill=(170, 200, 230))
    draw.polygon([(150, 70), (235, 230), (65, 230)], fill=(200, 40, 40))
    draw.ellipse((120, 150, 180, 210), fill=(250, 250, 120))
    padded = ImageOps.expand(image, border=30, fill=(0, 0, 0))
    a = dedup.parse_descriptor(image_hashes(image)[Col.DEDUP_DESCRIPTOR])
    p = dedup.parse_descriptor(image_hashes(padded)[Col.DEDUP_DESCRIPTOR])
    assert p.hashes[2] is not None
    assert abs(int(p.aspects[2]) - int(a.aspects[1])) <= 3  # level 2 of the padded copy = level 1 here
    box = dedup._inner_box(p, 1)
    assert box[0] < 0.2 and box[2] > 0.8  # the framed picture, not the inside of the frame
    copies = [padded, _jpeg_copy(image, 30), _jpeg_copy(padded, 30)]
    d0 = image_hashes(image)[Col.DEDUP_DESCRIPTOR]
    for copy in copies:
        assert verify_pair((d0, None), (image_hashes(copy)[Col.DEDUP_DESCRIPTOR], None), True, 0.8, 0.9)


# ---------------------------------------------------------------------------------------------
# issue 21: look-alike distinct images (crops of one smooth photo), harder crops and pads
# ---------------------------------------------------------------------------------------------


def _smooth_scene(size=(1200, 900)) -> Image.Image:
    """A wallpaper-like picture: a smooth sky-like gradient with faint, large-scale texture."""
    rng = np.random.default_rng(21)
    w, h = size
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    img = np.zeros((h, w, 3))
    for c, (top, bottom) in enumerate(((60, 200), (110, 220), (190, 250))):
        img[..., c] = top + (bottom - top) * y / y.max()
    coarse = rng.normal(0, 1, (h // 150 + 2, w // 150 + 2))
    field = np.asarray(Image.fromarray(((coarse + 4) * 30).clip(0, 255).astype(np.uint8)).resize((w, h), Image.Resampling.BICUBIC), np.float64)
    img += (field - field.mean())[..., None] * 0.35
    img += rng.normal(0, 2, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _ok(x: Image.Image, y: Image.Image) -> bool:
    return verify_pair((image_hashes(x)[Col.DEDUP_DESCRIPTOR], None), (image_hashes(y)[Col.DEDUP_DESCRIPTOR], None),
                       True, 0.8, 0.9)


def test_distinct_crops_of_one_smooth_picture_are_not_merged():
    """Tiles of one smooth picture share style and colours but not content: none may verify with
    another (the old descriptor merged neighbouring tiles of a gradient sky)."""
    scene = _smooth_scene()
    tiles = [scene.crop((c * 300, r * 300, (c + 1) * 300, (r + 1) * 300)) for r in range(3) for c in range(4)]
    merged = [(i, j) for i in range(len(tiles)) for j in range(i + 1, len(tiles)) if _ok(tiles[i], tiles[j])]
    # main's descriptor merged most neighbouring tiles; one mirrored neighbour pair of this
    # left-right symmetric sky (tiles 10 and 11) still passes (known limit, issue 21)
    assert set(merged) <= {(10, 11)}
    assert _ok(tiles[5], _jpeg_copy(tiles[5], 40))  # a copy of one tile still is one


def test_a_copy_cropped_by_5_percent_of_each_side_is_merged():
    photo = natural_image(11, size=(480, 360))
    w, h = photo.size
    cropped = photo.crop((round(0.05 * w), round(0.05 * h), w - round(0.05 * w), h - round(0.05 * h)))
    assert _ok(photo, cropped) and _ok(cropped, photo)
    features = image_hashes(cropped)
    original = dedup.parse_descriptor(image_hashes(photo)[Col.DEDUP_DESCRIPTOR])
    # a band candidate through the centre view's hash (variant 5)
    assert hamming(original.hashes[dedup.CENTRE][0], dedup.parse_descriptor(features[Col.DEDUP_DESCRIPTOR]).hashes[0][0]) <= 8
    assert 5 in dict(dedup.hash_variants({**image_hashes(photo)}))


def test_a_white_padded_copy_of_clip_art_on_white_is_merged():
    """Clip art on white padded with 10 % white on each side: only the trimmed views (the same
    background trimmed off both) show the same thing; another object stays apart."""
    def tight(shape):  # the object with a white margin of 12 % of its size on each side
        art = _small_object_on_canvas(shape)
        left, top, right, bottom = ImageOps.invert(art).getbbox()
        mx, my = (right - left) * 12 // 100, (bottom - top) * 12 // 100
        return art.crop((left - mx, top - my, right + mx, bottom + my))

    art = tight("figure")
    w, h = art.size
    padded = ImageOps.expand(art, border=(w // 10, h // 10), fill=(255, 255, 255))
    assert _ok(art, padded) and _ok(padded, art)
    assert _ok(art, ImageOps.expand(art, border=(w // 10, h // 10), fill=(0, 0, 0)))
    assert not _ok(padded, tight("lips")) and not _ok(art, tight("lips"))


def test_a_white_padded_photo_is_merged():
    photo = natural_image(12, size=(400, 300))
    assert _ok(photo, ImageOps.expand(photo, border=(40, 30), fill=(255, 255, 255)))


def test_grouped_near_dedup_finds_what_the_global_search_finds():
    """Above dedup_exact_max near-duplicates are looked for inside each sample's home group (CLIP
    cosine candidates, then the same verification): on a set whose copies sit next to their
    originals in CLIP space, the grouped path drops exactly what the global one drops, with
    every sample also spilled to other groups (probe 3) as a candidate for negatives."""
    rng = np.random.default_rng(4)
    centres = rng.normal(size=(12, 32))
    records, planted = [], []
    for i in range(72):
        image = natural_image(300 + i, size=(96, 72))
        embedding = centres[i % 12] + 0.5 * rng.normal(size=32)
        records.append(record(f"o{i:03d}", image, size=(96, 72), embedding=(embedding / np.linalg.norm(embedding)).tolist()))
        if i % 6 == 0:  # a recompressed, slightly smaller copy with an embedding at cosine ~0.99
            buffer = io.BytesIO()
            image.resize((80, 60)).save(buffer, format="JPEG", quality=40)
            near = embedding + 0.05 * rng.normal(size=32)
            records.append(record(f"c{i:03d}", Image.open(buffer).convert("RGB"), size=(80, 60),
                                  embedding=(near / np.linalg.norm(near)).tolist()))
            planted.append(drop(f"c{i:03d}", f"o{i:03d}", NEAR))
    grouped = {"dedup_exact_max": 20, "negatives_exact_max": 20, "negatives_group_size": 12, "negatives_probe": 3,
               "decide_partition_rows": 1000, "negatives_sample": 200}
    decide(records, planted)
    counters = decide(records, planted, **grouped)
    assert counters["candidate_edges"] >= len(planted)


def test_grouped_near_dedup_meets_a_copy_across_a_group_border():
    """A copy whose embedding fell in the neighbouring group (its home) is met through the
    original's second group: the pair is a candidate although the two homes differ."""
    import pyarrow as pa

    from pipeline import decide
    from pipeline.config import CurateConfig
    from transforms import batch as cols

    rng = np.random.default_rng(1)
    vector = rng.normal(size=16)
    near = vector + 0.01 * rng.normal(size=16)
    other = rng.normal(size=16)
    units = np.stack([v / np.linalg.norm(v) for v in (vector, near, other)]).astype(np.float16)
    hashes = np.array([[7] * dedup.VARIANTS, [7] * dedup.VARIANTS, [2**40] * dedup.VARIANTS], dtype=np.uint64)
    # rows: (uid, cell, rank); "a" lives in group 0 with a copy in group 1, "b" (its copy) and "c" in group 1
    spilled = [("a", 0, 0), ("a", 1, 1), ("b", 1, 0), ("c", 1, 0)]
    index = {"a": 0, "b": 1, "c": 2}
    picks = [index[uid] for uid, _, _ in spilled]
    table = pa.table({Col.UID: [u for u, _, _ in spilled], decide._CELL: pa.array([c for _, c, _ in spilled], pa.int32()),
                      decide._RANK: pa.array([r for _, _, r in spilled], pa.int8()),
                      decide._VECTOR: cols.vectors_array(units[picks], np.ones(len(picks), bool))})
    rows = decide._one_row_per_uid(table)
    step = decide._NearDedup(decide._settings(CurateConfig()))
    pairs = step._grouped_candidates(table, rows, hashes, np.ones_like(hashes, dtype=bool), units, np.ones(3, bool))
    assert pairs.tolist() == [[0, 1]]
    homes_only = table.filter(pa.compute.equal(table[decide._RANK], 0))
    assert step._grouped_candidates(homes_only, rows, hashes, np.ones_like(hashes, dtype=bool), units,
                                    np.ones(3, bool)).tolist() == []
