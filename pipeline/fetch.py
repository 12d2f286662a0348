"""Phase 1, fetch: rows -> download -> validate/resize -> per-sample features.

Writes the features table (one row per input row, failures included, no image bytes) and the
survivors' images to raw tars, one set per bundle; the features table says where each image lies.
Image bytes never cross a shuffle, so memory stays flat however many rows come in.
"""

from __future__ import annotations

import functools
import logging
from typing import Optional

import apache_beam as beam
import imagehash
import numpy as np
import pyarrow as pa

from pipeline.config import CurateConfig
from pipeline.layout import Layout
from pipeline.progress import ReportProgress, count_input_rows
from schemas import FEATURES_SCHEMA, Col, DropReason, Status
from transforms.base import DROPPED, KEPT, is_dropped, mark_dropped
from transforms.caption import CaptionStage
from transforms.dedup import image_hashes
from transforms.decode import ImageRejected, apply_decoded, decode_image, sha256_hex
from transforms.download import FetchImages
from transforms.batch import hash_partitions
from transforms.read_input import ReadRows, fetch_chunk_rows, source_size
from transforms.spill import SpillBatches, partitioned, read_partition
from transforms.write_output import WriteRawImages, WriteTablePerBundle

log = logging.getLogger(__name__)


def decode_and_describe(record: dict, config: CurateConfig) -> dict:
    """Runs in the fetch worker's thread pool on each downloaded body (CPU work)."""
    data = record[Col.IMAGE_BYTES]
    # A shard given as input may say what its (resized) image was made from: then the sha256 and
    # the size rules are the original's (read_input.source_description)
    record[Col.SHA256] = record.get(Col.SHA256) or sha256_hex(data)
    try:
        decoded = decode_image(data, config, source_size(record))
    except ImageRejected as rejected:
        return mark_dropped(record, rejected.reason, rejected.detail)
    apply_decoded(record, decoded)
    if config.dedup_near:
        record.update(image_hashes(decoded.rgb, config.blank_std_threshold))
    else:  # the ledger's pHash only; the near-dedup descriptor is the costly part. pHash
        # reduces its input to 32x32 first: the blank check's 32x32 box thumbnail is that already
        record[Col.PHASH] = str(imagehash.phash(decoded.thumbnail))
    return record


_POSITION_SCHEMA = pa.schema([pa.field(Col.UID, pa.string()), pa.field(Col.SOURCE_FILE, pa.string()),
                              pa.field(Col.SOURCE_ROW, pa.int64())])
_POSITIONS_PER_TABLE = 8192
_POSITION_PARTITION_ROWS = 1 << 20
_UNKNOWN_INPUT_PARTITIONS = 256


def _positions(records: list) -> pa.Table:
    """Parsed input rows -> (uid, source file, source row) of those that were not malformed."""
    alive = [r for r in records if not is_dropped(r)]
    return pa.table({Col.UID: [r[Col.UID] for r in alive], Col.SOURCE_FILE: [r.get(Col.SOURCE_FILE) or "" for r in alive],
                     Col.SOURCE_ROW: [r.get(Col.SOURCE_ROW) or 0 for r in alive]}, schema=_POSITION_SCHEMA)


def repeated_uids(table) -> list:
    """One uid partition's positions -> (uid, (source file, source row)) of the first row by input
    position of every uid that occurs more than once."""
    if table is None or table.num_rows < 2:
        return []
    table = table.sort_by([(Col.UID, "ascending"), (Col.SOURCE_FILE, "ascending"), (Col.SOURCE_ROW, "ascending")])
    uids = table[Col.UID].to_numpy(zero_copy_only=False)
    repeated = np.flatnonzero(np.r_[True, uids[1:] != uids[:-1]] & np.r_[uids[1:] == uids[:-1], False])
    files = table[Col.SOURCE_FILE].take(pa.array(repeated)).to_pylist()
    rows = table[Col.SOURCE_ROW].take(pa.array(repeated)).to_pylist()
    return [(uid, (f, r)) for uid, f, r in zip(uids[repeated].tolist(), files, rows)]


def _mark_repeat(record: dict, first_rows: dict):
    """A row whose uid repeats an earlier row's (same url + caption) is dropped, pointing to it."""
    first = first_rows.get(record[Col.UID])
    if first is None or first == ((record.get(Col.SOURCE_FILE) or ""), record.get(Col.SOURCE_ROW) or 0):
        yield record
        return
    record[Col.DUPLICATE_OF] = record[Col.UID]
    record.pop(Col.IMAGE_BYTES, None)
    yield beam.pvalue.TaggedOutput(DROPPED, mark_dropped(record, DropReason.DUPLICATE_ROW))


