"""Exact and near-duplicate image detection.

Fetch phase: `image_hashes` turns one decoded image into three small columns:
  - PHASH: imagehash's 64-bit pHash (computed on a 128-px box-filtered copy, for speed),
  - PHASH_MIRROR: the pHash of the horizontally flipped image (so a flipped copy is found),
  - DEDUP_DESCRIPTOR (951 bytes, version 6): header (version, flags, aspect ratios), the boxes of
    the trimmed and object views in the full image, and for up to three views a robust hash pair
    (`_robust_hashes`: pHash's DCT bits on log grey, with a dead zone at the median, so symmetric
    pictures and brightness changes do not turn bits into noise), the same pair of the view
    brightened by 25 % (pale tones clipped to white, as a brighter copy shows them: the log takes
    out a gain, not the clipping) and an RGB thumbnail (6x6; 4x4 for the object). The views are
    levels: the full image (0); the trimmed view (1), the image with ONE uniform border removed
    (padding, letterboxing, or the flat background of clip art); the object view (2), one level
    further in, when a border of another colour lies inside the first (a padded clip art: black
    padding, then a white canvas, then the object); deeper borders (a frame inside the object) are
    not followed. Version 6 adds (issue 21) the border colours trimmed off to reach levels 1 and 2,
    a centre view (the trimmed view, else the full image, less 5 % of each side: what a cropped
    copy's full view shows) with its hashes and RGB thumbnail, and a fine 12x12 grey layout of the
    full, the trimmed and the centre view. Boxes are found on a <= 128-px rendering and each view is
    rendered again from the original (a small object keeps its detail); a view that is a solid
    block (a square on a flat background) is left out, since all solid blocks hash alike.
  Blank / near-uniform images get None everywhere: they all hash alike, the blank-image rule owns them.

Decide phase (features table only, never image bytes; pipeline/decide.py wires these functions):
  1. exact: group by sha256, keep the best sample per group (`quality_key`).
  2. near candidates, among the exact survivors. Up to `dedup_exact_max` samples, over all of them:
     each sample is searched under its hash variants (`hash_variants`: robust hash and mirror of
     the full and of the trimmed view and their brightened hashes from the descriptor, or the
     PHASH columns without one; repeats skipped); by the pigeonhole principle two hashes within
     Hamming distance r agree on one of r+1 bands, so the distinct values are searched band by
     band (`near_pairs`, oversize buckets split again on their remaining bits: exact, no
     truncation) and samples sharing a value are chained (`band_candidates`). Above it, inside
     each group of the CLIP image-embedding partitioning (transforms/neighbours.py): pairs whose
     image cosine reaches `dedup_min_embedding_cosine` (verification requires it anyway) and whose
     hash variants are within r (`cosine_candidates`); a pair split across groups is missed, which
     is what makes this path approximate (its recall is measured in benchmarks/scale.py).
  3. verify (`verify_pair`): every second look both ends have must agree: the descriptors
     must match on one pair of views (full/full, full/trimmed, trimmed/full, full/centre,
     centre/full, trimmed/trimmed; when one background colour was trimmed off both, every pair
     other than full/full and trimmed/trimmed also needs the trimmed views to agree; object/trimmed
     when the background under one object is the other's outer one, with closer hashes and
     thumbnails) in one orientation, with the aspect ratio, the robust-hash distance (<= r; the darker
     view's brightened hash may stand in for its hash), the thumbnail layout (correlation) and the
     thumbnail colour after a global brightness/contrast fit (or a brightening clipped at white)
     and the fine 12x12 layouts (correlation; when either view is low-texture, i.e. near a plane:
     smooth gradients, sky, faint line art, a higher correlation and thumbnails close as they are)
     all agreeing; when both images have views further in than the matched ones, those must agree
     too, level by level (a small object barely shows in a large canvas's full view): the view one
     level in on each side (and, for full/full, the next one as well). A brightened copy whose
     object box is the other's with pale edges clipped to white (inside it, 40-95 % of its area,
     and brighter) agrees loosely (`_shrunken_object`). The embeddings, when both exist, must be
     close too.
  4. clusters: connected components over all verified pairs (`components`); each component is
     then resolved with its members' payloads so that every dropped member is verified against its
     own survivor (a direct verified edge, or `verify_pair` again), never only against a
     neighbour: chains cannot walk from one picture to another (`resolve_cluster`). One survivor
     per cluster by `quality_key`; duplicate_of is always a survivor.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

import imagehash
import numpy as np
import scipy.fft
from PIL import Image

from schemas import Col

NAMESPACE = "dedup"
DESCRIPTOR_SIDE = 6
OBJECT_SIDE = 4
_THUMB_BYTES = DESCRIPTOR_SIDE * DESCRIPTOR_SIDE * 3
_OBJECT_THUMB_BYTES = OBJECT_SIDE * OBJECT_SIDE * 3
_HEADER_BYTES = 5  # version, flags, aspect of the full, the trimmed and the object view
_BOXES_OFFSET = _HEADER_BYTES  # box of the trimmed and of the object view in the full image (2 x 4)
_HASHES_OFFSET = _BOXES_OFFSET + 8
_VIEW_HASH_BYTES = 32  # robust pHash, its mirror, the brightened robust pHash, its mirror
_THUMBS_OFFSET = _HASHES_OFFSET + 3 * _VIEW_HASH_BYTES
# descriptor = header (5) + boxes (8) + the four hashes of the full, trimmed and object view (3 x 32)
# + 6x6 RGB thumbnails of the full and the trimmed view (2 x 108) + 4x4 RGB thumbnail of the object
# view (48) = 373 bytes
_V5_BYTES = _THUMBS_OFFSET + 2 * _THUMB_BYTES + _OBJECT_THUMB_BYTES
# version 6 appends: the border colours trimmed off to reach the trimmed and the object view
# (2 x 3), the centre view's four hashes (32) and RGB thumbnail (108), and the fine grey layouts
# (12x12) of the full, the trimmed and the centre view (3 x 144)
LAYOUT_SIDE = 12
_LAYOUT_BYTES = LAYOUT_SIDE * LAYOUT_SIDE
_BORDERS_OFFSET = _V5_BYTES
_CENTRE_HASHES_OFFSET = _BORDERS_OFFSET + 6
_CENTRE_THUMB_OFFSET = _CENTRE_HASHES_OFFSET + _VIEW_HASH_BYTES
_LAYOUTS_OFFSET = _CENTRE_THUMB_OFFSET + _THUMB_BYTES
DESCRIPTOR_BYTES = _LAYOUTS_OFFSET + 3 * _LAYOUT_BYTES
DESCRIPTOR_VERSION = 6
CENTRE = 3  # index of the centre view: the full image less CENTRE_CROP of each side
CENTRE_CROP = 0.05
_HAS_TRIM = 1
_HAS_OBJECT = 2
_WORK_SIDE = 128  # images are box-reduced to at most this before anything else (speed)
_BORDER_TOL = 24  # max channel difference from the border colour that still counts as border
_BORDER_UNIFORM = 0.95  # share of border pixels that must match before a border is trimmed
_TRIM_MIN_STD = 8.0  # a trimmed image flatter than this (std, any channel) is a solid block: no trimmed view
_TRIM_STEPS = 4  # trimming rounds: each either tightens the current level or starts a new one
_ASPECT_SCALE = 32.0  # aspect ratios are stored as round(log2(w / h) * 32) + 128
# robust pHash: DCT coefficients this close to the median (share of the largest AC coefficient)
# are 0 bits: symmetric pictures have many (near-)zero coefficients whose pHash bits are noise
_DEAD_ZONE = 0.01
_LOG_OFFSET = 2.0  # the robust hash looks at log(grey + _LOG_OFFSET)
_MIRROR_SIGNS = np.tile((-1.0) ** np.arange(8), 8)  # a horizontal flip negates odd columns
_DCT_ROWS = scipy.fft.dct(np.eye(32), axis=0)[:8]  # the first 8 rows of scipy's 32-point DCT-II
# The brightened hash: the robust hash of the view as a brightness increase of this factor shows
# it, pale tones clipped to white. The log takes a gain out of the bits, not the clipping: a
# brighter copy of a pale picture moves 10-20 bits from its original's hash, but stays near its
# brightened hash (for gains of about 1.15 to 1.4, not only this one).
_BRIGHTEN = 1.25
_BRIGHTEN_TABLE = np.array([min(255, round(i * _BRIGHTEN)) for i in range(256)], dtype=np.uint8)


# ----------------------------------------------------------------------------------------------
# fetch phase: per-image hashes
# ----------------------------------------------------------------------------------------------


_LEVELS_INT16 = np.arange(256, dtype=np.int16)


def _content_box(small: np.ndarray) -> Optional[tuple[tuple[int, int, int, int], np.ndarray]]:
    """(bounding box (left, top, right, bottom) of what is not a uniform border, border colour), or None.

    A border is trimmed only when (nearly) all border pixels share one colour, so photos keep their
    frame while padding, letterboxing and the flat background of clip art go.
    """
    h, w, _ = small.shape
    border = np.concatenate([small[0], small[-1], small[:, 0], small[:, -1]]).astype(np.int16)
    ordered = np.sort(border, axis=0)  # the median per channel (np.median's, without its overhead)
    colour = (ordered[(len(ordered) - 1) // 2] + ordered[len(ordered) // 2]) / 2.0
    if np.mean(np.abs(border - colour).max(axis=1) <= _BORDER_TOL) < _BORDER_UNIFORM:
        return None
    # content: a pixel with a channel far from the border colour (the truncated median), looked
    # up per channel in a 256-level table instead of computed on an int16 copy of the image
    far = np.abs(_LEVELS_INT16[:, None] - colour.astype(np.int16)) > _BORDER_TOL  # (256 levels, 3 channels)
    content = far[small[..., 0], 0] | far[small[..., 1], 1] | far[small[..., 2], 2]
    # a row/column is content when more than a sliver of it differs (JPEG ringing is not content)
    rows = np.flatnonzero(content.sum(axis=1) > max(1, w // 100))
    cols = np.flatnonzero(content.sum(axis=0) > max(1, h // 100))
    if rows.size == 0 or cols.size == 0:
        return None
    # one pixel further in on trimmed sides: the downscaled edge blends border and content
    left, top, right, bottom = int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1
    box = (left + (left > 0), top + (top > 0), right - (right < w), bottom - (bottom < h))
    if box[2] - box[0] < 8 or box[3] - box[1] < 8 or box == (0, 0, w, h):
        return None
    return box, colour


def _aspect_byte(width: float, height: float) -> int:
    return int(min(255, max(0, round(math.log2(max(width, 1e-6) / max(height, 1e-6)) * _ASPECT_SCALE) + 128)))


def _hash_bytes(value) -> bytes:
    return int(str(value), 16).to_bytes(8, "big")


def _channel_std(image: Image.Image) -> np.ndarray:
    """Per-channel standard deviation of an image (from PIL's histograms: cheap)."""
    counts = np.asarray(image.histogram(), dtype=np.float64).reshape(-1, 256)
    n = counts.sum(axis=1)
    mean = counts @ _LEVELS / n
    return np.sqrt(np.maximum(counts @ (_LEVELS * _LEVELS) / n - mean * mean, 0.0))


_LEVELS = np.arange(256, dtype=np.float64)


def _render(image: Image.Image, box: tuple[float, float, float, float], side: int) -> Image.Image:
    """The `box` region (original coordinates) of `image`, box-reduced to at most `side` pixels."""
    w, h = box[2] - box[0], box[3] - box[1]
    scale = min(1.0, side / max(w, h))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return image.resize(size, Image.Resampling.BOX, box=box)


def _trim(image: Image.Image, view: Image.Image, region: tuple, floor: float):
    """One uniform border off `view` (the rendering of `region` of `image`): (view, region, border
    colour, the view's channel std) of what is inside it, rendered again from the original, or
    None (no uniform border, or what is inside is a solid block)."""
    found = _content_box(np.asarray(view))
    if found is None:
        return None
    box, colour = found
    sx, sy = (region[2] - region[0]) / view.width, (region[3] - region[1]) / view.height
    inner = (region[0] + box[0] * sx, region[1] + box[1] * sy, region[0] + box[2] * sx, region[1] + box[3] * sy)
    rendered = _render(image, inner, _WORK_SIDE)
    # per channel: a red cross on teal is flat in grey (equal channel means) but not flat
    channel_std = _channel_std(rendered)
    if float(channel_std.max()) < floor:
        return None  # a solid block (a square on a flat background): hashes alike, says nothing
    return rendered, inner, colour, channel_std


def image_hashes(image: Image.Image, blank_std_threshold: float = 3.0) -> dict:
    """pHash, mirror pHash and verification descriptor of one decoded image (any size).

    Returns None for all three on blank / near-uniform images (std below the threshold in every channel).
    """
    if image.mode != "RGB":
        image = image.convert("RGB")
    # Every image is brought to the same working size first (box filter down: cheap, alias-free;
    # bilinear up), so trimming sees a resized copy exactly as it sees the original.
    scale = _WORK_SIDE / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    small = image.resize(size, Image.Resampling.BOX if scale < 1 else Image.Resampling.BILINEAR)
    small_std = _channel_std(small)
    if float(small_std.max()) < blank_std_threshold:  # flat in every channel
        return {Col.PHASH: None, Col.PHASH_MIRROR: None, Col.DEDUP_DESCRIPTOR: None}
    # The trimmed view: one uniform border removed (padding, letterboxing, or the flat background
    # of clip art), rendered again from the original. The object view: every further uniform
    # border removed too (up to two more), so that a padded copy of a clip art and the clip art
    # itself show the same object, and two objects on a like background are told apart.
    floor = max(blank_std_threshold, _TRIM_MIN_STD)
    full_region = (0.0, 0.0, float(image.width), float(image.height))
    views = [(small, full_region)]
    view_stds = [small_std]  # each view's channel std (`_hash_view` looks at it again)
    borders = []
    border = None
    for _ in range(_TRIM_STEPS):
        inner = _trim(image, *views[-1], floor)
        if inner is None:
            break
        view, region, colour, channel_std = inner
        if border is not None and float(np.abs(colour - border).max()) <= _BORDER_TOL:
            views[-1] = (view, region)  # the same border again, seen finer: a tighter box, same level
            view_stds[-1] = channel_std
        elif len(views) < 3:
            views.append((view, region))  # a border of another colour: one level further in
            view_stds.append(channel_std)
            borders.append(colour)
        else:
            break  # a third border (a frame inside the object): levels are matched, not the innermost
        border = colour
    hash_views = {0: _hash_view(small, small_std)}
    thumb, brightened = _grey_thumbs(hash_views[0])
    # imagehash's pHash of the 32x32 thumbnail (it skips its resize at that size)
    grey, grey_mirror = imagehash.phash(thumb), imagehash.phash(thumb.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    flags = 0
    aspects = [_aspect_byte(image.width, image.height), 128, 128]
    hashes = [_robust_hashes(thumb, brightened), (0, 0, 0, 0), (0, 0, 0, 0)]
    thumbs = [_thumb(small, DESCRIPTOR_SIDE), bytes(_THUMB_BYTES), bytes(_OBJECT_THUMB_BYTES)]
    boxes = [bytes(4), bytes(4)]
    # the trimmed view (level 1) and the object view (level 2), when the image has them
    for level, (flag, thumb_side) in enumerate(((_HAS_TRIM, DESCRIPTOR_SIDE), (_HAS_OBJECT, OBJECT_SIDE)), start=1):
        if len(views) <= level:
            break
        flags |= flag
        view, region = views[level]
        aspects[level] = _aspect_byte(region[2] - region[0], region[3] - region[1])
        hash_views[level] = _hash_view(view, view_stds[level])
        hashes[level] = _robust_hashes(*_grey_thumbs(hash_views[level]))
        thumbs[level] = _thumb(view, thumb_side)
        boxes[level - 1] = _box_bytes(region, image.size)
    # the centre view: the trimmed view (else the full image) less CENTRE_CROP of each side: a
    # cropped copy's full view (also of a padded original, whose trimmed view is the picture)
    base = views[1][0] if len(views) > 1 else small
    dx, dy = round(base.width * CENTRE_CROP), round(base.height * CENTRE_CROP)
    centre = base.crop((dx, dy, base.width - dx, base.height - dy))
    hash_views[CENTRE] = _hash_view(centre)
    centre_hashes = _robust_hashes(*_grey_thumbs(hash_views[CENTRE]))
    layouts = [_layout(hash_views[0]), _layout(hash_views[1]) if 1 in hash_views else bytes(_LAYOUT_BYTES),
               _layout(hash_views[CENTRE])]
    colours = b"".join(bytes(int(round(c)) for c in (borders[i] if i < len(borders) else (0, 0, 0))) for i in range(2))
    descriptor = (
        bytes((DESCRIPTOR_VERSION, flags, *aspects))
        + b"".join(boxes)
        + b"".join(b"".join(h.to_bytes(8, "big") for h in view) for view in hashes)
        + b"".join(thumbs)
        + colours
        + b"".join(h.to_bytes(8, "big") for h in centre_hashes)
        + _thumb(centre, DESCRIPTOR_SIDE)
        + b"".join(layouts)
    )
    return {Col.PHASH: str(grey), Col.PHASH_MIRROR: str(grey_mirror), Col.DEDUP_DESCRIPTOR: descriptor}


def _box_bytes(region: tuple, size: tuple) -> bytes:
    """A view's box (left, top, right, bottom) as shares of the full image, 0-255 each."""
    w, h = size
    return bytes(min(255, max(0, round(255 * c / d))) for c, d in zip(region, (w, h, w, h)))


def _thumb(image: Image.Image, side: int) -> bytes:
    return image.resize((side, side), Image.Resampling.BOX).tobytes()


def _layout(hash_view: Image.Image) -> bytes:
    """The fine grey layout (LAYOUT_SIDE x LAYOUT_SIDE) of what the hash looks at (`_hash_view`)."""
    return hash_view.convert("L").resize((LAYOUT_SIDE, LAYOUT_SIDE), Image.Resampling.BOX).tobytes()


_GREY_CONTRAST_RATIO = 0.25
_EQUAL_GREY = (1 / 3, 1 / 3, 1 / 3, 0.0)


def _hash_view(image: Image.Image, channel_std: Optional[np.ndarray] = None) -> Image.Image:
    """What pHash looks at: grey levels, unless they hide the picture.

    pHash works on grey, so a red shape on a teal background (equal grey) hashes like a blank
    image. When grey contrast is far below the strongest channel's, that channel is hashed
    instead; edits that keep a picture a duplicate (resize, JPEG, brightness) keep the choice.
    `channel_std`: the image's `_channel_std`, when the caller has it.
    """
    channel_std = _channel_std(image) if channel_std is None else channel_std
    grey_std = float(_channel_std(image.convert("L", _EQUAL_GREY))[0])  # of (R + G + B) / 3
    if grey_std >= _GREY_CONTRAST_RATIO * float(channel_std.max()):
        return image
    return image.getchannel("RGB"[int(channel_std.argmax())])


def _grey_thumbs(image: Image.Image) -> tuple[Image.Image, Image.Image]:
    """The 32x32 grey thumbnail pHash looks at, and the same of the image brightened by
    `_BRIGHTEN` (clipped pixel by pixel before the reduction, as a brighter copy was)."""
    thumb = image.convert("L").resize((32, 32), Image.Resampling.LANCZOS)
    # the table by np.take: Image.point rounds a list table in Python on every call
    brightened = Image.fromarray(np.take(_BRIGHTEN_TABLE, np.asarray(image)), image.mode)
    brightened = brightened.convert("L").resize((32, 32), Image.Resampling.LANCZOS)
    return thumb, brightened


def _robust_hashes(thumb: Image.Image, brightened: Image.Image) -> tuple[int, int, int, int]:
    """(robust hash, robust mirror hash, the same two of the brightened thumbnail).

    The robust hash is what search and verification use: pHash's 8x8 low-frequency DCT
    coefficients against their median, but (1) computed on log(grey + 2): a brightness change
    multiplies grey levels, which only shifts their logarithm (the DC term, not the bits), and the
    log compresses the light tones that such a change clips to white, and (2) with a dead
    zone around the median (`_DEAD_ZONE`): coefficients near it are 0 bits, where pHash's bits
    would be noise (symmetric pictures have many zero coefficients). The mirror's coefficients
    are the same with odd columns negated, so no second DCT is needed. Both thumbnails are done in
    one vectorised pass (the 8x8 corner of the 2-D DCT as two small matrix products).
    """
    grey = np.log(np.stack([np.asarray(t, dtype=np.float64) for t in (thumb, brightened)]) + _LOG_OFFSET)
    coeffs = (_DCT_ROWS @ grey @ _DCT_ROWS.T).reshape(2, 1, 64)
    coeffs = np.concatenate([coeffs, coeffs * _MIRROR_SIGNS], axis=1).reshape(4, 64)
    ordered = np.sort(coeffs, axis=1)  # the median of 64 values: the mean of the middle two
    median = (ordered[:, 31:32] + ordered[:, 32:33]) / 2
    dead = _DEAD_ZONE * np.abs(coeffs[:, 1:]).max(axis=1, keepdims=True)
    rows = np.packbits(coeffs > median + dead, axis=1)
    return tuple(int.from_bytes(row.tobytes(), "big") for row in rows)


# ----------------------------------------------------------------------------------------------
# pure helpers of the decide phase
# ----------------------------------------------------------------------------------------------


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def band_masks(radius: int, bits: Sequence[int] = tuple(range(64))) -> list[int]:
    """Split `bits` (positions) into radius+1 contiguous bands, as integer masks.

    Pigeonhole: two hashes that differ in at most `radius` of these bits agree on at least one band.
    """
    count = radius + 1
    if count > len(bits):
        raise ValueError(f"cannot split {len(bits)} bits into {count} bands")
    masks = []
    for i in range(count):
        start, stop = (len(bits) * i) // count, (len(bits) * (i + 1)) // count
        masks.append(sum(1 << b for b in bits[start:stop]))
    return masks


def band_keys(value: int, masks: Sequence[int]) -> list[tuple[int, int]]:
    """(band index, value & mask) for every band: the GroupByKey keys of one hash."""
    return [(i, value & m) for i, m in enumerate(masks)]


def first_agreeing_band(a: int, b: int, masks: Sequence[int]) -> int:
    """Index of the first band on which a and b agree (len(masks) if none)."""
    diff = a ^ b
    for i, m in enumerate(masks):
        if diff & m == 0:
            return i
    return len(masks)


class BucketStats:
    """What `near_pairs` had to do, for the Beam counters."""

    def __init__(self):
        self.oversize = 0
        self.largest = 0
        self.comparisons = 0


def _brute_pairs(vals: np.ndarray, radius: int, stats: BucketStats, block: int = 1024) -> np.ndarray:
    """All (i, j), i < j, with popcount(vals[i] ^ vals[j]) <= radius; blockwise so memory stays small."""
    n = len(vals)
    out = []
    for start in range(0, n - 1, block):
        rows = vals[start : start + block]
        dist = np.bitwise_count(rows[:, None] ^ vals[None, :])
        stats.comparisons += dist.size
        i, j = np.nonzero(dist <= radius)
        i = i + start
        keep = j > i
        out.append(np.stack([i[keep], j[keep]], axis=1))
    return np.concatenate(out) if out else np.empty((0, 2), dtype=np.int64)


def near_pairs(
    vals: np.ndarray, radius: int, max_bucket: int, fixed_bits: int = 0, stats: Optional[BucketStats] = None
) -> np.ndarray:
    """Index pairs (i < j) of distinct uint64 `vals` within Hamming `radius`, without dropping any.

    Up to `max_bucket` values are compared all-pairs (vectorised). A larger set is counted as
    oversize and split again by pigeonhole on the bits its members do not already share
    (`fixed_bits`), recursively, so the work stays near-linear however skewed the hashes are.
    """
    stats = stats if stats is not None else BucketStats()
    n = len(vals)
    stats.largest = max(stats.largest, n)
    free = [b for b in range(64) if not (fixed_bits >> b) & 1]
    if n <= max_bucket or len(free) < radius + 1:
        return _brute_pairs(vals, radius, stats)
    stats.oversize += 1
    masks = band_masks(radius, free)
    found = []
    for k, mask in enumerate(masks):
        keys = vals & np.uint64(mask)
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
        ends = np.r_[starts[1:], n]
        for s, e in zip(starts, ends):
            if e - s < 2:
                continue
            idx = order[s:e]
            sub = near_pairs(vals[idx], radius, max_bucket, fixed_bits | mask, stats)
            if not len(sub):
                continue
            pairs = idx[sub]
            # report each pair from the first sub-band both agree on only
            diff = vals[pairs[:, 0]] ^ vals[pairs[:, 1]]
            earlier = np.zeros(len(pairs), dtype=bool)
            for prior in masks[:k]:
                earlier |= (diff & np.uint64(prior)) == 0
            found.append(pairs[~earlier])
    if not found:
        return np.empty((0, 2), dtype=np.int64)
    pairs = np.concatenate(found)
    return np.sort(pairs, axis=1)


def quality_key(record: dict) -> tuple:
    """Sort key, smallest = best: largest resolution, then highest clip score (present beats
    absent), then uid. Deterministic whatever the arrival order."""
    width = record.get(Col.ORIGINAL_WIDTH) or 0
    height = record.get(Col.ORIGINAL_HEIGHT) or 0
    clip = record.get(Col.CLIP_SCORE)
    clip_rank = (0, -float(clip)) if clip is not None and not math.isnan(clip) else (1, 0.0)
    return (-(int(width) * int(height)), clip_rank[0], clip_rank[1], str(record[Col.UID]))


class UnionFind:
    """Disjoint sets with path halving and union by size (nothing in numpy/imagehash does this)."""

    def __init__(self):
        self.parent: dict = {}
        self.size: dict = {}

    def find(self, x):
        parent = self.parent
        if x not in parent:
            parent[x] = x
            self.size[x] = 1
            return x
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(self, a, b) -> bool:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return False
        if self.size[ra] < self.size[rb]:
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.size[ra] += self.size[rb]
        return True

    def components(self) -> list[list]:
        groups: dict = {}
        for x in self.parent:
            groups.setdefault(self.find(x), []).append(x)
        return list(groups.values())


def clusters_from_edges(edges: Iterable[tuple], qualities: dict) -> list[tuple[str, list[str]]]:
    """Connected components of the edge set -> [(survivor uid, [dropped uids])], sorted.

    `qualities` maps uid -> quality_key; the survivor is the member with the smallest key.
    """
    uf = UnionFind()
    for a, b in edges:
        uf.union(a, b)
    result = []
    for members in uf.components():
        ordered = sorted(members, key=lambda u: qualities[u])
        result.append((ordered[0], sorted(ordered[1:])))
    return sorted(result)


def _hex_to_int(value) -> Optional[int]:
    if value is None or value == "":
        return None
    return int(value, 16)


class Descriptor:
    """The parsed DEDUP_DESCRIPTOR: per view (0 = full image, 1 = trimmed image, 2 = object: the
    view one level further in, when there is one; None where a view is absent) its aspect byte, its
    robust hash and robust mirror hash (`hashes`), the same two of the view brightened
    (`bright`), and its RGB thumbnail."""

    __slots__ = ("aspects", "boxes", "hashes", "bright", "thumbs", "borders", "layouts", "centre_level", "_textures")

    def __init__(self, data: bytes):
        present = (True, bool(data[1] & _HAS_TRIM), bool(data[1] & _HAS_OBJECT))
        # the centre view is cut from the trimmed view when there is one (its level), else the full
        self.centre_level = 1 if present[1] else 0
        self.aspects = [data[2 + v] if present[v] else None for v in range(3)] + [data[2 + self.centre_level]]
        self.boxes = [(0.0, 0.0, 1.0, 1.0)] + [
            tuple(c / 255.0 for c in data[_BOXES_OFFSET + 4 * (v - 1) : _BOXES_OFFSET + 4 * v]) if present[v] else None
            for v in (1, 2)
        ]
        words = [
            [int.from_bytes(data[o : o + 8], "big") for o in range(start, start + _VIEW_HASH_BYTES, 8)]
            for start in range(_HASHES_OFFSET, _THUMBS_OFFSET, _VIEW_HASH_BYTES)
        ]
        words.append([int.from_bytes(data[o : o + 8], "big") for o in range(_CENTRE_HASHES_OFFSET, _CENTRE_THUMB_OFFSET, 8)])
        present = (*present, True)
        self.hashes = [tuple(words[v][:2]) if present[v] else None for v in range(4)]
        self.bright = [tuple(words[v][2:]) if present[v] else None for v in range(4)]
        self.borders = [
            np.frombuffer(data, dtype=np.uint8, count=3, offset=_BORDERS_OFFSET + 3 * i).astype(np.float32) if present[i + 1] else None
            for i in range(2)
        ]
        layouts = [
            np.frombuffer(data, dtype=np.uint8, count=_LAYOUT_BYTES, offset=_LAYOUTS_OFFSET + _LAYOUT_BYTES * i)
            .reshape(LAYOUT_SIDE, LAYOUT_SIDE).astype(np.float32)
            for i in range(3)
        ]
        self.layouts = [layouts[0], layouts[1] if present[1] else None, None, layouts[2]]
        self._textures = [None] * 4  # `texture`, computed when a pair first needs it
        sides = (DESCRIPTOR_SIDE, DESCRIPTOR_SIDE, OBJECT_SIDE)
        offsets = (_THUMBS_OFFSET, _THUMBS_OFFSET + _THUMB_BYTES, _THUMBS_OFFSET + 2 * _THUMB_BYTES)
        self.thumbs = [
            np.frombuffer(data, dtype=np.uint8, count=sides[v] * sides[v] * 3, offset=offsets[v])
            .reshape(sides[v], sides[v], 3)
            .astype(np.float32)
            if present[v]
            else None
            for v in range(3)
        ] + [np.frombuffer(data, dtype=np.uint8, count=_THUMB_BYTES, offset=_CENTRE_THUMB_OFFSET)
             .reshape(DESCRIPTOR_SIDE, DESCRIPTOR_SIDE, 3).astype(np.float32)]

    def texture(self, view: int) -> float:
        """`_texture` of a view's fine layout, once per descriptor: verification asks it of the same
        view for every anchor and every candidate pair."""
        if self._textures[view] is None:
            self._textures[view] = _texture(self.layouts[view])
        return self._textures[view]

    @property
    def innermost(self) -> int:
        """Index of the innermost view: the object (2), the trimmed view (1) or the full image (0)."""
        return 2 if self.hashes[2] is not None else (1 if self.hashes[1] is not None else 0)


def parse_descriptor(data) -> Optional[Descriptor]:
    """The descriptor, or None when absent or of another layout (then only the hashes speak)."""
    if not data or len(data) != DESCRIPTOR_BYTES or data[0] != DESCRIPTOR_VERSION:
        return None
    return Descriptor(bytes(data))


_LUMA_WEIGHT = 0.3  # what a luminance residual costs next to a colour one (clipping leaves some)


def colour_distance(x: np.ndarray, y: np.ndarray) -> float:
    """How far two thumbnails (H x W x 3, 0-255) are apart once a global brightness/contrast change
    is taken out, mostly in colour: per cell, the worst channel's deviation from the cell's mean
    residual (grey -> beige, orange -> red) plus a little of that mean residual (what is left of a
    brightness change clipped at white), averaged over cells; the best of both fit directions, on
    the thumbnails as they are and with the darker one brightened first (`_brighten_darker`: a
    brightness increase clips each channel at white, which no single linear fit models)."""
    # the four fits at once (one row each: thumbnails are tiny, so numpy's per-call cost is most
    # of the work). Each fit has ONE gain and offset for all three channels, fitted on the cells
    # the target does not saturate: a global brightness or contrast change.
    xb, yb = _brighten_darker(x, y)
    sources = np.stack([x, y, xb, yb]).reshape(4, -1)
    targets = sources[[1, 0, 3, 2]]
    weight = ((targets > 2) & (targets < 253)).astype(sources.dtype)
    count = weight.sum(axis=1, keepdims=True)
    too_few = count[:, 0] < 8
    if too_few.any():
        weight[too_few] = 1
        count = weight.sum(axis=1, keepdims=True)
    mean_x = (weight * sources).sum(axis=1, keepdims=True) / count
    mean_y = (weight * targets).sum(axis=1, keepdims=True) / count
    dx = weight * (sources - mean_x)
    var = (dx * dx).sum(axis=1, keepdims=True) / count
    cov = (dx * (targets - mean_y)).sum(axis=1, keepdims=True) / count
    fitted = var > 1e-6
    gain = np.clip(np.where(fitted, cov / np.where(fitted, var, 1), 1), 0.5, 2.0)
    residual = (np.clip(gain * sources + (mean_y - gain * mean_x), 0, 255) - targets).reshape(4, -1, 3)
    luma = residual.mean(axis=2, keepdims=True)
    chroma = np.abs(residual - luma).max(axis=2)
    return float((chroma + _LUMA_WEIGHT * np.abs(luma[..., 0])).mean(axis=1).min())


def thumb_correlation(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation of two thumbnails: ignores a global brightness/contrast change, not a
    change of layout."""
    x = x.ravel() - x.mean()
    y = y.ravel() - y.mean()
    denom = float(np.sqrt((x * x).sum() * (y * y).sum()))
    if denom == 0.0:
        return 1.0 if not x.any() and not y.any() else 0.0
    return float((x * y).sum() / denom)


# stored aspect bytes may differ by this much (log2 * 32: 3 = 7 %); a 90-degree turn of a
# non-square image swaps its aspect and fails here
_ASPECT_TOLERANCE = 3
# the pairs of views that may show one picture: full/full, full/trimmed both ways (a padded
# copy's trimmed view is the original's full view), trimmed/trimmed only when the same background
# colour was trimmed off both (a clip art padded or cropped in its own background: two objects
# cut from different backgrounds look alike), and full/centre both ways (a cropped copy's full
# view is the original's centre view)
_ANCHORS = ((0, 0), (0, 1), (1, 0), (0, 3), (3, 0))
_SAME_BORDER_ANCHORS = ((1, 1), (0, 0), (0, 1), (1, 0), (0, 3), (3, 0))
# when both images have a view further in (an object on a flat background) than the views that
# matched, the objects must agree too, loosely (the box moves a little with JPEG and brightness):
_OBJECT_ASPECT_TOLERANCE = 12  # 30 %
_OBJECT_DISTANCE_FACTOR = 2.0  # colour distance of the object thumbnails, times max_distance
# robust-hash distance of the objects, times the radius: up to the first factor alone, up to the
# second with correlated thumbnails (objects are small: their hash moves more than the full view's)
_OBJECT_RADIUS_FACTOR = 1.5
_OBJECT_LOOSE_RADIUS_FACTOR = 3.0
_OBJECT_MIN_CORRELATION = 0.5
# ... and when they agree strictly (hash within the radius too), the matched views may be this much
# further apart (times the radius): two views agreeing are stronger evidence than one
_TWO_VIEW_RADIUS_FACTOR = 1.75


def _object_agreement(
    a: Descriptor, va: int, b: Descriptor, vb: int, flipped: bool, radius: int, max_distance: float, shrink: bool = True
) -> int:
    """How the views one level further in than the matched views (va of a, vb of b) agree: 2
    strictly, 1 loosely, 0 not at all. Levels, not innermost views, are compared: a copy may lose
    or gain a level (JPEG ringing on a thin frame, padding adds one outside)."""
    agreement = _level_agreement(a, va, b, vb, flipped, radius, max_distance)
    if agreement == 0 and shrink and _shrunken_object(a, va, b, vb, flipped):
        return 1
    return agreement


def _level_agreement(a: Descriptor, va: int, b: Descriptor, vb: int, flipped: bool, radius: int, max_distance: float) -> int:
    oa, ob = va + 1, vb + 1
    if abs(int(a.aspects[oa]) - int(b.aspects[ob])) > _OBJECT_ASPECT_TOLERANCE:
        return 0
    distance = _view_distance(a, oa, b, ob, flipped)[0]
    if distance > _OBJECT_LOOSE_RADIUS_FACTOR * radius:
        return 0
    x, y = _thumb_pair(a, oa, b, ob, flipped)
    colour = colour_distance(x, y)
    if colour > _OBJECT_DISTANCE_FACTOR * max_distance:
        return 0
    if distance > _OBJECT_RADIUS_FACTOR * radius and thumb_correlation(x, y) < _OBJECT_MIN_CORRELATION:
        return 0
    strict = distance <= radius and colour <= max_distance
    return 2 if strict else 1


def _view_distance(a: Descriptor, va: int, b: Descriptor, vb: int, flipped: bool) -> tuple[int, bool]:
    """(robust-hash distance of view va of a and view vb of b (b mirrored when `flipped`), whether
    the brightened hash gave it). The darker view's brightened hash stands in for its hash when
    that is closer: a brighter copy has lost the pale tones the brightened hash has lost too."""
    f = int(flipped)
    plain = hamming(a.hashes[va][0], b.hashes[vb][f])
    if a.thumbs[va].mean() < b.thumbs[vb].mean():
        brightened = hamming(a.bright[va][0], b.hashes[vb][f])
    else:
        brightened = hamming(a.hashes[va][0], b.bright[vb][f])
    return min(plain, brightened), brightened < plain


def _brighten_darker(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two thumbnails with the darker one brightened as the brightened hash is (`_BRIGHTEN`,
    clipped at white per channel): what a brighter copy of it would show."""
    if x.mean() < y.mean():
        return np.minimum(255.0, x * _BRIGHTEN), y
    return x, np.minimum(255.0, y * _BRIGHTEN)


def _inner_box(d: Descriptor, v: int, flipped: bool = False) -> tuple:
    """Box of view v + 1 as shares of view v (mirrored when `flipped`)."""
    (ol, ot, orr, ob), (il, it, ir, ib) = d.boxes[v], d.boxes[v + 1]
    w, h = max(orr - ol, 1e-6), max(ob - ot, 1e-6)
    box = ((il - ol) / w, (it - ot) / h, (ir - ol) / w, (ib - ot) / h)
    return (1.0 - box[2], box[1], 1.0 - box[0], box[3]) if flipped else box


def _shrunken_object(a: Descriptor, va: int, b: Descriptor, vb: int, flipped: bool) -> bool:
    """Whether one object view is the other's with pale edges gone: a brightness increase clips
    pale tones to the (white) background, so the brighter copy's box lies inside the other's and is
    smaller. The matched views carry the comparison of content."""
    box_a, box_b = _inner_box(a, va), _inner_box(b, vb, flipped)
    lift = float(a.thumbs[va].mean() - b.thumbs[vb].mean())
    if lift < 0:
        box_a, box_b, lift = box_b, box_a, -lift
    # a (brighter) must show a box inside b's, and smaller
    if lift < _SHRINK_MIN_LIFT:
        return False
    tol = _SHRINK_BOX_TOLERANCE
    inside = box_a[0] >= box_b[0] - tol and box_a[1] >= box_b[1] - tol and box_a[2] <= box_b[2] + tol and box_a[3] <= box_b[3] + tol
    area_a = (box_a[2] - box_a[0]) * (box_a[3] - box_a[1])
    area_b = (box_b[2] - box_b[0]) * (box_b[3] - box_b[1])
    return inside and _SHRINK_AREA[0] * area_b <= area_a <= _SHRINK_AREA[1] * area_b


_SHRINK_MIN_LIFT = 4.0
_SHRINK_BOX_TOLERANCE = 0.03
_SHRINK_AREA = (0.4, 0.95)


def _thumb_pair(a: Descriptor, va: int, b: Descriptor, vb: int, flipped: bool):
    x, y = a.thumbs[va], b.thumbs[vb]
    if x.shape != y.shape:  # the object thumbnail is smaller: compare at its size
        side = min(x.shape[0], y.shape[0])
        x, y = _shrink(x, side), _shrink(y, side)
    return x, (y[:, ::-1] if flipped else y)


def _shrink(thumb: np.ndarray, side: int) -> np.ndarray:
    if thumb.shape[0] == side:
        return thumb
    image = Image.fromarray(thumb.astype(np.uint8)).resize((side, side), Image.Resampling.BOX)
    return np.asarray(image, dtype=np.float32)


def descriptor_match(
    a: Descriptor,
    b: Descriptor,
    radius: int,
    max_distance: float,
    min_similarity: float,
    mirror: bool = True,
) -> bool:
    """Two descriptors show one picture when, for one pair of views (`_ANCHORS`) in one
    orientation (b mirrored when `mirror`), the aspect ratios agree, the robust hashes are within
    `radius`, the thumbnails agree in layout (correlation) and in colour (`colour_distance`), and
    the fine grey layouts agree (`_MIN_LAYOUT_CORRELATION`; low-texture views, which all look
    alike at low resolution, more strictly: `_low_texture`). When both images also have views
    further in (an object on a flat background) than the matched views, the objects must agree
    too (`_object_agreement`): a small object on a large canvas barely shows in the full view, so
    this is what tells two clip arts apart."""
    two_view_radius = int(radius * _TWO_VIEW_RADIUS_FACTOR)
    # one background colour trimmed off both: the objects are what is compared (a full view
    # showing one object and its margin can look like the other's object alone, when the objects
    # differ only in size, say); else trimmed/trimmed never: objects cut from different
    # backgrounds look alike
    same_border = _same_border(a, b)
    for flipped in (False, True) if mirror else (False,):
        trimmed_agree = None
        for va, vb in (_SAME_BORDER_ANCHORS if same_border else _ANCHORS + ((1, 1),)) + _object_anchors(a, b):
            if a.hashes[va] is None or b.hashes[vb] is None:
                continue
            if va == vb == 1 and not _same_centre(a, b, flipped):
                continue  # the objects alone: they must sit alike (padding and even crops keep the centre)
            if same_border and (va, vb) not in ((0, 0), (1, 1)):
                if trimmed_agree is None:
                    trimmed_agree = _level_agreement(a, 0, b, 0, flipped, radius, max_distance) > 0
                if not trimmed_agree:
                    continue
            if abs(int(a.aspects[va]) - int(b.aspects[vb])) > _ASPECT_TOLERANCE:
                continue
            distance, brightened = _view_distance(a, va, b, vb, flipped)
            if distance > two_view_radius:
                continue
            la = a.centre_level if va == CENTRE else va  # the levels the views are at
            lb = b.centre_level if vb == CENTRE else vb
            check_objects = a.hashes[la + 1] is not None and b.hashes[lb + 1] is not None if la < 2 and lb < 2 else False
            objects = 0
            if check_objects:
                objects = _object_agreement(a, la, b, lb, flipped, radius, max_distance)
                if objects and la == lb == 0 and a.hashes[2] is not None and b.hashes[2] is not None:
                    objects = min(objects, _object_agreement(a, 1, b, 1, flipped, radius, max_distance, False))
            if distance > (two_view_radius if check_objects and objects == 2 else radius):
                continue
            x, y = _thumb_pair(a, va, b, vb, flipped)
            correlation, colour = thumb_correlation(x, y), colour_distance(x, y)
            if brightened and correlation < min_similarity:
                # the hashes say one is a brightened copy: clipping to white changed its layout too
                correlation = max(correlation, thumb_correlation(*_brighten_darker(x, y)))
            if correlation < min_similarity or colour > max_distance:
                continue
            if check_objects and not objects:
                continue
            if 2 in (va, vb) and (distance > radius * _OBJECT_ANCHOR_RADIUS or correlation < _OBJECT_ANCHOR_CORRELATION):
                continue  # objects alone (no fine layout, a 4x4 thumbnail): closer hashes and layout
            if not _layouts_agree(a, va, b, vb, flipped, distance, radius):
                continue
            return True
    return False


def _object_anchors(a: Descriptor, b: Descriptor) -> tuple:
    """(1, 2) when the background trimmed off a's full view is the one trimmed off b's trimmed view
    (a clip art padded in white vs the same padded in black: white -> object, black -> white ->
    object), (2, 1) the other way round."""
    out = ()
    if _border_close(a.borders[0], b.borders[1]):
        out += ((1, 2),)
    if _border_close(a.borders[1], b.borders[0]):
        out += ((2, 1),)
    return out


def _border_close(x, y) -> bool:
    return x is not None and y is not None and float(np.abs(x - y).max()) <= _SAME_BORDER


def _same_centre(a: Descriptor, b: Descriptor, flipped: bool) -> bool:
    """Whether the trimmed views are centred alike in their full images (b mirrored when
    `flipped`): an even pad or crop keeps the centre, another object placed elsewhere need not."""
    x, y = a.boxes[1], b.boxes[1]
    cx, cy = (x[0] + x[2]) / 2, (x[1] + x[3]) / 2
    dx, dy = (y[0] + y[2]) / 2, (y[1] + y[3]) / 2
    return abs(cx - (1.0 - dx if flipped else dx)) <= _SAME_CENTRE_TOLERANCE and abs(cy - dy) <= _SAME_CENTRE_TOLERANCE


def _same_border(a: Descriptor, b: Descriptor) -> bool:
    return _border_close(a.borders[0], b.borders[0])


def _texture(layout: np.ndarray) -> float:
    """How much a fine layout varies beyond its plane fit (smooth gradients, sky: little)."""
    n = layout.shape[0]
    y, x = np.mgrid[0:n, 0:n]
    design = np.stack([np.ones(n * n), x.ravel(), y.ravel()], axis=1)
    coef, *_ = np.linalg.lstsq(design, layout.ravel(), rcond=None)
    return float((layout.ravel() - design @ coef).std())


def _layout_correlation(a: Descriptor, va: int, b: Descriptor, vb: int, flipped: bool) -> Optional[float]:
    x, y = a.layouts[va], b.layouts[vb]
    if x is None or y is None:
        return None
    y = y[:, ::-1] if flipped else y
    return max(thumb_correlation(x, y), thumb_correlation(*_brighten_darker(x, y)))


def _layouts_agree(a, va, b, vb, flipped, distance, radius) -> bool:
    correlation = _layout_correlation(a, va, b, vb, flipped)
    if correlation is None:
        return True
    if correlation < _MIN_LAYOUT_CORRELATION:
        return False
    if min(a.texture(va), b.texture(vb)) < _LOW_TEXTURE:
        return (correlation >= _LOW_TEXTURE_CORRELATION and distance <= radius * _LOW_TEXTURE_RADIUS
                and _raw_difference(a, va, b, vb, flipped) <= _LOW_TEXTURE_DIFFERENCE)
    return True


def _raw_difference(a: Descriptor, va: int, b: Descriptor, vb: int, flipped: bool) -> float:
    """Mean absolute difference of two thumbnails as they are (no brightness/contrast fit), or with
    the darker brightened as a brighter copy would be: what tells two flat pictures apart."""
    x, y = _thumb_pair(a, va, b, vb, flipped)
    return min(float(np.abs(x - y).mean()), float(np.abs(np.subtract(*_brighten_darker(x, y))).mean()))


# Thresholds below were chosen on the tune half of benchmarks/dedup.py (pair-level precision /
# recall per copy kind over the candidate pairs; benchmarks/dedup_curves.py prints the curves).
# fine layouts (12x12 grey) of the matched views: smallest correlation
_MIN_LAYOUT_CORRELATION = 0.8
# a view whose fine layout departs from a plane by less than this (std, 0-255) is low-texture
# (smooth gradients, sky, water, faint line art): then the layouts must correlate more and the
# thumbnails must agree as they are (no brightness/contrast fit: two flat pictures differ in tone)
_LOW_TEXTURE = 25.0
_LOW_TEXTURE_CORRELATION = 0.93
_LOW_TEXTURE_RADIUS = 1.0
_LOW_TEXTURE_DIFFERENCE = 12.0
_SAME_BORDER = 12.0  # border colours (max channel difference) that count as one background
_SAME_CENTRE_TOLERANCE = 0.05  # trimmed views (centre, shares of the full image) that sit alike
# object/trimmed anchors (`_object_anchors`): no fine layout, a 4x4 thumbnail: the hashes must be
# within this share of the radius and the thumbnails correlate this much
_OBJECT_ANCHOR_RADIUS = 0.5
_OBJECT_ANCHOR_CORRELATION = 0.9


def embedding_cosine(a, b) -> float:
    x = np.asarray(a, dtype=np.float32)
    y = np.asarray(b, dtype=np.float32)
    denom = float(np.linalg.norm(x) * np.linalg.norm(y))
    return float(x @ y / denom) if denom else 0.0


def verify_pair(
    payload_a: tuple,
    payload_b: tuple,
    mirror: bool,
    min_similarity: float,
    min_cosine: float,
    max_distance: float = 16.0,
    radius: int = 8,
) -> bool:
    """A hash candidate is a duplicate when every second look both sides have agrees: the
    descriptors (`descriptor_match`) and the CLIP image embeddings (cosine). With neither (hash-only
    records) the hash match alone decides."""
    desc_a, emb_a = payload_a
    desc_b, emb_b = payload_b
    if emb_a is not None and emb_b is not None and embedding_cosine(emb_a, emb_b) < min_cosine:
        return False
    a = desc_a if isinstance(desc_a, Descriptor) else parse_descriptor(desc_a)
    b = desc_b if isinstance(desc_b, Descriptor) else parse_descriptor(desc_b)
    if a is not None and b is not None:
        return descriptor_match(a, b, radius, max_distance, min_similarity, mirror)
    return True


# ----------------------------------------------------------------------------------------------
# decide phase, columnar: which hashes are searched, candidates, verification, clusters
# (pure functions over a group's arrays; pipeline/decide.py wires them into Beam)
# ----------------------------------------------------------------------------------------------

VARIANTS = 8  # hash variants a sample is searched under (`hash_variants`)
_MIRROR_VARIANTS = (1, 3)  # the mirror hashes (left out when flips are not duplicates)


def hash_variants(record: dict, mirror: bool = True) -> tuple:
    """The distinct hashes a record is searched under, as ((variant, value), ...): the reference
    for `variant_matrix`, which computes the same for a whole batch.

    With a descriptor: variants 0/1 are the robust hash / robust mirror hash of the full image, 2/3
    the same of the border-trimmed image (when it has a trimmed view that is not a solid block),
    4 and 6 the brightened hash of the full and of the trimmed image (so a brighter copy, whose
    hash moved towards it, is a candidate), 5 the centre view's hash (a copy cropped by about 5 %
    of each side is near it). Without one (hash-only records, or a descriptor of
    another version): the PHASH / PHASH_MIRROR columns. Variants 1 and 3 are mirror hashes (left
    out when flips are not duplicates).
    """
    descriptor = parse_descriptor(record.get(Col.DEDUP_DESCRIPTOR))
    if descriptor is not None:
        # the brightened hashes unmirrored only: one meeting the other's mirror hash is a
        # brightened flip already
        brightened = [descriptor.bright[0][0], None, (descriptor.bright[1] or (None,))[0], None]
        values = [*descriptor.hashes[0], *(descriptor.hashes[1] or (None, None)), *brightened]
        values[5] = descriptor.hashes[CENTRE][0]  # the centre view: a cropped copy's full view is near it
    else:
        values = [_hex_to_int(record.get(Col.PHASH)), _hex_to_int(record.get(Col.PHASH_MIRROR))]
    if values[0] is None:
        return ()
    out, seen = [], set()
    for variant, value in enumerate(values):
        if value is None or value in seen or (variant in _MIRROR_VARIANTS and not mirror):
            continue
        seen.add(value)
        out.append((variant, value))
    return tuple(out)


def _fixed_binary(array, width: int) -> tuple[np.ndarray, np.ndarray]:
    """A binary column -> ([n, width] uint8 of the rows exactly `width` bytes long, which those are)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    array = array.combine_chunks() if isinstance(array, pa.ChunkedArray) else array
    array = array.cast(pa.binary())
    n = len(array)
    lengths = pc.fill_null(pc.binary_length(array), -1).to_numpy(zero_copy_only=False)
    ok = lengths == width
    matrix = np.zeros((n, width), dtype=np.uint8)
    rows = np.flatnonzero(ok)
    if len(rows):
        data = np.frombuffer(array.buffers()[2], dtype=np.uint8) if array.buffers()[2] is not None else np.zeros(0, np.uint8)
        offsets = np.frombuffer(array.buffers()[1], dtype=np.int32)[array.offset:array.offset + n]
        matrix[rows] = data[offsets[rows][:, None] + np.arange(width)[None, :]]
    return matrix, ok


def _words(matrix: np.ndarray, offset: int) -> np.ndarray:
    """The big-endian uint64 at byte `offset` of every row."""
    return np.ascontiguousarray(matrix[:, offset:offset + 8]).view(">u8")[:, 0].astype(np.uint64)


def variant_matrix(descriptors, phash, phash_mirror, mirror: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """`hash_variants` of a batch: ([n, VARIANTS] uint64 values, [n, VARIANTS] whether each is
    searched), from the DEDUP_DESCRIPTOR, PHASH and PHASH_MIRROR columns."""
    from transforms.batch import hex_prefix_uint64

    n = len(descriptors)
    values = np.zeros((n, VARIANTS), dtype=np.uint64)
    present = np.zeros((n, VARIANTS), dtype=bool)
    raw, sized = _fixed_binary(descriptors, DESCRIPTOR_BYTES)
    valid = sized & (raw[:, 0] == DESCRIPTOR_VERSION)
    trimmed = valid & ((raw[:, 1] & _HAS_TRIM) != 0)

    def word(view: int, index: int) -> np.ndarray:
        return _words(raw, _HASHES_OFFSET + view * _VIEW_HASH_BYTES + 8 * index)

    for variant, spec in enumerate(((0, 0), (0, 1), (1, 0), (1, 1), (0, 2), None, (1, 2), None)):
        if spec is None:
            continue
        view, index = spec
        where = valid if view == 0 else trimmed
        values[:, variant] = np.where(where, word(view, index), np.uint64(0))
        present[:, variant] = where
    values[:, 5] = np.where(valid, _words(raw, _CENTRE_HASHES_OFFSET), np.uint64(0))  # the centre view
    present[:, 5] = valid
    plain, plain_ok = hex_prefix_uint64(phash, 16)
    flipped, flipped_ok = hex_prefix_uint64(phash_mirror, 16)
    fallback = ~valid
    values[fallback, 0], present[fallback, 0] = plain[fallback], plain_ok[fallback]
    values[fallback, 1], present[fallback, 1] = flipped[fallback], flipped_ok[fallback]
    present &= present[:, :1]  # no first hash: not searched at all
    if not mirror:
        present[:, list(_MIRROR_VARIANTS)] = False
    for variant in range(1, VARIANTS):  # a value a sample already has is not searched again
        repeated = np.zeros(n, dtype=bool)
        for earlier in range(variant):
            repeated |= present[:, earlier] & (values[:, earlier] == values[:, variant])
        present[:, variant] &= ~repeated
    values[~present] = 0
    return values, present


def _ordered_pairs(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Unique unordered pairs of distinct indices as [m, 2], smaller index first, sorted."""
    pairs = np.stack([np.minimum(first, second), np.maximum(first, second)], axis=1).astype(np.int64)
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    if not len(pairs):
        return np.zeros((0, 2), dtype=np.int64)
    return np.unique(pairs, axis=0)


def band_candidates(values: np.ndarray, present: np.ndarray, radius: int, max_bucket: int) -> np.ndarray:
    """Candidate pairs [m, 2] of rows (row index = uid order) whose searched hashes are within
    `radius` of each other, found without comparing all pairs: the distinct values are searched
    by pigeonhole bands (`near_pairs`), and for each pair of values the first holder of each (by
    uid) is paired; samples holding one value are chained in uid order (a path, not a clique:
    same components, linear edges)."""
    rows, variants = np.nonzero(present)
    if not len(rows):
        return np.zeros((0, 2), dtype=np.int64)
    held = values[rows, variants]
    order = np.lexsort((variants, rows, held))
    held, rows = held[order], rows[order]
    starts = np.flatnonzero(np.r_[True, held[1:] != held[:-1]])
    chained = np.flatnonzero(held[1:] == held[:-1])
    pairs = [np.stack([rows[chained], rows[chained + 1]], axis=1)]
    distinct = held[starts]
    if len(distinct) > 1:
        near = near_pairs(distinct, radius, max_bucket)
        if len(near):
            pairs.append(np.stack([rows[starts[near[:, 0]]], rows[starts[near[:, 1]]]], axis=1))
    found = np.concatenate(pairs)
    return _ordered_pairs(found[:, 0], found[:, 1])


def within_radius(values: np.ndarray, present: np.ndarray, pairs: np.ndarray, radius: int) -> np.ndarray:
    """[m] whether some searched hash of the first row of each pair is within `radius` of one of
    the second row's."""
    close = np.zeros(len(pairs), dtype=bool)
    if not len(pairs):
        return close
    a, b = pairs[:, 0], pairs[:, 1]
    for i in range(VARIANTS):
        for j in range(VARIANTS):
            both = present[a, i] & present[b, j]
            if both.any():
                close |= both & (np.bitwise_count(values[a, i] ^ values[b, j]) <= radius)
    return close


def cosine_candidates(vectors: np.ndarray, queries: np.ndarray, pool: np.ndarray, min_cosine: float,
                      values: np.ndarray, present: np.ndarray, radius: int, per_query: int) -> np.ndarray:
    """Candidate pairs [m, 2] (rows of `vectors`, smaller first) inside one group of a large
    dataset: a query and a pool member whose CLIP image cosine reaches `min_cosine` (verification
    requires it of two samples with embeddings anyway) and whose searched hashes are within
    `radius`; at most `per_query` per query, the highest cosines (a cluster of many copies is still
    connected, and its members are checked against their survivor one by one)."""
    if not len(queries) or not len(pool):
        return np.zeros((0, 2), dtype=np.int64)
    found = []
    block = max(1, 4_000_000 // len(pool))
    for start in range(0, len(queries), block):
        rows = queries[start:start + block]
        cosines = vectors[rows] @ vectors[pool].T
        cosines[rows[:, None] == pool[None, :]] = -np.inf
        q, p = np.nonzero(cosines >= min_cosine - 1e-4)
        if not len(q):
            continue
        if per_query > 0:
            order = np.lexsort((p, -cosines[q, p], q))
            q, p = q[order], p[order]
            first = np.r_[0, np.flatnonzero(q[1:] != q[:-1]) + 1]
            rank = np.arange(len(q)) - np.repeat(first, np.diff(np.r_[first, len(q)]))
            keep = rank < per_query
            q, p = q[keep], p[keep]
        pairs = np.stack([rows[q], pool[p]], axis=1)
        found.append(pairs[within_radius(values, present, pairs, radius)])
    if not found:
        return np.zeros((0, 2), dtype=np.int64)
    pairs = np.concatenate(found)
    return _ordered_pairs(pairs[:, 0], pairs[:, 1])


def verify_pairs(pairs: np.ndarray, descriptors: list, embeddings: list, mirror: bool, min_similarity: float,
                 min_cosine: float, max_distance: float, radius: int) -> np.ndarray:
    """[m] `verify_pair` of each candidate pair of rows; each row's descriptor is parsed once."""
    parsed: dict[int, tuple] = {}

    def payload(row: int) -> tuple:
        if row not in parsed:
            parsed[row] = (parse_descriptor(descriptors[row]), embeddings[row])
        return parsed[row]

    return np.array([
        verify_pair(payload(a), payload(b), mirror, min_similarity, min_cosine, max_distance, radius)
        for a, b in pairs.tolist()
    ], dtype=bool)


def quality_order(neg_pixels: np.ndarray, clip: np.ndarray, uid_order: np.ndarray) -> np.ndarray:
    """Rank of each sample by `quality_key` (0 = best): largest resolution, then highest clip
    score (present beats absent), then uid. `uid_order` ranks the uids."""
    missing = ~np.isfinite(clip)
    return np.argsort(np.lexsort((uid_order, np.where(missing, 0.0, -clip), missing, neg_pixels)), kind="stable")


def components(first: np.ndarray, second: np.ndarray, nodes: int) -> np.ndarray:
    """Connected-component label of each of `nodes` nodes, given edges (scipy's connected_components)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(first), dtype=np.int8), (first, second)), shape=(nodes, nodes))
    return connected_components(graph, directed=False)[1]


def resolve_cluster(members: dict, edges: Iterable[tuple], check) -> list[tuple[str, list[str]]]:
    """One connected component -> [(survivor, [dropped uids])], so that every dropped member was
    checked against its own survivor, not only against a neighbour: union-find chains cannot walk
    from one picture to another through a series of small steps.

    `members` maps uid -> quality key (smaller is better); `check(uid, survivor)` is the second
    look. The best member not yet placed becomes a survivor; a walk from it over verified edges
    takes each member it meets that has a verified edge to the survivor or passes `check`, and
    goes on only through members it took. What is left is resolved the same way, best first.
    Deterministic (uid order throughout).
    """
    adjacency: dict = {uid: set() for uid in members}
    for a, b in edges:
        if a in adjacency and b in adjacency and a != b:
            adjacency[a].add(b)
            adjacency[b].add(a)
    placed: dict = {}
    result = []
    for survivor in sorted(members, key=lambda u: members[u]):
        if survivor in placed:
            continue
        placed[survivor] = survivor
        taken, rejected = [], set()
        frontier = [survivor]
        while frontier:
            following = []
            for uid in frontier:
                for other in sorted(adjacency[uid]):
                    if other in placed or other in rejected:
                        continue
                    if other in adjacency[survivor] or check(other, survivor):
                        placed[other] = survivor
                        taken.append(other)
                        following.append(other)
                    else:
                        rejected.add(other)
            frontier = following
        if taken:
            result.append((survivor, sorted(taken)))
    return sorted(result)
