"""Phase 3, write: raw shards + decisions -> final shards, and features + decisions -> ledger.

Image bytes are shuffled exactly once, to their final shard; the shard and position of every kept
uid are computed from the decisions table alone (small), in global uid order.
"""

from __future__ import annotations

import apache_beam as beam
from apache_beam.io import fileio

from pipeline.config import CurateConfig
from pipeline.layout import Layout
from schemas import LEDGER_SCHEMA, SHARD_SCHEMA, Col, DropReason, Status
from transforms.base import mark_dropped
from transforms.read_input import buffered
from transforms.write_output import (
    AssignShardPositions,
    WriteFinalShards,
    WriteTable,
    read_tar_samples,
    shard_name,
)


class _ReadRawShard(beam.DoFn):
    def process(self, readable: fileio.ReadableFile):
        with readable.open() as handle:
            for key, image, meta in read_tar_samples(buffered(handle)):
                record = {name: (meta or {}).get(name) for name in SHARD_SCHEMA.names}
                record[Col.UID] = key
                record[Col.IMAGE_BYTES] = image
                yield key, record


def _to_shard_item(uid_and_groups):
    uid, groups = uid_and_groups
    # A dropped uid has no position; a kept uid without a raw sample is caught by the accounting.
    if groups["position"] and groups["raw"]:
        shard_index, position = groups["position"][0]
        record = groups["raw"][0]
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
    raw = (
        pipeline
        | "RawPattern" >> beam.Create([layout.raw_glob()])
        | "MatchRaw" >> fileio.MatchAll()
        | "OpenRaw" >> fileio.ReadMatches()
        | "ReadRaw" >> beam.ParDo(_ReadRawShard())
    )
    (
        {"raw": raw, "position": positions, "decision": keyed_decisions}
        | "JoinSamples" >> beam.CoGroupByKey()
        | "ToShards" >> beam.FlatMap(_to_shard_item)
        | "WriteShards" >> WriteFinalShards(layout.shards)
    )

    ledger_columns = [name for name in LEDGER_SCHEMA.names if name != Col.SHARD]
    features = pipeline | "ReadFeatures" >> beam.io.ReadFromParquet(layout.features_glob(), columns=ledger_columns)
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
