"""Phase 2, decide: features table only (no image bytes) -> the decisions table.

Order of decisions: per-sample filters first (language, CLIP score), then duplicate clusters over
what is left, so a cluster's survivor is always a sample that passes the filters. Each dropped
uid gets exactly one reason: the first filter that dropped it.
"""

from __future__ import annotations

import apache_beam as beam
import numpy as np

from pipeline.config import CurateConfig
from pipeline.layout import Layout
from schemas import DECISIONS_SCHEMA, Col, Status
from transforms.caption import language_drop_reason
from transforms.dedup import Deduplicate
from transforms.negatives import MineHardNegatives
from transforms.write_output import WriteTable

# Columns the decide phase reads from the features table (never image bytes).
DECIDE_COLUMNS = [
    Col.UID, Col.STATUS, Col.SHA256, Col.PHASH, Col.PHASH_MIRROR, Col.DEDUP_DESCRIPTOR,
    Col.ORIGINAL_WIDTH, Col.ORIGINAL_HEIGHT, Col.LANG, Col.LANG_SCORE, Col.CLIP_SCORE,
    Col.IMAGE_EMBEDDING, Col.TEXT_EMBEDDING, Col.CAPTION, Col.CAPTION_CLEAN,
]


def _decision(uid_and_groups) -> dict:
    uid, groups = uid_and_groups
    drops = sorted(groups["drops"], key=lambda d: d["order"])
    decision = {Col.UID: uid, Col.STATUS: Status.KEPT, Col.REASON: None, Col.DUPLICATE_OF: None}
    if drops:
        first = drops[0]
        decision.update({Col.STATUS: Status.DROPPED, Col.REASON: first[Col.REASON]})
        decision[Col.DUPLICATE_OF] = first.get(Col.DUPLICATE_OF)
    return decision


def _tag_order(order: int):
    return lambda drop: (drop[Col.UID], dict(drop, order=order))


def _without(uid_and_groups):
    uid, groups = uid_and_groups
    if groups["alive"] and not groups["drops"]:
        yield groups["alive"][0]


def _language_drop(record: dict, config: CurateConfig):
    reason = language_drop_reason(record.get(Col.LANG), config)
    if reason is not None:
        yield {Col.UID: record[Col.UID], Col.REASON: reason.value}


def compact_embeddings(record: dict) -> dict:
    """Embeddings as float16 arrays: Parquet reads them as lists of Python floats, ~16 times the
    memory (a 512-d vector: ~20 KB as a list, 1 KB as an array), and every join below holds them."""
    for column in (Col.IMAGE_EMBEDDING, Col.TEXT_EMBEDDING):
        value = record.get(column)
        if value is not None:
            record[column] = np.asarray(value, dtype=np.float16)
    return record


def read_alive_features(pipeline: beam.Pipeline, layout: Layout):
    features = pipeline | "ReadFeatures" >> beam.io.ReadFromParquet(layout.features_glob(), columns=DECIDE_COLUMNS)
    alive = features | "Alive" >> beam.Filter(lambda r: r[Col.STATUS] == Status.KEPT)
    return alive | "CompactEmbeddings" >> beam.Map(compact_embeddings)


def filter_drops(alive, config: CurateConfig) -> list:
    """Per-sample filters: each returns a PCollection of {uid, reason}."""
    drops = []
    if config.languages:
        drops.append(alive | "LanguageFilter" >> beam.FlatMap(_language_drop, config=config))
    from transforms.clip_score import ClipScoreFilter  # imports torch: only where it is needed

    drops.append(alive | "ClipFilter" >> ClipScoreFilter(config))
    return drops


def duplicate_drops(remaining, config: CurateConfig) -> list:
    """Exact and near-duplicate clusters among the samples that passed the filters."""
    if not (config.dedup_exact or config.dedup_near):
        return []
    return [remaining | "Deduplicate" >> Deduplicate(config)]


def _kept_record(uid_and_groups):
    _, groups = uid_and_groups
    if groups["decision"] and groups["decision"][0][Col.STATUS] == Status.KEPT:
        yield groups["alive"][0]


def _attach_negatives(uid_and_groups) -> dict:
    _, groups = uid_and_groups
    decision = dict(groups["decision"][0])
    decision[Col.HARD_NEGATIVES] = groups["negatives"][0] if groups["negatives"] else None
    return decision


def with_hard_negatives(decisions, keyed_alive, config: CurateConfig):
    """Mine negatives among the kept samples only, and attach them to their decisions."""
    if config.negatives_k <= 0 and not config.negatives_captions:
        return decisions
    keyed_decisions = decisions | "KeyDecisions" >> beam.Map(lambda d: (d[Col.UID], d))
    kept = (
        {"alive": keyed_alive, "decision": keyed_decisions}
        | "JoinKept" >> beam.CoGroupByKey()
        | "KeptRecords" >> beam.FlatMap(_kept_record)
    )
    negatives = kept | "HardNegatives" >> MineHardNegatives(config)
    return (
        {"decision": keyed_decisions, "negatives": negatives}
        | "JoinNegatives" >> beam.CoGroupByKey()
        | "AttachNegatives" >> beam.Map(_attach_negatives)
    )


def build_decide(pipeline: beam.Pipeline, config: CurateConfig, layout: Layout):
    alive = read_alive_features(pipeline, layout)
    keyed_alive = alive | "KeyAlive" >> beam.Map(lambda r: (r[Col.UID], r))

    filtered = filter_drops(alive, config)
    keyed_filter_drops = [
        drops | f"KeyFilterDrop{i}" >> beam.Map(_tag_order(i)) for i, drops in enumerate(filtered)
    ]
    if keyed_filter_drops:
        all_filter_drops = keyed_filter_drops | "FilterDrops" >> beam.Flatten()
        remaining = (
            {"alive": keyed_alive, "drops": all_filter_drops}
            | "JoinFilterDrops" >> beam.CoGroupByKey()
            | "Remaining" >> beam.FlatMap(_without)
        )
    else:
        all_filter_drops = None
        remaining = alive

    dup_drops = [
        drops | f"KeyDupDrop{i}" >> beam.Map(_tag_order(100 + i))
        for i, drops in enumerate(duplicate_drops(remaining, config))
    ]
    every_drop = ([all_filter_drops] if all_filter_drops is not None else []) + dup_drops
    drops = (
        every_drop | "AllDrops" >> beam.Flatten()
        if every_drop
        else pipeline | "NoDrops" >> beam.Create([]).with_output_types(tuple)
    )
    alive_uids = alive | "AliveUids" >> beam.Map(lambda r: (r[Col.UID], None))  # the join needs no more
    decisions = (
        {"alive": alive_uids, "drops": drops}
        | "JoinDecisions" >> beam.CoGroupByKey()
        | "Decide" >> beam.Map(_decision)
    )
    decisions = with_hard_negatives(decisions, keyed_alive, config)
    decisions | "WriteDecisions" >> WriteTable(layout.decisions, "decisions", DECISIONS_SCHEMA, config.ledger_rows_per_file)
    return decisions
