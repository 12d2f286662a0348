"""Phase 1, fetch: rows -> download -> validate/resize -> per-sample features.

Writes the features table (one row per input row, failures included, no image bytes) and the
survivors' images to raw tars, one set per bundle; the features table says where each image lies.
Image bytes never cross a shuffle, so memory stays flat however many rows come in.
"""

from __future__ import annotations

import functools
import logging

import apache_beam as beam
import imagehash

from pipeline.config import CurateConfig
from pipeline.layout import Layout
from pipeline.progress import ReportProgress
from schemas import FEATURES_SCHEMA, Col, DropReason, Status
from transforms.base import DROPPED, KEPT, is_dropped, mark_dropped
from transforms.caption import CaptionStage
from transforms.dedup import image_hashes
from transforms.decode import ImageRejected, apply_decoded, decode_image, sha256_hex
from transforms.download import FetchImages
from transforms.read_input import ReadRows, source_size
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


def _pick_row_survivor(uid_and_records):
    """Rows with the same uid (same url + caption): keep the first by input position."""
    uid, records = uid_and_records
    ordered = sorted(records, key=lambda r: (r.get(Col.SOURCE_FILE) or "", r.get(Col.SOURCE_ROW) or 0))
    yield ordered[0]
    for duplicate in ordered[1:]:
        duplicate[Col.DUPLICATE_OF] = uid
        duplicate.pop(Col.IMAGE_BYTES, None)
        yield beam.pvalue.TaggedOutput(DROPPED, mark_dropped(duplicate, DropReason.DUPLICATE_ROW))


class CollapseDuplicateRows(beam.PTransform):
    """Exact duplicate input rows are collapsed before anything is downloaded twice."""

    def expand(self, records):
        return (
            records
            | "ByUid" >> beam.Map(lambda r: (r[Col.UID], r))
            | "Group" >> beam.GroupByKey()
            | "Survivor" >> beam.FlatMap(_pick_row_survivor).with_outputs(DROPPED, main=KEPT)
        )


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
    rows = pipeline | "Read" >> ReadRows(config)
    rows | "ProgressRead" >> ReportProgress("fetch", "rows read")
    split = rows | "SplitMalformed" >> beam.Partition(lambda r, _: int(is_dropped(r)), 2)
    alive, dropped_early = split[0], split[1]
    unique = alive | "CollapseDuplicateRows" >> CollapseDuplicateRows()
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
    old = pipeline | "ReadFeatures" >> beam.io.ReadFromParquet(layout.features_glob())
    split = old | "SplitTransient" >> beam.Partition(lambda r, _: int(_is_transient_failure(r)), 2)
    unchanged, transient = split[0], split[1]
    fresh = transient | "Fresh" >> beam.Map(_as_fresh_row)
    survivors, dropped = process_rows(fresh, config, layout.raw_shards, f"retry{round_number}-")
    return _write_outputs(survivors, dropped, layout.features_staging, unchanged)
