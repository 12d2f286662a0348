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


def _to_shard_item(uid_and_groups):
    uid, groups = uid_and_groups
    # A dropped uid has no position; a kept uid without a fetched sample is caught by the accounting.
    # Repeated input rows share a uid: only the row whose image was stored is in "sample".
    if groups["position"] and groups["sample"]:
        shard_index, position = groups["position"][0]
        record = dict(groups["sample"][0])
        decision = groups["decision"][0] if groups["decision"] else {}
        record[Col.HARD_NEGATIVES] = decision.get(Col.HARD_NEGATIVES)
        yield shard_index, (position, record)


def _ledger_rows(uid_and_groups):
    uid, groups = uid_and_groups
    decision = groups["decision"][0] if groups["decision"] else None
    position = groups["position"][0] if groups["position"] else None
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
    keyed_decisions = decisions | "KeyDecisions" >> beam.Map(lambda d: (d[Col.UID], d))
    positions = (
        decisions
        | "KeptUids" >> beam.FlatMap(lambda d: [d[Col.UID]] if d[Col.STATUS] == Status.KEPT else [])
        | "Positions" >> AssignShardPositions(config.samples_per_shard)
    )
    features = pipeline | "ReadFeatures" >> beam.io.ReadFromParquet(layout.features_glob(), columns=_FEATURE_COLUMNS)
    samples = (
        features
        | "FetchedOnly" >> beam.Filter(lambda row: row[Col.RAW_FILE] is not None)
        | "KeySamples" >> beam.Map(lambda row: (row[Col.UID], row))
    )
    (
        {"sample": samples, "position": positions, "decision": keyed_decisions}
        | "JoinSamples" >> beam.CoGroupByKey()
        | "ToShards" >> beam.FlatMap(_to_shard_item)
        | "WriteShards" >> WriteFinalShards(layout.shards, layout.raw_shards)
    )

    ledger = (
        {
            "features": features | "KeyFeatures" >> beam.Map(lambda r: (r[Col.UID], r)),
            "decision": keyed_decisions,
            "position": positions,
        }
        | "JoinLedger" >> beam.CoGroupByKey()
        | "LedgerRows" >> beam.FlatMap(_ledger_rows)
    )
    ledger | "WriteLedger" >> WriteTable(layout.ledger, "ledger", LEDGER_SCHEMA, config.ledger_rows_per_file)
    return ledger
