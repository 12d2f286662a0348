"""Phase 2, decide: features table only (no image bytes) -> the decisions table.

Order of decisions: per-sample filters first (language, then CLIP score), then duplicate clusters
over what is left (exact, then near), so a cluster's survivor is always a sample that passes the
filters; then hard negatives among the kept samples. Each dropped uid gets exactly one reason.

The phase is built for tens of millions of rows on one machine and the same graph on Dataflow:
every large shuffle carries Arrow tables through files (`transforms/spill.py`), never a Python
object per row, and no step holds more than one partition of the data:

  read (small columns)   -> the global CLIP cutoff (top-percent mode) and the row counts
  read (embeddings)      -> a deterministic sample -> the groups of each embedding space
                            (`transforms/neighbours.py`; one group up to the exact-search sizes)
  read (all columns)     -> per batch: filter verdicts, and the rows that pass them spilled four
                            ways: by uid range (decisions), by sha256 (exact dedup), by image
                            group (near dedup, image negatives), by text group (text negatives)
  exact dedup            -> per sha256 partition: the best sample of each sha256 stays
  near dedup             -> per image partition: candidates (hash bands over one group, or CLIP
                            cosine inside each group of a large dataset), verified pairs; then
                            components over all verified pairs (one small table) and each
                            cluster resolved against its own survivor
  negatives              -> per image / text partition: exact search inside each group, kept
                            samples only
  decisions              -> per uid range: everything above joined, caption negatives made,
                            one sorted Parquet file per range (ranges in uid order)

Element types are commented after each step.
"""

from __future__ import annotations

import math
from typing import Optional

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.metrics import Metrics

from pipeline.config import CurateConfig
from pipeline.layout import Layout
from pipeline.progress import ReportPass, add_pass_rows, declare_passes
from schemas import DECISIONS_SCHEMA, HARD_NEGATIVE_TYPE, Col, DropReason, Status
from transforms import batch as cols
from transforms import dedup
from transforms import neighbours as nn
from transforms.caption import language_drop_reason
from transforms.clip_filter import GlobalClipCutoff, threshold_for
from transforms.negatives import NEIGHBOUR_KINDS, caption_negatives
from transforms.spill import SpillBatches, partitioned, read_partition
from transforms.write_output import join_path, write_atomically

# Columns the decide phase reads from the features table (never image bytes).
DECIDE_COLUMNS = [
    Col.UID, Col.STATUS, Col.SHA256, Col.PHASH, Col.PHASH_MIRROR, Col.DEDUP_DESCRIPTOR,
    Col.ORIGINAL_WIDTH, Col.ORIGINAL_HEIGHT, Col.LANG, Col.LANG_SCORE, Col.CLIP_SCORE,
    Col.IMAGE_EMBEDDING, Col.TEXT_EMBEDDING, Col.CAPTION, Col.CAPTION_CLEAN,
]
_FILTER_COLUMNS = [Col.UID, Col.STATUS, Col.LANG, Col.CLIP_SCORE]
_EMBEDDING_COLUMNS = {"image": Col.IMAGE_EMBEDDING, "text": Col.TEXT_EMBEDDING}
NAMESPACE = "decide"
# the passes over the rows, with the share of the phase's time each takes (for the progress ETA)
PASSES = [("count", 0.02), ("sample", 0.08), ("spill", 0.25), ("exact dedup", 0.03), ("near dedup", 0.1),
          ("negatives", 0.3), ("decisions", 0.22)]

# Spilled columns (in-flight only: never written to a table of the output)
_CELL, _RANK = "cell", "rank"
_NEG_PIXELS, _VALUES, _PRESENT = "neg_pixels", "hash_values", "hash_present"
_VECTOR, _HASHES, _HASHES_PRESENT, _CAPTION_KEY = "vector", "phashes", "phashes_present", "caption_key"
_FILTER_REASON, _SURVIVOR, _KIND, _POSITION = "filter_reason", "survivor", "kind", "position"
_NEIGHBOUR, _SCORE, _NEIGHBOUR_CAPTION = "neighbour", "score", "neighbour_caption"
_COMPONENT = "component"


def _settings(config: CurateConfig) -> dict:
    """What the steps read from the config, resolved once."""
    return {
        "k": int(config.negatives_k),
        "captions": bool(config.negatives_captions),
        "mining": int(config.negatives_k) > 0 or bool(config.negatives_captions),
        "ceiling": float(config.negatives_ceiling),
        "negatives_radius": int(config.dedup_radius) if config.dedup_near else -1,
        "exact_max": int(config.negatives_exact_max),
        "dedup_exact_max": int(config.dedup_exact_max),
        "group_size": int(config.negatives_group_size),
        "centroids": int(config.negatives_centroids),
        "probe": int(config.negatives_probe),
        "sample": int(config.negatives_sample),
        "partition_rows": int(config.decide_partition_rows),
        "rows_per_file": int(config.ledger_rows_per_file),
        "dedup_exact": bool(config.dedup_exact),
        "dedup_near": bool(config.dedup_near),
        "radius": int(config.dedup_radius),
        "max_bucket": int(config.dedup_max_bucket),
        "mirror": bool(config.dedup_mirror),
        "min_similarity": float(config.dedup_min_descriptor_similarity),
        "min_cosine": float(config.dedup_min_embedding_cosine),
        "max_distance": float(config.dedup_max_descriptor_distance),
        "candidates_per_sample": int(config.dedup_candidates_per_sample),
        "recall_queries": int(config.negatives_recall_queries) if int(config.negatives_k) > 0 else 0,
    }


def validate(config: CurateConfig) -> None:
    if not 0 <= int(config.dedup_radius) <= 31:
        raise ValueError("dedup_radius must be between 0 and 31")
    if int(config.dedup_max_bucket) < 2:
        raise ValueError("dedup_max_bucket must be at least 2")
    if int(config.negatives_k) < 0 or int(config.negatives_probe) < 1 or int(config.negatives_sample) < 2:
        raise ValueError("negatives_k must be >= 0, negatives_probe >= 1, negatives_sample >= 2")
    if int(config.negatives_recall_queries) < 0:
        raise ValueError("negatives_recall_queries must be >= 0 (0: no recall estimate)")
    if int(config.decide_partition_rows) < 1000:
        raise ValueError("decide_partition_rows must be at least 1000")
    if config.clip_keep_top_percent is not None:
        GlobalClipCutoff(config)  # validates the percentage


# ------------------------------------------------------------------------------------------------
# per batch: filters (pure)
# ------------------------------------------------------------------------------------------------


def filter_reasons(table: pa.Table, config: CurateConfig, global_cutoff: Optional[float]) -> np.ndarray:
    """The first filter each alive row fails (language, then CLIP score) as a reason string, or
    None: `language_drop_reason` and `clip_drop_reason` for a batch, decided once per language."""
    lang = cols.column(table, Col.LANG)
    encoded = (lang if pa.types.is_string(lang.type) else lang.cast(pa.string())).dictionary_encode()
    langs = encoded.dictionary.to_pylist() + [None]  # the last: rows without a language
    which = pc.fill_null(encoded.indices, len(langs) - 1).to_numpy(zero_copy_only=False)
    scores = cols.float_column(table, Col.CLIP_SCORE)
    reasons = np.full(len(which), None, dtype=object)
    language = np.full(len(langs), None, dtype=object)
    thresholds = np.zeros(len(langs), dtype=np.float64)
    for index, lang in enumerate(langs):
        dropped = language_drop_reason(lang, config)
        language[index] = None if dropped is None else dropped.value
        if config.clip_keep_top_percent is not None:
            thresholds[index] = -math.inf if global_cutoff is None else float(global_cutoff)
        else:
            thresholds[index] = threshold_for(lang, config.clip_threshold, config.clip_thresholds_per_lang)
    low = np.isfinite(scores) & (scores < thresholds[which])
    reasons[low] = DropReason.LOW_CLIP_SCORE.value
    by_language = language[which]
    wrong = np.not_equal(by_language, None)
    reasons[wrong] = by_language[wrong]
    return reasons


def _alive(table: pa.Table) -> pa.Table:
    return _only(table, pc.equal(table[Col.STATUS], Status.KEPT))


