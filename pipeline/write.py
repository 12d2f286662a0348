"""Phase 3, write: features + decisions -> final shards and the ledger.

Built like the decide phase for tens of millions of rows on one machine and the same graph on
Dataflow: no Python object per row crosses a shuffle, and no step holds more than one uid range.

  read features (uid)          -> how many rows, so how many ledger files (uid ranges)
  read decisions (uid, status) -> kept samples per uid range: each range's first global rank
  read features, decisions     -> spilled by uid range (transforms/spill.py)
  per uid range                -> the ledger file of the range (features joined with decisions,
                                  sorted by uid); the range's kept samples, in uid order, each
                                  with its global rank, to a file of its own, and for every shard
                                  they fall in, (shard, the slice of the file)
  per shard                    -> its slices read back, its images read from raw/ by offset,
                                  shards/NNNNN.tar + shards/NNNNN.parquet

Samples are in global uid order, `samples_per_shard` per shard, so the same input and config give
byte-identical shards. Image bytes are never shuffled: a shard writer reads its own images.
"""

from __future__ import annotations

import math

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import CurateConfig
from pipeline.layout import Layout
from pipeline.progress import ReportPass, add_pass_rows, declare_passes
from schemas import DECISIONS_SCHEMA, LEDGER_SCHEMA, SHARD_SCHEMA, Col, DropReason, Status
from transforms import batch as cols
from transforms.spill import SpillBatches, partitioned, read_partition, read_rows, write_spill_file
from transforms.write_output import (
    ReadsRawImages, TarWriter, add_sample, join_path, parquet_bytes, shard_name, write_atomically, write_table_file,
)

# One read of the features table serves both outputs: the ledger's columns (which include every
# shard Parquet column but the key and the negatives) and where each fetched image lies.
_FEATURE_COLUMNS = [name for name in LEDGER_SCHEMA.names if name != Col.SHARD] + [
    Col.RAW_FILE, Col.RAW_OFFSET, Col.RAW_LENGTH]
assert set(SHARD_SCHEMA.names) - {Col.KEY, Col.HARD_NEGATIVES} <= set(_FEATURE_COLUMNS)
# A kept sample as its shard writer reads it: the shard columns, the uid and where its image lies.
_SAMPLE_COLUMNS = [Col.UID] + [n for n in SHARD_SCHEMA.names if n != Col.KEY] + [Col.RAW_FILE, Col.RAW_OFFSET, Col.RAW_LENGTH]
_RANK = "rank"
PASSES = [("count", 0.03), ("spill", 0.2), ("ledger", 0.3), ("shards", 0.47)]


def ledger_files(rows: int, rows_per_file: int) -> int:
    return max(1, math.ceil(rows / max(1, rows_per_file)))


def _sum(values) -> int:
    return int(sum(values))


def _kept_per_range(table: pa.Table, rows: int, rows_per_file: int) -> np.ndarray:
    kept = table.filter(pc.equal(table[Col.STATUS], Status.KEPT))
    ranges = cols.uid_ranges(cols.column(kept, Col.UID), ledger_files(rows, rows_per_file))
    return np.bincount(ranges, minlength=ledger_files(rows, rows_per_file)).astype(np.int64)


def _add_arrays(arrays) -> np.ndarray:
    arrays = [a for a in arrays if a is not None]
    if not arrays:
        return np.zeros(0, dtype=np.int64)
    width = max(len(a) for a in arrays)
    total = np.zeros(width, dtype=np.int64)
    for a in arrays:
        total[:len(a)] += a
    return total


