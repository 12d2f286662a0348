"""Phase 3, write: features + decisions -> final shards and the ledger.

The shard and position of every kept uid are computed from the decisions table alone (small), in
global uid order. Only small rows are shuffled to their shard; each shard writer then reads its
images from the fetch phase's raw tars by offset, so image bytes are never shuffled.
"""

from __future__ import annotations

import apache_beam as beam

from pipeline.config import CurateConfig
from pipeline.layout import Layout
from schemas import LEDGER_SCHEMA, SHARD_SCHEMA, Col, DropReason, Status
from transforms.base import mark_dropped
from transforms.write_output import AssignShardPositions, WriteFinalShards, WriteTable, shard_name

# One read of the features table serves both outputs: the ledger's columns (which include every
# shard Parquet column but the key and the negatives) and where each fetched image lies.
_FEATURE_COLUMNS = [name for name in LEDGER_SCHEMA.names if name != Col.SHARD] + [
    Col.RAW_FILE, Col.RAW_OFFSET, Col.RAW_LENGTH]
assert set(SHARD_SCHEMA.names) - {Col.KEY, Col.HARD_NEGATIVES} <= set(_FEATURE_COLUMNS)


SHARD_ITEMS = "shard_items"  # tagged output of the join: (shard, (position, record)) per kept sample


def _ledger_rows_and_shard_items(uid_and_groups):
    """One join serves both outputs (a second join would hold every feature row again): the
    uid's ledger rows, and a shard item for a kept uid with a fetched sample."""
    uid, groups = uid_and_groups
    decision = groups["decision"][0] if groups["decision"] else None
    position = groups["position"][0] if groups["position"] else None
    # Repeated input rows share a uid: only the row whose image was stored has a raw location.
    stored = [row for row in groups["features"] if row[Col.RAW_FILE] is not None]
    if position is not None and stored:
        shard_index, offset_in_shard = position
        record = dict(stored[0])
        record[Col.HARD_NEGATIVES] = decision.get(Col.HARD_NEGATIVES) if decision else None
        yield beam.pvalue.TaggedOutput(SHARD_ITEMS, (shard_index, (offset_in_shard, record)))
    for row in groups["features"]:
        row = dict(row)
        if row[Col.STATUS] == Status.KEPT:
            if decision is None:
                mark_dropped(row, DropReason.INTERNAL_ERROR, "no decision for a fetched sample")
            else:
                row[Col.STATUS] = decision[Col.STATUS]
                row[Col.REASON] = decision[Col.REASON]
                row[Col.DUPLICATE_OF] = decision[Col.DUPLICATE_OF]
                if row[Col.STATUS] == Status.KEPT and position is not None:
                    row[Col.SHARD] = shard_name(position[0])
        yield row


def build_write(pipeline: beam.Pipeline, config: CurateConfig, layout: Layout):
    decisions = pipeline | "ReadDecisions" >> beam.io.ReadFromParquet(layout.decisions_glob())
    positions = (
        decisions
        | "KeptUids" >> beam.FlatMap(lambda d: [d[Col.UID]] if d[Col.STATUS] == Status.KEPT else [])
        | "Positions" >> AssignShardPositions(config.samples_per_shard)
    )
    features = pipeline | "ReadFeatures" >> beam.io.ReadFromParquet(layout.features_glob(), columns=_FEATURE_COLUMNS)
    joined = (
        {
            "features": features | "KeyFeatures" >> beam.Map(lambda r: (r[Col.UID], r)),
            "decision": decisions | "KeyDecisions" >> beam.Map(lambda d: (d[Col.UID], d)),
            "position": positions,
        }
        | "Join" >> beam.CoGroupByKey()
        | "LedgerRowsAndShardItems" >> beam.FlatMap(_ledger_rows_and_shard_items).with_outputs(SHARD_ITEMS, main="ledger")
    )
    joined[SHARD_ITEMS] | "WriteShards" >> WriteFinalShards(layout.shards, layout.raw_shards)
    ledger = joined.ledger
    ledger | "WriteLedger" >> WriteTable(layout.ledger, "ledger", LEDGER_SCHEMA, config.ledger_rows_per_file)
    return ledger