def _only(table: pa.Table, mask) -> pa.Table:
    """The rows where `mask` is true; the table itself when that is every row (a filter copies
    every column, the embeddings too, even when it keeps them all)."""
    mask = mask if isinstance(mask, (pa.Array, pa.ChunkedArray)) else pa.array(np.asarray(mask, dtype=bool))
    if mask.null_count == 0 and pc.all(mask).as_py() in (True, None):
        return table
    return table.filter(mask)


def _quality_columns(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    width = cols.int_column(table, Col.ORIGINAL_WIDTH)
    height = cols.int_column(table, Col.ORIGINAL_HEIGHT)
    return -(width * height), cols.float_column(table, Col.CLIP_SCORE, np.float32)


def _captions(table: pa.Table) -> pa.Array:
    """The caption the models look at (`caption_of`): the clean one, else the raw one, else ""."""
    clean = cols.column(table, Col.CAPTION_CLEAN)
    raw = cols.column(table, Col.CAPTION)
    return pc.fill_null(pc.coalesce(clean, raw), "")




def _phashes(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    plain, plain_ok = cols.hex_prefix_uint64(cols.column(table, Col.PHASH))
    flipped, flipped_ok = cols.hex_prefix_uint64(cols.column(table, Col.PHASH_MIRROR))
    return np.stack([plain, flipped], axis=1), np.stack([plain_ok, flipped_ok], axis=1)


def _units(table: pa.Table, space: str) -> tuple[np.ndarray, np.ndarray]:
    values, valid, _ = cols.fixed_vectors(cols.column(table, _EMBEDDING_COLUMNS[space]))
    return nn.unit_rows(values, valid)


def _remaining(table: pa.Table, config: CurateConfig, cutoff: Optional[float]) -> pa.Table:
    alive = _alive(table)
    reasons = filter_reasons(alive, config, cutoff)
    return _only(alive, np.equal(reasons, None))


# ------------------------------------------------------------------------------------------------
# counts, sample, groups
# ------------------------------------------------------------------------------------------------


class _Counts(beam.DoFn):
    """A batch of filter columns -> {alive, remaining}."""

    def __init__(self, config: CurateConfig):
        self._config = config

    def process(self, table: pa.Table, cutoff=None):
        alive = _alive(table)
        reasons = filter_reasons(alive, self._config, cutoff)
        yield {"alive": alive.num_rows, "remaining": int(np.equal(reasons, None).sum())}


def _sum_counts(counts) -> dict:
    total = {"alive": 0, "remaining": 0}
    for count in counts:
        for key in total:
            total[key] += count[key]
    return total


def _sample_threshold(count: int, wanted: int) -> int:
    """Rows whose uid prefix is below this are the sample (uids are hashes: a uniform sample)."""
    if count <= wanted:
        return 1 << 64
    return int((wanted / count) * (1 << 64))


def _needs_groups(count: int, settings: dict) -> bool:
    limit = min(settings["exact_max"], settings["dedup_exact_max"]) if settings["dedup_near"] else settings["exact_max"]
    return count > limit


class _Sample(beam.DoFn):
    """A batch of embedding columns -> (space, uid prefixes, float16 unit vectors) of the rows
    that pass the filters and whose uid prefix is below the sample threshold."""

    def __init__(self, config: CurateConfig, settings: dict):
        self._config = config
        self._settings = settings

    def process(self, table: pa.Table, counts, cutoff=None):
        nn.configure_threads()
        count = counts["remaining"]
        if not _needs_groups(count, self._settings):
            return
        wanted = nn.sample_size(count, self._settings["group_size"], self._settings["centroids"], self._settings["sample"])
        remaining = _remaining(table, self._config, cutoff)
        keys, _ = cols.hex_prefix_uint64(cols.column(remaining, Col.UID), 16)
        chosen = keys < np.uint64(min(_sample_threshold(count, wanted), (1 << 64) - 1)) if count > wanted else np.ones(len(keys), bool)
        if not chosen.any():
            return
        rows = remaining.filter(pa.array(chosen))
        for space in NEIGHBOUR_KINDS:
            units, valid = _units(rows, space)
            if valid.any():
                yield space, (keys[chosen][valid], units[valid])


def _train(space_and_parts, counts, settings: dict):
    """All sample parts of one space -> (space, Partitioning)."""
    nn.configure_threads()
    space, parts = space_and_parts
    parts = list(parts)
    keys = np.concatenate([k for k, _ in parts])
    units = np.concatenate([u for _, u in parts])
    order = np.argsort(keys, kind="stable")
    sample = nn.search_vectors(units[order])
    partitioning = nn.train_partitioning(sample, counts["remaining"], settings["group_size"], settings["partition_rows"],
                                         settings["centroids"])
    return space, partitioning


# ------------------------------------------------------------------------------------------------
# the main pass: verdicts, and the remaining rows spilled four ways
# ------------------------------------------------------------------------------------------------

SPILL_ALIVE, SPILL_EXACT, SPILL_IMAGE, SPILL_TEXT = "alive", "exact", "image", "text"
NEAR_GROUPS = 2  # above dedup_exact_max, the nearest groups of a sample in which near dedup meets it


def decision_files(alive: int, rows_per_file: int) -> int:
    return max(1, math.ceil(alive / max(1, rows_per_file)))


def exact_partitions(remaining: int, partition_rows: int) -> int:
    return max(1, math.ceil(remaining / partition_rows))


def _space_partitions(partitioning: Optional[nn.Partitioning]) -> int:
    return 1 if partitioning is None else partitioning.partitions


def _spill_groups(table: pa.Table, units: np.ndarray, valid: np.ndarray, partitioning: Optional[nn.Partitioning],
                  probe: int, keep_ungrouped: bool, nearest_only: tuple = (), nearest: int = 1) -> pa.Table:
    """The rows with their groups: one row per (row, fine cell) among its `probe` cells, with its
    rank (0: home) and the partition of the cell; rows without a vector go to the last partition
    (when kept at all) with cell -1. The `nearest_only` columns are null in the copies of rank >=
    `nearest` (what only a sample's nearest groups read: the spill is written once per copy)."""
    n = table.num_rows
    partitions = _space_partitions(partitioning)
    if partitioning is None:
        cells = np.where(valid, 0, -1)[:, None]
    else:
        cells = np.full((n, min(probe, partitioning.groups)), -1, dtype=np.int64)
        rows = np.flatnonzero(valid)
        if len(rows):
            cells[rows] = nn.assign_groups(nn.search_vectors(units[rows]), partitioning, probe)
    rows, ranks = np.nonzero(cells >= 0)
    if keep_ungrouped:
        lone = np.flatnonzero(~valid)
        rows, ranks = np.r_[rows, lone], np.r_[ranks, np.zeros(len(lone), dtype=np.int64)]
    chosen = cells[rows, ranks] if len(rows) else np.zeros(0, dtype=np.int64)
    chosen = np.where(np.isin(rows, np.flatnonzero(valid)), chosen, -1)
    if partitioning is None:
        part = np.where(chosen >= 0, 0, partitions)
    else:
        part = np.where(chosen >= 0, partitioning.fine_parent[np.maximum(chosen, 0)], partitions)
    out = cols.take(table, rows)
    if nearest_only and (ranks >= nearest).any():
        near = pa.array(ranks < nearest)
        for name in nearest_only:
            column = out.column(name)
            out = out.set_column(out.schema.get_field_index(name), name,
                                 pc.if_else(near, column, pa.scalar(None, column.type)))
    out = out.append_column(_CELL, pa.array(chosen.astype(np.int32)))
    out = out.append_column(_RANK, pa.array(ranks.astype(np.int8)))
    return partitioned(out, part)


class _MainPass(beam.DoFn):
    """A batch of DECIDE_COLUMNS -> tagged tables, each with a PARTITION column:
    SPILL_ALIVE (every alive row by uid range: uid, filter reason, caption), SPILL_EXACT (rows that
    pass the filters, by sha256), SPILL_IMAGE and SPILL_TEXT (rows that pass, by group)."""

    def __init__(self, config: CurateConfig, settings: dict):
        self._config = config
        self._s = settings
        self._rows = Metrics.counter(NAMESPACE, "rows_alive")
        self._filtered = {reason: Metrics.counter("decide_filters", f"dropped_{reason.value}")
                          for reason in (DropReason.LANGUAGE_NOT_WANTED, DropReason.LOW_CLIP_SCORE)}

    def process(self, table: pa.Table, counts, partitionings, cutoff=None):
        nn.configure_threads()
        s = self._s
        alive = _alive(table)
        if not alive.num_rows:
            return
        self._rows.inc(alive.num_rows)
        reasons = filter_reasons(alive, self._config, cutoff)
        for reason, counter in self._filtered.items():
            dropped = int(np.sum(reasons == reason.value))
            if dropped:
                counter.inc(dropped)
        passes = np.equal(reasons, None)
        uids = cols.column(alive, Col.UID)
        captions = pc.if_else(pa.array(passes), _captions(alive), pa.scalar(None, pa.string()))
        verdicts = pa.table({Col.UID: uids, _FILTER_REASON: pa.array(reasons.tolist(), pa.string()), Col.CAPTION: captions})
        yield beam.pvalue.TaggedOutput(SPILL_ALIVE, partitioned(
            verdicts, cols.uid_ranges(uids, decision_files(counts["alive"], s["rows_per_file"]))))
        remaining = _only(alive, passes)
        if not remaining.num_rows:
            return
        uids = cols.column(remaining, Col.UID)
        neg_pixels, clip = _quality_columns(remaining)
        if s["dedup_exact"]:
            sha = cols.column(remaining, Col.SHA256)
            with_sha = pc.is_valid(sha)
            exact = pa.table({Col.SHA256: sha, Col.UID: uids, _NEG_PIXELS: neg_pixels, Col.CLIP_SCORE: clip}).filter(with_sha)
            if exact.num_rows:
                yield beam.pvalue.TaggedOutput(SPILL_EXACT, partitioned(exact, cols.hash_partitions(
                    cols.column(exact, Col.SHA256), exact_partitions(counts["remaining"], s["partition_rows"]))))
        captions = _captions(remaining)
        caption_keys = nn.caption_keys(captions) if s["k"] > 0 else np.zeros(remaining.num_rows, dtype=np.uint64)
        hashes, hashes_present = _phashes(remaining)
        if s["dedup_near"] or s["k"] > 0:
            units, valid = _units(remaining, "image")
            values, present = dedup.variant_matrix(
                cols.column(remaining, Col.DEDUP_DESCRIPTOR), cols.column(remaining, Col.PHASH),
                cols.column(remaining, Col.PHASH_MIRROR), s["mirror"])
            image = pa.table({
                Col.UID: uids, _NEG_PIXELS: neg_pixels, Col.CLIP_SCORE: clip,
                _VALUES: cols.uint64_matrix_array(values), _PRESENT: pa.array(np.packbits(present, axis=1, bitorder="little")[:, 0]),
                Col.DEDUP_DESCRIPTOR: cols.column(remaining, Col.DEDUP_DESCRIPTOR),
                _VECTOR: cols.vectors_array(units, valid),
                _HASHES: cols.uint64_matrix_array(hashes), _HASHES_PRESENT: pa.array(np.packbits(hashes_present, axis=1, bitorder="little")[:, 0]),
                Col.CAPTION: captions, _CAPTION_KEY: pa.array(caption_keys),
            })
            # near dedup reads a sample's descriptor and hash variants in its first NEAR_GROUPS groups only
            yield beam.pvalue.TaggedOutput(SPILL_IMAGE, _spill_groups(
                image, units, valid, partitionings.get("image"), s["probe"], keep_ungrouped=s["dedup_near"],
                nearest_only=(Col.DEDUP_DESCRIPTOR, _VALUES, _PRESENT), nearest=NEAR_GROUPS))
        if s["k"] > 0:
            units, valid = _units(remaining, "text")
            text = pa.table({
                Col.UID: uids, _VECTOR: cols.vectors_array(units, valid),
                _HASHES: cols.uint64_matrix_array(hashes), _HASHES_PRESENT: pa.array(np.packbits(hashes_present, axis=1, bitorder="little")[:, 0]),
                Col.CAPTION: captions, _CAPTION_KEY: pa.array(caption_keys),
            })
            yield beam.pvalue.TaggedOutput(SPILL_TEXT, _spill_groups(
                text, units, valid, partitionings.get("text"), s["probe"], keep_ungrouped=False))


def _unpack(bits: pa.Array, width: int) -> np.ndarray:
    packed = cols.column(pa.table({"b": bits}), "b").to_numpy(zero_copy_only=False).astype(np.uint8)
    return np.unpackbits(packed[:, None], axis=1, count=width, bitorder="little").astype(bool)


# ------------------------------------------------------------------------------------------------
# exact dedup: per sha256 partition
# ------------------------------------------------------------------------------------------------


_DROP_SCHEMA = pa.schema([pa.field(Col.UID, pa.string()), pa.field(_SURVIVOR, pa.string())])


def _quality_sorted(table: pa.Table, *first: str) -> pa.Table:
    """Rows in `quality_key` order (after the `first` columns): largest resolution, present clip
    score, highest clip score, uid."""
    clip = cols.float_column(table, Col.CLIP_SCORE)
    missing = ~np.isfinite(clip)
    keyed = table.append_column("_clip_missing", pa.array(missing)).append_column(
        "_neg_clip", pa.array(np.where(missing, 0.0, -clip)))
    keys = [(name, "ascending") for name in first] + [
        (_NEG_PIXELS, "ascending"), ("_clip_missing", "ascending"), ("_neg_clip", "ascending"), (Col.UID, "ascending")]
    return keyed.sort_by(keys).drop_columns(["_clip_missing", "_neg_clip"])


def exact_drops(table: pa.Table) -> pa.Table:
    """Rows of one sha256 partition -> (uid, survivor) for every row that is not the best of its
    sha256 group."""
    if table is None or not table.num_rows:
        return _DROP_SCHEMA.empty_table()
    ordered = _quality_sorted(table, Col.SHA256)
    sha = cols.column(ordered, Col.SHA256).to_numpy(zero_copy_only=False)
    first = np.r_[True, sha[1:] != sha[:-1]]
    group = np.cumsum(first) - 1
    leaders = np.flatnonzero(first)
    uids = cols.column(ordered, Col.UID)
    dropped = np.flatnonzero(~first)
    return pa.table({Col.UID: cols.take(pa.table({"u": uids}), dropped)["u"],
                     _SURVIVOR: cols.take(pa.table({"u": uids}), leaders[group[dropped]])["u"]}, schema=_DROP_SCHEMA)


class _ExactDedup(beam.DoFn):
    def __init__(self):
        self._groups = Metrics.counter("dedup", "exact_groups")
        self._dups = Metrics.counter("dedup", "exact_duplicates")

    def process(self, partition_and_paths, counts):
        _, paths = partition_and_paths
        add_pass_rows("decide", "exact dedup", 0)
        table = read_partition(paths)
        add_pass_rows("decide", "exact dedup", table.num_rows if table is not None else 0, counts["remaining"])
        drops = exact_drops(table)
        if drops.num_rows:
            self._dups.inc(drops.num_rows)
            self._groups.inc(len(pc.unique(drops[_SURVIVOR])))
            yield drops


def _concat(tables, schema: pa.Schema) -> pa.Table:
    tables = [t for t in tables if t is not None and t.num_rows]
    return pa.concat_tables(tables).combine_chunks() if tables else schema.empty_table()


# ------------------------------------------------------------------------------------------------
# near dedup: per image partition, then components over every verified pair
# ------------------------------------------------------------------------------------------------

_EDGE_SCHEMA = pa.schema([
    pa.field("a", pa.string()), pa.field("b", pa.string()),
    pa.field("a_neg_pixels", pa.int64()), pa.field("a_clip", pa.float32()),
    pa.field("b_neg_pixels", pa.int64()), pa.field("b_clip", pa.float32()),
])
_DEDUP_ROWS = [Col.UID, _CELL, _RANK, _NEG_PIXELS, Col.CLIP_SCORE, _VALUES, _PRESENT, Col.DEDUP_DESCRIPTOR, _VECTOR]


def _regroup(key_and_paths, global_mode: bool):
    """(partition, paths) -> the same, or (0, paths) when the whole space is one group."""
    partition, paths = key_and_paths
    yield (0 if global_mode else partition), paths


def _flatten_paths(key_and_lists):
    key, lists = key_and_lists
    return key, tuple(sorted(path for paths in lists for path in paths))


def _one_row_per_uid(table: pa.Table) -> pa.Table:
    """A sample read from several partitions (one per group it is in) once, sorted by uid."""
    table = table.sort_by([(Col.UID, "ascending"), (_RANK, "ascending")])
    uids = cols.column(table, Col.UID).to_numpy(zero_copy_only=False)
    first = np.r_[True, uids[1:] != uids[:-1]] if len(uids) else np.zeros(0, bool)
    return table.filter(pa.array(first))


class _NearDedup(beam.DoFn):
    """(partition, spill paths) of the image space -> verified pairs (an _EDGE_SCHEMA table) and,
    tagged PAYLOADS, (uid, descriptor, vector) of their ends, by uid range."""

    PAYLOADS = "payloads"

    def __init__(self, settings: dict):
        self._s = settings
        self._candidates = Metrics.counter("dedup", "candidate_edges")
        self._passed = Metrics.counter("dedup", "verified_edges")
        self._rejected = Metrics.counter("dedup", "rejected_edges")

    def process(self, partition_and_paths, exact_dropped, counts):
        s = self._s
        _, paths = partition_and_paths
        add_pass_rows("decide", "near dedup", 0)
        nn.configure_threads()
        table = read_partition(paths, columns=_DEDUP_ROWS)
        if table is None or table.num_rows < 2:
            return
        # a sample is a query in its home group (rank 0: every sample has one row there) and a
        # candidate there and in its next NEAR_GROUPS - 1 groups: a copy whose embedding fell on the
        # other side of a group border is still met
        table = table.filter(pc.less(table[_RANK], NEAR_GROUPS))
        if len(exact_dropped):
            table = table.filter(pc.invert(pc.is_in(table[Col.UID], value_set=exact_dropped)))
        global_mode = counts["remaining"] <= s["dedup_exact_max"]
        rows = _one_row_per_uid(table)
        add_pass_rows("decide", "near dedup", rows.num_rows, counts["remaining"])
        if rows.num_rows < 2:
            return
        values = cols.uint64_matrix(cols.column(rows, _VALUES))
        present = _unpack(cols.column(rows, _PRESENT), dedup.VARIANTS)
        units, valid = cols.vectors_of(cols.column(rows, _VECTOR))
        if global_mode:
            pairs = dedup.band_candidates(values, present, s["radius"], s["max_bucket"])
        else:
            pairs = self._grouped_candidates(table, rows, values, present, units, valid)
        if not len(pairs):
            return
        self._candidates.inc(len(pairs))
        descriptors = cols.column(rows, Col.DEDUP_DESCRIPTOR).to_pylist()
        embeddings = [units[i] if valid[i] else None for i in range(len(valid))]
        ok = dedup.verify_pairs(pairs, descriptors, embeddings, s["mirror"], s["min_similarity"], s["min_cosine"],
                                s["max_distance"], s["radius"])
        self._passed.inc(int(ok.sum()))
        self._rejected.inc(int((~ok).sum()))
        pairs = pairs[ok]
        if not len(pairs):
            return
        neg_pixels = cols.int_column(rows, _NEG_PIXELS)
        clip = cols.float_column(rows, Col.CLIP_SCORE, np.float32)
        uids = cols.column(rows, Col.UID)
        a, b = pairs[:, 0], pairs[:, 1]
        yield pa.table({
            "a": uids.take(pa.array(a)), "b": uids.take(pa.array(b)),
            "a_neg_pixels": neg_pixels[a], "a_clip": clip[a], "b_neg_pixels": neg_pixels[b], "b_clip": clip[b],
        }, schema=_EDGE_SCHEMA)
        ends = np.unique(pairs.reshape(-1))
        payloads = cols.take(rows.select([Col.UID, Col.DEDUP_DESCRIPTOR, _VECTOR]), ends)
        yield beam.pvalue.TaggedOutput(self.PAYLOADS, partitioned(payloads, cols.uid_ranges(
            cols.column(payloads, Col.UID), decision_files(counts["alive"], s["rows_per_file"]))))

    def _grouped_candidates(self, table, rows, values, present, units, valid) -> np.ndarray:
        """Inside each group of the partition, the samples whose home it is against every sample
        there (home or second group): CLIP-cosine candidates (near-copies sit at cosines over 0.9:
        the same or a neighbouring centroid); rows without a vector (the last partition) by hash
        bands among themselves. Pairs are rows of `rows` (one per uid, sorted)."""
        s = self._s
        member = pc.index_in(cols.column(table, Col.UID), value_set=cols.column(rows, Col.UID)).to_numpy(
            zero_copy_only=False).astype(np.int64)
        cells = cols.column(table, _CELL).to_numpy(zero_copy_only=False)
        homes_mask = cols.column(table, _RANK).to_numpy(zero_copy_only=False) == 0
        found = []
        lone = np.unique(member[cells < 0])
        if len(lone) > 1:
            sub = dedup.band_candidates(values[lone], present[lone], s["radius"], s["max_bucket"])
            found.append(lone[sub])
        vectors = nn.search_vectors(units)
        grouped = cells >= 0
        order = np.lexsort((member[grouped], cells[grouped]))
        g_cells, g_members, g_homes = cells[grouped][order], member[grouped][order], homes_mask[grouped][order]
        starts = np.flatnonzero(np.r_[True, g_cells[1:] != g_cells[:-1]]) if len(g_cells) else np.zeros(0, int)
        for start, stop in zip(starts.tolist(), np.r_[starts[1:], len(g_cells)].tolist()):
            pool = g_members[start:stop]
            found.append(dedup.cosine_candidates(vectors, pool[g_homes[start:stop]], pool, s["min_cosine"], values,
                                                 present, s["radius"], s["candidates_per_sample"]))
        if not found:
            return np.zeros((0, 2), dtype=np.int64)
        pairs = np.concatenate(found)
        return np.unique(pairs, axis=0) if len(pairs) else pairs


def _quality_key_of(neg_pixels: int, clip: float, uid: str) -> tuple:
    missing = clip is None or not math.isfinite(clip)
    return (int(neg_pixels), int(missing), 0.0 if missing else -float(clip), uid)


class _Clusters(beam.DoFn):
    """Every verified pair (one element: all edge tables) -> near drops (uid, survivor) of
    two-member clusters (main), and, tagged LARGE, the members and edges of larger clusters
    (resolved with their payloads), tagged REQUESTS (uid, component) by uid range."""

    LARGE, REQUESTS = "large", "requests"

    def __init__(self, settings: dict):
        self._s = settings
        self._clusters = Metrics.counter("dedup", "near_clusters")
        self._duplicates = Metrics.counter("dedup", "near_duplicates")

    def process(self, _, edges, counts):
        edges = _concat(edges, _EDGE_SCHEMA)
        if not edges.num_rows:
            return
        a = cols.column(edges, "a").to_pylist()
        b = cols.column(edges, "b").to_pylist()
        quality = {}
        for uid, neg_pixels, clip in zip(a, edges["a_neg_pixels"].to_pylist(), edges["a_clip"].to_pylist()):
            quality[uid] = _quality_key_of(neg_pixels, clip, uid)
        for uid, neg_pixels, clip in zip(b, edges["b_neg_pixels"].to_pylist(), edges["b_clip"].to_pylist()):
            quality[uid] = _quality_key_of(neg_pixels, clip, uid)
        nodes = sorted(quality)
        index = {uid: i for i, uid in enumerate(nodes)}
        first = np.array([index[u] for u in a], dtype=np.int64)
        second = np.array([index[u] for u in b], dtype=np.int64)
        labels = dedup.components(first, second, len(nodes))
        members: dict[int, list] = {}
        for uid, label in zip(nodes, labels.tolist()):
            members.setdefault(label, []).append(uid)
        component_edges: dict[int, list] = {}
        for i, j in zip(first.tolist(), second.tolist()):
            component_edges.setdefault(int(labels[i]), []).append((nodes[i], nodes[j]))
        drops_uid, drops_survivor, requests, request_components = [], [], [], []
        for label, uids in sorted(members.items(), key=lambda item: min(item[1])):
            if len(uids) == 2:
                survivor, other = sorted(uids, key=quality.get)
                drops_uid.append(other)
                drops_survivor.append(survivor)
                self._clusters.inc()
                self._duplicates.inc()
                continue
            name = min(uids)
            yield beam.pvalue.TaggedOutput(self.LARGE, (name, ({u: quality[u] for u in uids}, component_edges[label])))
            requests.extend(uids)
            request_components.extend([name] * len(uids))
        if drops_uid:
            yield pa.table({Col.UID: drops_uid, _SURVIVOR: drops_survivor}, schema=_DROP_SCHEMA)
        if requests:
            table = pa.table({Col.UID: requests, _COMPONENT: request_components})
            yield beam.pvalue.TaggedOutput(self.REQUESTS, partitioned(table, cols.uid_ranges(
                table[Col.UID], decision_files(counts["alive"], self._s["rows_per_file"]))))


def _payloads_for_requests(range_and_groups):
    """(uid range, {requests, payloads}) -> (component, (uid, descriptor, vector)) per request."""
    _, groups = range_and_groups
    requests = read_partition(_paths(groups["requests"]))
    payloads = read_partition(_paths(groups["payloads"]))
    if requests is None or payloads is None:
        return
    found = {}
    units, valid = cols.vectors_of(cols.column(payloads, _VECTOR))
    for i, (uid, descriptor) in enumerate(zip(payloads[Col.UID].to_pylist(), payloads[Col.DEDUP_DESCRIPTOR].to_pylist())):
        found.setdefault(uid, (descriptor, units[i].copy() if valid[i] else None))
    for uid, component in zip(requests[Col.UID].to_pylist(), requests[_COMPONENT].to_pylist()):
        if uid in found:
            yield component, (uid, found[uid])


def _paths(groups) -> list:
    return [path for paths in groups for path in paths]


class _ResolveLarge(beam.DoFn):
    """(component, {cluster: (qualities, edges), payloads}) -> near drops (uid, survivor)."""

    def __init__(self, settings: dict):
        self._s = settings
        self._clusters = Metrics.counter("dedup", "near_clusters")
        self._duplicates = Metrics.counter("dedup", "near_duplicates")
        self._split = Metrics.counter("dedup", "chain_members_split_off")

    def process(self, component_and_groups):
        _, groups = component_and_groups
        clusters = list(groups["cluster"])
        if not clusters:
            return
        qualities, edges = clusters[0]
        payloads = {uid: (dedup.parse_descriptor(descriptor), vector) for uid, (descriptor, vector) in groups["payloads"]}
        s = self._s

        def check(uid, survivor):
            if uid not in payloads or survivor not in payloads:
                return False
            ok = dedup.verify_pair(payloads[uid], payloads[survivor], s["mirror"], s["min_similarity"], s["min_cosine"],
                                   s["max_distance"], s["radius"])
            if not ok:
                self._split.inc()
            return ok

        uids, survivors = [], []
        for survivor, dropped in dedup.resolve_cluster(qualities, edges, check):
            self._clusters.inc()
            self._duplicates.inc(len(dropped))
            uids.extend(dropped)
            survivors.extend([survivor] * len(dropped))
        if uids:
            yield pa.table({Col.UID: uids, _SURVIVOR: survivors}, schema=_DROP_SCHEMA)


# ------------------------------------------------------------------------------------------------
# negatives: per image / text partition, kept samples only
# ------------------------------------------------------------------------------------------------

_NEIGHBOUR_SCHEMA = pa.schema([
    pa.field(Col.UID, pa.string()), pa.field(_KIND, pa.int8()), pa.field(_POSITION, pa.int8()),
    pa.field(_NEIGHBOUR, pa.string()), pa.field(_SCORE, pa.float64()), pa.field(_NEIGHBOUR_CAPTION, pa.string()),
])
_NEGATIVE_ROWS = [Col.UID, _CELL, _RANK, _VECTOR, _HASHES, _HASHES_PRESENT, Col.CAPTION, _CAPTION_KEY]


def _kept_mask(table: pa.Table, dropped: pa.Array) -> pa.Array:
    """Whether each row is of a sample that has a vector and was not dropped as a duplicate."""
    mask = pc.is_valid(table[_VECTOR])
    return pc.and_(mask, pc.invert(pc.is_in(table[Col.UID], value_set=dropped))) if len(dropped) else mask


def _kept_rows(paths, dropped: pa.Array) -> Optional[pa.Table]:
    """A partition's rows of samples that have a vector and were not dropped as duplicates."""
    table = read_partition(paths, columns=_NEGATIVE_ROWS)
    if table is None or not table.num_rows:
        return None
    table = table.filter(_kept_mask(table, dropped))
    return table if table.num_rows else None


# what the recall estimate's sampled queries carry (a Pool of them can be built)
_PROBE_COLUMNS = [Col.UID, _VECTOR, _HASHES, _HASHES_PRESENT, Col.CAPTION, _CAPTION_KEY]
PROBES, RECALL_EXACT, RECALL_FOUND = "probes", "recall_exact", "recall_found"
_RECALL_SCHEMA = pa.schema([pa.field(Col.UID, pa.string()), pa.field(_NEIGHBOUR, pa.string()),
                            pa.field(_SCORE, pa.float64())])


class _CountKept(beam.DoFn):
    """(partition, spill paths) of one space -> the number of its kept samples (each counted in
    its home partition) and, tagged PROBES, the `queries` of them with the smallest uid hashes:
    candidates for the recall estimate's sampled queries."""

    def __init__(self, queries: int):
        self._queries = queries

    def process(self, partition_and_paths, dropped):
        _, paths = partition_and_paths
        # the files are mapped, not read: the mask touches uids, ranks and vector validity only,
        # and only the sampled rows' vectors are copied
        table = read_partition(paths, columns=[_RANK] + (_PROBE_COLUMNS if self._queries else [Col.UID, _VECTOR]))
        if table is None or not table.num_rows:
            return
        mask = pc.and_(pc.equal(table[_RANK], 0), _kept_mask(table, dropped))
        rows = np.flatnonzero(mask.to_numpy(zero_copy_only=False))
        yield len(rows)
        if self._queries and len(rows):
            chosen = rows[_smallest_uid_hashes(cols.column(table, Col.UID).take(pa.array(rows)), self._queries)]
            yield beam.pvalue.TaggedOutput(PROBES, cols.take(table.select(_PROBE_COLUMNS), chosen))


def _smallest_uid_hashes(uids: pa.Array, count: int) -> np.ndarray:
    """Positions of the `count` uids of smallest hash (then uid), in that order."""
    keys, _ = cols.hex_prefix_uint64(uids, 16)
    order = pc.sort_indices(pa.table({"key": keys, "uid": uids}), sort_keys=[("key", "ascending"), ("uid", "ascending")])
    return order.slice(0, count).to_numpy()


def smallest_probes(tables, count: int) -> Optional[pa.Table]:
    """The `count` rows of smallest uid hash among `tables`, in that order: the same sample
    whichever way the rows were split (a combine function: its result is one of its inputs' kind)."""
    tables = [t for t in tables if t is not None and t.num_rows]
    if not tables:
        return None
    table = pa.concat_tables(tables)
    return cols.take(table, _smallest_uid_hashes(cols.column(table, Col.UID), count))


def _pool_of(table: pa.Table) -> nn.Pool:
    units, _ = cols.vectors_of(cols.column(table, _VECTOR))
    return nn.Pool(
        vectors=nn.search_vectors(units),
        caption_ids=nn.caption_ids(cols.column(table, _CAPTION_KEY).to_numpy(zero_copy_only=False),
                                   cols.column(table, Col.CAPTION)),
        hashes=cols.uint64_matrix(cols.column(table, _HASHES)),
        present=_unpack(cols.column(table, _HASHES_PRESENT), 2),
    )


def exact_reference(pool: nn.Pool, uids: pa.Array, count: int, home: np.ndarray, s: dict) -> pa.Table:
    """The sampled queries' best neighbours among one partition's own samples (rank 0: each
    sample is at home in one partition), by the search's rules (_RECALL_SCHEMA): with every
    partition's, the exact search over all kept samples. The queries are the pool's first `count`
    rows and `home` the pool rows of the partition's own samples; `uids` names every pool row."""
    if not len(home):
        return _RECALL_SCHEMA.empty_table()
    searched = np.r_[np.arange(count), home]
    reference = pool.take(searched)
    # a query's own row, when it is at home here, is no neighbour of it: one more is searched and it is left out
    own = pc.fill_null(pc.index_in(uids.slice(0, count), value_set=uids.take(pa.array(home))), -1 - count).to_numpy(
        zero_copy_only=False).astype(np.int64) + count
    found, scores = nn.group_neighbours(reference, np.arange(count), s["k"] + 1, s["ceiling"],
                                        s["negatives_radius"], first=count)
    found = np.where(found == own[:, None], -1, found)
    order = np.argsort(found < 0, axis=1, kind="stable")[:, :s["k"]]
    found, scores = np.take_along_axis(found, order, axis=1), np.take_along_axis(scores, order, axis=1)
    rows, positions = np.nonzero(found >= 0)
    named = uids.take(pa.array(searched))
    return pa.table({Col.UID: named.take(pa.array(rows)), _NEIGHBOUR: named.take(pa.array(found[rows, positions])),
                     _SCORE: scores[rows, positions]}, schema=_RECALL_SCHEMA)


def recall_counts(exact: list, found: list, k: int) -> tuple[int, int, int]:
    """(queries, exact neighbours, of them found): the partitions' references (_RECALL_SCHEMA
    tables) merged into each sampled query's k best (score, then uid), against the (uid,
    neighbour) pairs the search found."""
    exact = [t for t in exact if t is not None and t.num_rows]
    if not exact:
        return 0, 0, 0
    table = pa.concat_tables(exact).sort_by([(Col.UID, "ascending"), (_SCORE, "descending"), (_NEIGHBOUR, "ascending")])
    uids = table[Col.UID].to_pylist()
    neighbours = table[_NEIGHBOUR].to_pylist()
    truth: dict = {}
    for uid, neighbour in zip(uids, neighbours):
        best = truth.setdefault(uid, [])
        if len(best) < k:
            best.append(neighbour)
    pairs = {(u, n) for t in found if t is not None for u, n in zip(t[Col.UID].to_pylist(), t[_NEIGHBOUR].to_pylist())}
    hits = sum((uid, n) in pairs for uid, best in truth.items() for n in best)
    return len(truth), sum(len(best) for best in truth.values()), hits


class _Recall(beam.DoFn):
    """One space's references and found pairs -> the recall counters (negatives/SPACE_recall_*)."""

    def __init__(self, space: str, k: int):
        self._k = k
        self._counters = {name: Metrics.counter("negatives", f"{space}_recall_{name}") for name in ("queries", "exact", "found")}

    def process(self, _, exact, found):
        queries, truth, hits = recall_counts(exact, found, self._k)
        for name, value in (("queries", queries), ("exact", truth), ("found", hits)):
            self._counters[name].inc(value)
        yield queries, truth, hits


class _Negatives(beam.DoFn):
    """(partition, spill paths) of one space -> its kept samples' neighbours (_NEIGHBOUR_SCHEMA),
    by uid range."""

    def __init__(self, space: str, settings: dict):
        self._space = space
        self._kind = NEIGHBOUR_KINDS.index(space)
        self._s = settings
        self._searched = Metrics.counter("negatives", f"{space}_searched")
        self._group_size = Metrics.distribution("negatives", "group_size")

    def process(self, partition_and_paths, dropped, kept, counts, probes=None):
        s = self._s
        _, paths = partition_and_paths
        add_pass_rows("decide", "negatives", 0)
        nn.configure_threads()
        table = _kept_rows(paths, dropped)
        if table is None:
            return
        self._total = 2 * counts["remaining"]
        exact = kept <= s["exact_max"]
        if exact:
            table = _one_row_per_uid(table)
            bounds = [(0, table.num_rows)]
        else:
            table = table.sort_by([(_CELL, "ascending"), (Col.UID, "ascending")])
            cells = cols.column(table, _CELL).to_numpy(zero_copy_only=False)
            starts = np.flatnonzero(np.r_[True, cells[1:] != cells[:-1]])
            bounds = list(zip(starts.tolist(), np.r_[starts[1:], len(cells)].tolist()))
        at_home = cols.column(table, _RANK).to_numpy(zero_copy_only=False) == 0
        # a group's queries: every sample of the one exact group, else the samples at home there
        homes = [None] if exact else [np.flatnonzero(at_home[start:stop]) for start, stop in bounds]
        count = probes.num_rows if probes is not None else 0
        # one pool for the partition (and the sampled queries before its rows, when there are
        # any: one caption-id space for both); each group searches a slice of it
        searched = pa.concat_tables([probes.select(_PROBE_COLUMNS), table.select(_PROBE_COLUMNS)]) if count else table
        pool = _pool_of(searched)
        if count:
            home = count + np.flatnonzero(at_home)
            yield beam.pvalue.TaggedOutput(RECALL_EXACT, exact_reference(pool, cols.column(searched, Col.UID), count, home, s))
        outputs = []
        for (start, stop), home in zip(bounds, homes):
            outputs.append(self._search(table.slice(start, stop - start), pool.take(slice(count + start, count + stop)), home))
        out = _concat(outputs, _NEIGHBOUR_SCHEMA)
        if count and out.num_rows:
            sampled = out.filter(pc.is_in(out[Col.UID], value_set=probes[Col.UID]))
            yield beam.pvalue.TaggedOutput(RECALL_FOUND, sampled.select([Col.UID, _NEIGHBOUR]))
        if out.num_rows:
            yield partitioned(out, cols.uid_ranges(out[Col.UID], decision_files(counts["alive"], s["rows_per_file"])))

    def _search(self, group: pa.Table, pool: nn.Pool, home: Optional[np.ndarray]) -> pa.Table:
        s = self._s
        queries = np.arange(group.num_rows) if home is None else home
        self._group_size.update(group.num_rows)
        self._searched.inc(len(queries))
        add_pass_rows("decide", "negatives", len(queries), self._total)
        found, scores = nn.group_neighbours(pool, queries, s["k"], s["ceiling"], s["negatives_radius"])
        rows, positions = np.nonzero(found >= 0)
        if not len(rows):
            return _NEIGHBOUR_SCHEMA.empty_table()
        neighbours = found[rows, positions]
        uids = cols.column(group, Col.UID)
        captions = cols.column(group, Col.CAPTION)
        return pa.table({
            Col.UID: uids.take(pa.array(queries[rows])), _KIND: np.full(len(rows), self._kind, dtype=np.int8),
            _POSITION: positions.astype(np.int8), _NEIGHBOUR: uids.take(pa.array(neighbours)),
            _SCORE: scores[rows, positions], _NEIGHBOUR_CAPTION: captions.take(pa.array(neighbours)),
        }, schema=_NEIGHBOUR_SCHEMA)


# ------------------------------------------------------------------------------------------------
# decisions: per uid range
# ------------------------------------------------------------------------------------------------


def _caption_negative_lists(captions: list, enabled: bool) -> list:
    """caption_negatives of each caption, once per distinct caption (web alt text repeats)."""
    if not enabled:
        return [[] for _ in captions]
    made: dict = {}
    for text in captions:
        if text is not None and text not in made:
            made[text] = caption_negatives(text)
    return [made[text] if text is not None else [] for text in captions]


def _drop_map(tables) -> dict:
    table = _concat(tables, _DROP_SCHEMA)
    return dict(zip(table[Col.UID].to_pylist(), table[_SURVIVOR].to_pylist()))


def assemble_decisions(alive: pa.Table, exact: Optional[pa.Table], near: Optional[pa.Table],
                       neighbours: Optional[pa.Table], near_survivor: dict, s: dict) -> pa.Table:
    """One uid range's rows -> its decisions table (DECISIONS_SCHEMA), sorted by uid."""
    alive = alive.sort_by([(Col.UID, "ascending")])
    uids = alive[Col.UID].to_pylist()
    filter_reason = alive[_FILTER_REASON].to_pylist()
    near_map = dict(zip(near[Col.UID].to_pylist(), near[_SURVIVOR].to_pylist())) if near is not None else {}
    exact_map = dict(zip(exact[Col.UID].to_pylist(), exact[_SURVIVOR].to_pylist())) if exact is not None else {}
    status, reason, duplicate_of = [], [], []
    for uid, filtered in zip(uids, filter_reason):
        if filtered is not None:
            status.append(Status.DROPPED), reason.append(filtered), duplicate_of.append(None)
        elif uid in near_map:
            status.append(Status.DROPPED), reason.append(DropReason.DUPLICATE_NEAR.value)
            duplicate_of.append(near_map[uid])
        elif uid in exact_map:
            survivor = exact_map[uid]
            status.append(Status.DROPPED)
            if survivor in near_survivor:  # its group's best was itself near-dropped
                reason.append(DropReason.DUPLICATE_NEAR.value)
                duplicate_of.append(near_survivor[survivor])
            else:
                reason.append(DropReason.DUPLICATE_EXACT.value)
                duplicate_of.append(survivor)
        else:
            status.append(Status.KEPT), reason.append(None), duplicate_of.append(None)
    kept = np.array([value == Status.KEPT for value in status], dtype=bool)
    if s["mining"]:
        negatives = _negatives_column(alive, kept, neighbours, s)
    else:
        negatives = pa.nulls(len(uids), pa.list_(HARD_NEGATIVE_TYPE))
    return pa.table({
        Col.UID: alive[Col.UID], Col.STATUS: pa.array(status, pa.string()), Col.REASON: pa.array(reason, pa.string()),
        Col.ERROR_DETAIL: pa.nulls(len(uids), pa.string()), Col.DUPLICATE_OF: pa.array(duplicate_of, pa.string()),
        Col.HARD_NEGATIVES: negatives,
    }, schema=DECISIONS_SCHEMA)


def _negatives_column(alive: pa.Table, kept: np.ndarray, neighbours: Optional[pa.Table], s: dict) -> pa.Array:
    """list<HARD_NEGATIVE_TYPE>: for a kept uid its image neighbours, text neighbours (best
    first) and caption negatives; null for a dropped one. The neighbours stay Arrow columns (only
    the caption edits are made in Python)."""
    n = alive.num_rows
    parts_uid, parts_caption, parts_score, parts_kind, parts_row = [], [], [], [], []
    if neighbours is not None and neighbours.num_rows:
        rows = pc.fill_null(pc.index_in(neighbours[Col.UID], value_set=alive[Col.UID]), -1).to_numpy(
            zero_copy_only=False).astype(np.int64)
        mask = (rows >= 0) & kept[np.maximum(rows, 0)]
        table = neighbours.filter(pa.array(mask))
        rows = rows[mask]
        kinds = table[_KIND].to_numpy(zero_copy_only=False)
        positions = table[_POSITION].to_numpy(zero_copy_only=False)
        order = np.lexsort((positions, kinds, rows))
        table = cols.take(table, order)
        parts_row.append(rows[order])
        parts_uid.append(cols.column(table, _NEIGHBOUR))
        parts_caption.append(cols.column(table, _NEIGHBOUR_CAPTION))
        parts_score.append(cols.column(table, _SCORE).cast(pa.float32()))
        parts_kind.append(pa.array(NEIGHBOUR_KINDS, pa.string()).take(pa.array(kinds[order].astype(np.int64))))
    captions = alive[Col.CAPTION].to_pylist()
    kept_rows = np.flatnonzero(kept)
    made = _caption_negative_lists([captions[i] for i in kept_rows.tolist()], s["captions"])
    edit_rows = np.repeat(kept_rows, [len(m) for m in made])
    parts_row.append(edit_rows)
    parts_uid.append(pa.nulls(len(edit_rows), pa.string()))
    parts_caption.append(pa.array([text for m in made for text, _ in m], pa.string()))
    parts_score.append(pa.nulls(len(edit_rows), pa.float32()))
    parts_kind.append(pa.array([kind for m in made for _, kind in m], pa.string()))
    rows = np.concatenate(parts_row)
    # neighbours first (sorted above), caption edits after them: a stable sort by row keeps that
    take = pa.array(np.argsort(rows, kind="stable"))
    offsets = np.r_[0, np.cumsum(np.bincount(rows, minlength=n))].astype(np.int32)
    values = pa.StructArray.from_arrays(
        [pa.concat_arrays(parts).take(take) for parts in (parts_uid, parts_caption, parts_score, parts_kind)],
        fields=list(HARD_NEGATIVE_TYPE))
    return pa.ListArray.from_arrays(pa.array(offsets), values, mask=pa.array(~kept))


def _write_decisions(range_and_groups, counts, near_survivor, directory: str, settings: dict):
    """(uid range, {alive, exact, near, neighbours: [paths...]}) -> its decisions file."""
    index, groups = range_and_groups
    add_pass_rows("decide", "decisions", 0)
    alive = read_partition(_paths(groups[SPILL_ALIVE]))
    if alive is None or not alive.num_rows:
        return
    decisions = assemble_decisions(
        alive, read_partition(_paths(groups["exact_drops"])), _concat(list(groups["near_drops"]), _DROP_SCHEMA),
        read_partition(_paths(groups["neighbours"])), near_survivor, settings)
    total = decision_files(counts["alive"], settings["rows_per_file"])
    path = join_path(directory, f"decisions-{index:05d}-of-{total:05d}.parquet")
    from transforms.write_output import write_table_file

    write_table_file(path, decisions)
    add_pass_rows("decide", "decisions", decisions.num_rows, counts["alive"])
    yield decisions.num_rows


def _write_empty_decisions(_, counts, directory: str):
    if counts["alive"] == 0:
        path = join_path(directory, "decisions-00000-of-00001.parquet")
        from transforms.write_output import parquet_bytes

        write_atomically(path, parquet_bytes(DECISIONS_SCHEMA.empty_table()))
    return []


# ------------------------------------------------------------------------------------------------
# the graph
# ------------------------------------------------------------------------------------------------


def _read(pipeline, layout: Layout, label: str, columns: list[str]):
    # validate=False: the files are looked for when the job runs, not while the graph is built
    # (on Dataflow that lookup would need GCS from the launcher); the CLI checks the phase order
    return pipeline | label >> beam.io.ReadFromParquetBatched(layout.features_glob(), columns=columns, validate=False)


def _alive_rows(table: pa.Table) -> int:
    return int(pc.sum(pc.equal(table[Col.STATUS], Status.KEPT)).as_py() or 0)


def build_decide(pipeline: beam.Pipeline, config: CurateConfig, layout: Layout):
    validate(config)
    declare_passes("decide", PASSES)
    s = _settings(config)
    work = layout.work("decide")

    # --- counts and the global CLIP cutoff ---------------------------------------------------
    filter_batches = _read(pipeline, layout, "ReadFilterColumns", _FILTER_COLUMNS)  # pa.Table
    side = {}
    if config.clip_keep_top_percent is not None:
        cutoff = (
            filter_batches
            | "AliveScores" >> beam.FlatMap(lambda t: [s for s in cols.float_column(_alive(t), Col.CLIP_SCORE).tolist()
                                                        if math.isfinite(s)])
            | GlobalClipCutoff(config)
        )  # float
        side["cutoff"] = beam.pvalue.AsSingleton(cutoff, default_value=float("-inf"))
    counts = beam.pvalue.AsSingleton(
        filter_batches
        | "CountRows" >> beam.ParDo(_Counts(config), **side)  # {alive, remaining} per batch
        | "SumCounts" >> beam.CombineGlobally(_sum_counts)  # {alive, remaining}
    )
    filter_batches | "ProgressCount" >> ReportPass("decide", "count", rows=_alive_rows)

    # --- the groups of each space ------------------------------------------------------------
    sample_batches = _read(pipeline, layout, "ReadSampleColumns", _FILTER_COLUMNS + list(_EMBEDDING_COLUMNS.values()))
    sample_batches | "ProgressSample" >> ReportPass("decide", "sample", rows=_alive_rows)
    partitionings = beam.pvalue.AsDict(
        sample_batches
        | "Sample" >> beam.ParDo(_Sample(config, s), counts=counts, **side)  # (space, (keys, units))
        | "SampleBySpace" >> beam.GroupByKey()  # (space, [(keys, units), ...])
        | "Train" >> beam.Map(_train, counts=counts, settings=s)  # (space, Partitioning)
    )

    # --- the main pass -----------------------------------------------------------------------
    batches = _read(pipeline, layout, "ReadFeatures", DECIDE_COLUMNS)  # pa.Table
    batches | "ProgressSpill" >> ReportPass("decide", "spill", rows=_alive_rows)
    spilled = batches | "Verdicts" >> beam.ParDo(_MainPass(config, s), counts=counts, partitionings=partitionings,
                                                 **side).with_outputs(SPILL_ALIVE, SPILL_EXACT, SPILL_IMAGE, SPILL_TEXT)
    alive = spilled[SPILL_ALIVE] | SpillBatches(work, SPILL_ALIVE)  # (uid range, paths)

    # --- exact dedup -------------------------------------------------------------------------
    empty_drops = pipeline | "NoDrops" >> beam.Create([], reshuffle=False)
    if s["dedup_exact"]:
        exact = (
            spilled[SPILL_EXACT]
            | SpillBatches(work, SPILL_EXACT)  # (sha partition, paths)
            | "ExactDedup" >> beam.ParDo(_ExactDedup(), counts=counts)  # _DROP_SCHEMA table
        )
    else:
        exact = empty_drops
    exact_dropped = beam.pvalue.AsSingleton(
        exact | "ExactDroppedUids" >> beam.CombineGlobally(_uid_set).without_defaults(), default_value=pa.array([], pa.string()))
    exact_by_range = (
        exact
        | "ExactByRange" >> beam.Map(lambda t, c: partitioned(t, cols.uid_ranges(t[Col.UID], decision_files(
            c["alive"], s["rows_per_file"]))), c=counts)
        | SpillBatches(work, "exact_drops")
    )

    # --- near dedup --------------------------------------------------------------------------
    image = spilled[SPILL_IMAGE] | SpillBatches(work, SPILL_IMAGE)  # (partition, paths)
    if s["dedup_near"]:
        verified = (
            image
            | "DedupGroups" >> beam.ParDo(
                lambda kp, c: _regroup(kp, c["remaining"] <= s["dedup_exact_max"]), c=counts)
            | "DedupPartitions" >> beam.GroupByKey()
            | "DedupPaths" >> beam.Map(_flatten_paths)  # (partition, paths)
            | "NearDedup" >> beam.ParDo(_NearDedup(s), exact_dropped=exact_dropped, counts=counts).with_outputs(
                _NearDedup.PAYLOADS, main="edges")
        )
        payloads = verified[_NearDedup.PAYLOADS] | SpillBatches(work, "payloads")  # (uid range, paths)
        clusters = (
            pipeline
            | "OneClusterStep" >> beam.Create([None])
            | "Clusters" >> beam.ParDo(_Clusters(s), edges=beam.pvalue.AsList(verified.edges), counts=counts).with_outputs(
                _Clusters.LARGE, _Clusters.REQUESTS, main="drops")
        )
        requests = clusters[_Clusters.REQUESTS] | SpillBatches(work, "requests")
        member_payloads = (
            {"requests": requests, "payloads": payloads}
            | "JoinPayloads" >> beam.CoGroupByKey()
            | "PayloadsOfRequests" >> beam.FlatMap(_payloads_for_requests)  # (component, (uid, payload))
        )
        resolved = (
            {"cluster": clusters[_Clusters.LARGE], "payloads": member_payloads}
            | "JoinClusters" >> beam.CoGroupByKey()
            | "ResolveClusters" >> beam.ParDo(_ResolveLarge(s))  # _DROP_SCHEMA table
        )
        near = (clusters.drops, resolved) | "NearDrops" >> beam.Flatten()
    else:
        near = empty_drops
    near_survivor = beam.pvalue.AsSingleton(
        near | "NearSurvivors" >> beam.CombineGlobally(_drop_dict).without_defaults(), default_value={})
    dropped = beam.pvalue.AsSingleton(
        (exact, near) | "AllDuplicates" >> beam.Flatten() | "DroppedUids" >> beam.CombineGlobally(_uid_set).without_defaults(),
        default_value=pa.array([], pa.string()))

    # --- negatives ---------------------------------------------------------------------------
    neighbour_spills = []
    if s["k"] > 0:
        text = spilled[SPILL_TEXT] | SpillBatches(work, SPILL_TEXT)
        for space, paths in (("image", image), ("text", text)):
            name = space.title()
            counted = paths | f"CountKept{name}" >> beam.ParDo(_CountKept(s["recall_queries"]), dropped=dropped).with_outputs(
                PROBES, main="counts")  # int per partition; PROBES: pa.Table of candidate queries
            kept = beam.pvalue.AsSingleton(counted.counts | f"SumKept{name}" >> beam.CombineGlobally(sum))
            probes = {}
            if s["recall_queries"]:
                probes["probes"] = beam.pvalue.AsSingleton(
                    counted[PROBES] | f"Probes{name}" >> beam.CombineGlobally(
                        lambda tables: smallest_probes(tables, s["recall_queries"])).without_defaults(),
                    default_value=None)  # pa.Table: the sampled queries of the recall estimate
            searched = (
                paths
                | f"{name}Groups" >> beam.ParDo(lambda kp, n: _regroup(kp, n <= s["exact_max"]), n=kept)
                | f"{name}Partitions" >> beam.GroupByKey()
                | f"{name}Paths" >> beam.Map(_flatten_paths)
                | f"{name}Negatives" >> beam.ParDo(_Negatives(space, s), dropped=dropped, kept=kept, counts=counts,
                                                   **probes).with_outputs(RECALL_EXACT, RECALL_FOUND, main="found")
            )
            # _NEIGHBOUR_SCHEMA tables by uid range, written where they are found: a Flatten of
            # the two spaces' tables would hold every neighbour in the runner until both are done
            neighbour_spills.append(searched.found | SpillBatches(work, f"neighbours_{space}"))  # (uid range, paths)
            if s["recall_queries"]:
                _ = (
                    pipeline
                    | f"OneRecall{name}" >> beam.Create([None])
                    | f"Recall{name}" >> beam.ParDo(
                        _Recall(space, s["k"]), exact=beam.pvalue.AsList(searched[RECALL_EXACT]),
                        found=beam.pvalue.AsList(searched[RECALL_FOUND]))  # (queries, exact, found)
                )
    neighbours = (
        neighbour_spills or [pipeline | "NoNeighbours" >> beam.Create([], reshuffle=False)]
    ) | "AllNeighbours" >> beam.Flatten()  # (uid range, paths), one element per space

    # --- decisions ---------------------------------------------------------------------------
    written = (
        {SPILL_ALIVE: alive, "exact_drops": exact_by_range, "near_drops": near_by_range_tables(near, counts, s),
         "neighbours": neighbours}
        | "JoinByRange" >> beam.CoGroupByKey()  # (uid range, {name: [paths...]})
        | "WriteDecisions" >> beam.FlatMap(_write_decisions, counts=counts, near_survivor=near_survivor,
                                           directory=layout.decisions, settings=s)  # rows written
    )
    pipeline | "OneEmpty" >> beam.Create([None]) | "WriteEmpty" >> beam.FlatMap(
        _write_empty_decisions, counts=counts, directory=layout.decisions)
    return written


def near_by_range_tables(near, counts, s):
    """Near drops (small tables) keyed by uid range, as the decisions join takes them."""
    return near | "NearRanges" >> beam.FlatMap(_split_by_range, counts=counts, rows_per_file=s["rows_per_file"])


def _split_by_range(table: pa.Table, counts, rows_per_file: int):
    ranges = cols.uid_ranges(table[Col.UID], decision_files(counts["alive"], rows_per_file))
    for value in np.unique(ranges).tolist():
        yield value, table.filter(pa.array(ranges == value))


def _uid_set(tables) -> pa.Array:
    tables = [t for t in tables if t is not None]
    if not tables:
        return pa.array([], pa.string())
    uids = [t[Col.UID] if isinstance(t, pa.Table) else t for t in tables]
    return pa.chunked_array([u.combine_chunks() if isinstance(u, pa.ChunkedArray) else u for u in uids],
                            type=pa.string()).combine_chunks()


def _drop_dict(tables) -> dict:
    result = {}
    for table in tables:
        if isinstance(table, dict):
            result.update(table)
        elif table is not None and table.num_rows:
            result.update(zip(table[Col.UID].to_pylist(), table[_SURVIVOR].to_pylist()))
    return result