def ledger_and_samples(features: pa.Table, decisions: pa.Table, first_rank: int, samples_per_shard: int) -> tuple[pa.Table, pa.Table]:
    """One uid range's feature rows and decisions -> (its ledger rows, LEDGER_SCHEMA, sorted by
    uid then input position; its kept samples with a stored image, in uid order, with their global
    RANK). A fetched sample without a decision is an internal error, never silently kept."""
    decisions = decisions.sort_by([(Col.UID, "ascending")]) if decisions.num_rows > 1 else decisions
    features = features.sort_by([(Col.UID, "ascending", "at_start"), (Col.SOURCE_FILE, "ascending", "at_start"),
                                 (Col.SOURCE_ROW, "ascending", "at_start")])
    kept_decision = pc.equal(decisions[Col.STATUS], Status.KEPT).to_numpy(zero_copy_only=False)
    kept_uids = cols.column(decisions, Col.UID).filter(pa.array(kept_decision))
    ranks = first_rank + np.arange(len(kept_uids))
    # each feature row's decision (index into decisions, -1 for none)
    found = pc.fill_null(pc.index_in(features[Col.UID], value_set=decisions[Col.UID]), -1).to_numpy(
        zero_copy_only=False).astype(np.int64)
    alive = pc.equal(features[Col.STATUS], Status.KEPT).to_numpy(zero_copy_only=False)
    decided = alive & (found >= 0)
    orphan = alive & (found < 0)
    safe = np.maximum(found, 0)

    def from_decision(name: str) -> np.ndarray:
        return np.asarray(decisions[name].take(pa.array(safe)).to_pylist(), dtype=object)

    status = np.asarray(features[Col.STATUS].to_pylist(), dtype=object)
    reason = np.asarray(features[Col.REASON].to_pylist(), dtype=object)
    detail = np.asarray(features[Col.ERROR_DETAIL].to_pylist(), dtype=object)
    duplicate_of = np.asarray(features[Col.DUPLICATE_OF].to_pylist(), dtype=object)
    if decided.any():
        status[decided] = from_decision(Col.STATUS)[decided]
        reason[decided] = from_decision(Col.REASON)[decided]
        duplicate_of[decided] = from_decision(Col.DUPLICATE_OF)[decided]
    if orphan.any():
        status[orphan] = Status.DROPPED
        reason[orphan] = DropReason.INTERNAL_ERROR.value
        detail[orphan] = "no decision for a fetched sample"
    # shard of each kept ledger row: from its uid's global rank
    rank_of = pc.fill_null(pc.index_in(features[Col.UID], value_set=kept_uids), -1).to_numpy(zero_copy_only=False)
    in_shard = (rank_of >= 0) & decided & (status == Status.KEPT)
    shard = np.full(features.num_rows, None, dtype=object)
    if in_shard.any():
        shard[in_shard] = [shard_name(int(r) // samples_per_shard) for r in ranks[rank_of[in_shard]].tolist()]
    ledger = features.select([n for n in LEDGER_SCHEMA.names if n != Col.SHARD])
    for name, values in ((Col.STATUS, status), (Col.REASON, reason), (Col.ERROR_DETAIL, detail),
                         (Col.DUPLICATE_OF, duplicate_of)):
        ledger = ledger.set_column(ledger.schema.get_field_index(name), name, pa.array(values.tolist(), pa.string()))
    ledger = ledger.append_column(Col.SHARD, pa.array(shard.tolist(), pa.string())).select(LEDGER_SCHEMA.names)
    ledger = ledger.cast(LEDGER_SCHEMA)
    # the samples: the first stored row of each kept uid (repeated input rows share a uid)
    stored = in_shard & pc.is_valid(features[Col.RAW_FILE]).to_numpy(zero_copy_only=False)
    rows = np.flatnonzero(stored)
    if len(rows):
        uids = cols.column(features, Col.UID).take(pa.array(rows)).to_numpy(zero_copy_only=False)
        rows = rows[np.r_[True, uids[1:] != uids[:-1]]]
    samples = cols.take(features, rows)
    negatives = decisions[Col.HARD_NEGATIVES].take(pa.array(found[rows]))
    samples = samples.append_column(Col.HARD_NEGATIVES, negatives).select(_SAMPLE_COLUMNS)
    samples = samples.append_column(_RANK, pa.array(ranks[rank_of[rows]], pa.int64()))
    return ledger, samples


class _LedgerRange(beam.DoFn):
    """(uid range, {features, decisions}) -> the range's ledger file; (shard, (samples file, first
    row, stop row)) for every shard its kept samples fall in."""

    def __init__(self, layout: Layout, samples_per_shard: int, rows_per_file: int):
        self._layout = layout
        self._per_shard = samples_per_shard
        self._rows_per_file = rows_per_file

    def process(self, range_and_groups, rows: int, kept: np.ndarray):
        index, groups = range_and_groups
        add_pass_rows("write", "ledger", 0)
        features = read_partition(_paths(groups["features"]))
        if features is None or not features.num_rows:
            return
        decisions = read_partition(_paths(groups["decisions"]), schema=_DECISION_SPILL_SCHEMA)
        first_rank = int(kept[:index].sum()) if len(kept) else 0
        ledger, samples = ledger_and_samples(features, decisions, first_rank, self._per_shard)
        total = ledger_files(rows, self._rows_per_file)
        write_table_file(join_path(self._layout.ledger, f"ledger-{index:05d}-of-{total:05d}.parquet"), ledger)
        add_pass_rows("write", "ledger", ledger.num_rows, rows)
        if not samples.num_rows:
            return
        path = write_spill_file(self._layout.work("write"), f"samples-{index:05d}", samples)
        shards = samples[_RANK].to_numpy() // self._per_shard
        starts = np.flatnonzero(np.r_[True, shards[1:] != shards[:-1]])
        stops = np.r_[starts[1:], len(shards)]
        for start, stop in zip(starts.tolist(), stops.tolist()):
            yield int(shards[start]), (path, start, stop)


def _paths(groups) -> list:
    return [path for paths in groups for path in paths]


_DECISION_SPILL_SCHEMA = DECISIONS_SCHEMA


class _WriteShard(ReadsRawImages):
    """(shard index, [(samples file, start, stop), ...]) -> shards/NNNNN.tar + .parquet."""

    def __init__(self, directory: str, raw_directory: str):
        super().__init__(raw_directory)
        self._directory = directory

    def process(self, index_and_pieces):
        index, pieces = index_and_pieces
        add_pass_rows("write", "shards", 0)
        tables = [read_rows(path, start, stop) for path, start, stop in sorted(pieces)]
        samples = pa.concat_tables(tables).sort_by([(_RANK, "ascending")])
        records = samples.drop_columns([_RANK]).to_pylist()
        name = shard_name(index)
        from transforms.write_output import open_atomically

        with open_atomically(join_path(self._directory, f"{name}.tar")) as handle:
            writer = TarWriter(handle)
            for record in records:
                add_sample(writer, record, self._reader.read(record))
            writer.close()
        table = samples.append_column(Col.KEY, samples[Col.UID]).select(SHARD_SCHEMA.names).cast(SHARD_SCHEMA)
        write_atomically(join_path(self._directory, f"{name}.parquet"), parquet_bytes(table))
        add_pass_rows("write", "shards", len(records))
        yield name


def _write_empty_ledger(_, rows: int, directory: str):
    if rows == 0:  # readers still find a file with the schema
        write_atomically(join_path(directory, "ledger-00000-of-00001.parquet"), parquet_bytes(LEDGER_SCHEMA.empty_table()))
    return []


def build_write(pipeline: beam.Pipeline, config: CurateConfig, layout: Layout):
    declare_passes("write", PASSES)
    per_file, per_shard = int(config.ledger_rows_per_file), int(config.samples_per_shard)
    work = layout.work("write")
    uids = pipeline | "ReadFeatureUids" >> beam.io.ReadFromParquetBatched(layout.features_glob(), columns=[Col.UID], validate=False)
    uids | "ProgressCount" >> ReportPass("write", "count")
    rows = beam.pvalue.AsSingleton(
        uids | "CountRows" >> beam.Map(lambda t: t.num_rows) | "SumRows" >> beam.CombineGlobally(_sum))  # int
    decisions = pipeline | "ReadDecisions" >> beam.io.ReadFromParquetBatched(layout.decisions_glob(), validate=False)  # pa.Table
    kept = beam.pvalue.AsSingleton(
        decisions
        | "KeptPerRange" >> beam.Map(_kept_per_range, rows=rows, rows_per_file=per_file)  # [ranges] int64
        | "SumKept" >> beam.CombineGlobally(_add_arrays))
    features = pipeline | "ReadFeatures" >> beam.io.ReadFromParquetBatched(layout.features_glob(), columns=_FEATURE_COLUMNS, validate=False)
    features | "ProgressSpill" >> ReportPass("write", "spill")

    def by_range(table, n):
        return partitioned(table, cols.uid_ranges(cols.column(table, Col.UID), ledger_files(n, per_file)))

    spilled_features = features | "FeaturesByRange" >> beam.Map(by_range, n=rows) | SpillBatches(work, "features")
    spilled_decisions = (
        decisions
        | "DecisionsByRange" >> beam.Map(lambda t, n: by_range(t.cast(DECISIONS_SCHEMA), n), n=rows)
        | SpillBatches(work, "decisions"))
    pieces = (
        {"features": spilled_features, "decisions": spilled_decisions}
        | "JoinByRange" >> beam.CoGroupByKey()  # (range, {features: [paths], decisions: [paths]})
        | "Ledger" >> beam.ParDo(_LedgerRange(layout, per_shard, per_file), rows=rows, kept=kept)
        # (shard, (samples file, start, stop))
    )
    written = (
        pieces
        | "PiecesByShard" >> beam.GroupByKey()  # (shard, [pieces])
        | "WriteShards" >> beam.ParDo(_WriteShard(layout.shards, layout.raw_shards))  # shard name
    )
    pipeline | "One" >> beam.Create([None]) | "WriteEmptyLedger" >> beam.FlatMap(
        _write_empty_ledger, rows=rows, directory=layout.ledger)
    return written