class CollapseDuplicateRows(beam.PTransform):
    """Exact duplicate input rows are collapsed before anything is downloaded twice: the first row
    by input position goes on. Which uids repeat is found from a second read of the input that
    keeps only (uid, position), shuffled through files by uid partition (transforms/spill.py),
    so no step holds every input row; the repeated uids (a side input) are all a row is checked
    against."""

    def __init__(self, config: CurateConfig, work_directory: str, input_rows: Optional[int]):
        super().__init__()
        self._config = config
        self._work = work_directory
        self._input_rows = input_rows  # None for remote or very large inputs

    def expand(self, records):
        rows = self._input_rows
        partitions = max(1, -(-rows // _POSITION_PARTITION_ROWS)) if rows is not None else _UNKNOWN_INPUT_PARTITIONS
        first_rows = (
            records.pipeline
            | "ReadPositions" >> ReadRows(self._config, spread=False)  # record
            | "BatchPositions" >> beam.BatchElements(min_batch_size=_POSITIONS_PER_TABLE, max_batch_size=_POSITIONS_PER_TABLE)
            | "Positions" >> beam.Map(_positions)  # pa.Table (uid, source file, source row)
            | "ByUid" >> beam.Map(lambda t: partitioned(t, hash_partitions(t[Col.UID], partitions)))
            | SpillBatches(self._work, "positions")  # (partition, paths)
            | "Repeated" >> beam.FlatMap(lambda kp: repeated_uids(read_partition(kp[1])))  # (uid, first position)
        )
        return records | "MarkRepeats" >> beam.FlatMap(_mark_repeat, first_rows=beam.pvalue.AsDict(first_rows)).with_outputs(
            DROPPED, main=KEPT)


def process_rows(rows, config: CurateConfig, raw_dir: str, raw_prefix: str):
    """The per-sample chain of the fetch phase. Returns (survivors, [dropped...]); the survivors'
    images are in raw_dir by then, and the records say where."""
    captioned = rows | "Caption" >> CaptionStage(config)
    fetched = captioned.kept | "Fetch" >> FetchImages(config, functools.partial(decode_and_describe, config=config))
    if not config.clip_enabled:
        stored = fetched[KEPT] | "StoreImages" >> WriteRawImages(raw_dir, raw_prefix, config.raw_images_per_file)
        return stored, [captioned.dropped, fetched[DROPPED]]
    from transforms.clip_score import ClipScoring, scores_where_produced  # torch only when CLIP runs

    # Where CLIP can score rows as they come, the images go on to it in memory, in the stage that
    # downloads them: it scores while downloads go on. Else it reads them back from raw/ after a shuffle.
    inline = scores_where_produced(config)
    stored = fetched[KEPT] | "StoreImages" >> WriteRawImages(raw_dir, raw_prefix, config.raw_images_per_file,
                                                             keep_bytes=inline)
    scored = stored | "Clip" >> ClipScoring(config, raw_directory=raw_dir, images_inline=inline)
    return scored.kept, [captioned.dropped, fetched[DROPPED], scored.dropped]


def _write_outputs(survivors, dropped: list, features_dir: str, unchanged=None):
    """The features table, written per bundle (decide reads it back whole; never in a shuffle).
    The survivors are written where they are produced: a Flatten with the dropped rows would
    have the in-memory runner hold every survivor at once (a Flatten of PCollections from
    different stages is materialised before its consumer runs). The dropped rows, few and small
    (no embeddings), are gathered into files of their own; so are the rows a retry round carries
    over unchanged. Prefixes never extend one another: a sink's finalize deletes what matches
    its own PREFIX-*-of-N glob."""
    done = dropped + [survivors] + ([] if unchanged is None else [unchanged])
    for index, rows in enumerate(done):  # counted where they are produced
        rows | f"ProgressDone{index}" >> ReportProgress("fetch", "rows done")
    written = {"survivors": survivors, "dropped": dropped | "AllDropped" >> beam.Flatten()}
    if unchanged is not None:
        written["unchanged"] = unchanged
    for prefix, rows in written.items():
        rows | f"Write{prefix.capitalize()}Features" >> WriteTablePerBundle(features_dir, prefix, FEATURES_SCHEMA)
    return list(written.values()) | "AllRows" >> beam.Flatten()


def build_fetch(pipeline: beam.Pipeline, config: CurateConfig, layout: Layout):
    input_rows = count_input_rows(config)  # None for remote or very large inputs
    rows = pipeline | "Read" >> ReadRows(config, chunk_rows=fetch_chunk_rows(input_rows))
    rows | "ProgressRead" >> ReportProgress("fetch", "rows read")
    split = rows | "SplitMalformed" >> beam.Partition(lambda r, _: int(is_dropped(r)), 2)
    alive, dropped_early = split[0], split[1]
    unique = alive | "CollapseDuplicateRows" >> CollapseDuplicateRows(config, layout.work("fetch"), input_rows)
    # Caption rules are cheap and static: applied before download so no bandwidth is spent on
    # rows that would be dropped anyway.
    survivors, dropped = process_rows(unique[KEPT], config, layout.raw_shards, "")
    return _write_outputs(survivors, [dropped_early, unique[DROPPED]] + dropped, layout.features)


_INPUT_COLUMNS = (Col.UID, Col.SOURCE_FILE, Col.SOURCE_ROW, Col.URL, Col.CAPTION, Col.EXTRA)


def _is_transient_failure(record: dict) -> bool:
    reason = record.get(Col.REASON)
    return record[Col.STATUS] == Status.DROPPED and reason is not None and DropReason(reason).is_transient


def _as_fresh_row(record: dict) -> dict:
    fresh = {name: record.get(name) for name in _INPUT_COLUMNS}
    fresh[Col.STATUS] = Status.KEPT
    return fresh


def build_retry(pipeline: beam.Pipeline, config: CurateConfig, layout: Layout, round_number: int):
    """Re-fetch only the rows whose last failure was transient (timeouts, 5xx, 429, ...).

    Reads the current features table, writes the merged table to a staging folder (the caller
    swaps it into place) and the new survivors' images to raw tars of their own (`retryN-*.tar`).
    """
    old = pipeline | "ReadFeatures" >> beam.io.ReadFromParquet(layout.features_glob(), validate=False)
    split = old | "SplitTransient" >> beam.Partition(lambda r, _: int(_is_transient_failure(r)), 2)
    unchanged, transient = split[0], split[1]
    fresh = transient | "Fresh" >> beam.Map(_as_fresh_row)
    survivors, dropped = process_rows(fresh, config, layout.raw_shards, f"retry{round_number}-")
    return _write_outputs(survivors, dropped, layout.features_staging, unchanged)
