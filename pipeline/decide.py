"""Phase 2, decide: features table only (no image bytes) -> the decisions table.

Order of decisions: per-sample filters first (language, then CLIP score), then duplicate clusters
over what is left, so a cluster's survivor is always a sample that passes the filters. Each dropped
uid gets exactly one reason: the first filter that dropped it.
"""

from __future__ import annotations

import apache_beam as beam
import numpy as np

from pipeline.config import CurateConfig
from pipeline.layout import Layout
from schemas import DECISIONS_SCHEMA, Col, Status
from transforms.base import DropCounters
from transforms.caption import language_drop_reason
from transforms.clip_filter import clip_drop_reason, global_cutoff_side_input
from transforms.dedup import Deduplicate
from transforms.negatives import NEGATIVES_INPUT_COLUMNS, MineHardNegatives, merge_negatives
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


_EMBEDDINGS = (Col.IMAGE_EMBEDDING, Col.TEXT_EMBEDDING)


def alive_rows(table) -> list[dict]:
    """The kept rows of a features table as dicts, embeddings as float16 arrays (None where
    missing). Arrow converts the embeddings column by column: as lists of Python floats they
    would cost ~16 times the memory (a 512-d vector: ~20 KB as a list, 1 KB as an array), every
    join below holds them, and building those lists was a sixth of the phase's time."""
    import pyarrow.compute as pc

    table = table.filter(pc.equal(table[Col.STATUS], Status.KEPT))
    rows = table.drop_columns(list(_EMBEDDINGS)).to_pylist()
    for column in _EMBEDDINGS:
        lists = table[column].combine_chunks()
        values = lists.values.to_numpy(zero_copy_only=False).astype(np.float16, copy=False)
        offsets = lists.offsets.to_numpy()
        valid = lists.is_valid().to_numpy(zero_copy_only=False)
        for index, row in enumerate(rows):
            # a copy each: a view would keep the whole column alive as long as any row lives
            row[column] = values[offsets[index]:offsets[index + 1]].copy() if valid[index] else None
    return rows


def read_alive_features(pipeline: beam.Pipeline, layout: Layout):
    tables = pipeline | "ReadFeatures" >> beam.io.ReadFromParquetBatched(layout.features_glob(), columns=DECIDE_COLUMNS)
    return tables | "AliveRows" >> beam.FlatMap(alive_rows)


FILTER_DROPS = "filter_drops"


class _PerSampleFilters(beam.DoFn):
    """Per-sample filters in order (language, then CLIP score): a record that passes both goes on
    to dedup; one that fails gets the first filter's reason, tagged FILTER_DROPS. Deciding per
    record, with the only global statistic (the top-percent cutoff) as a side input, needs no
    join of drops back onto full records."""

    def __init__(self, config: CurateConfig):
        self._config = config
        self._drops = DropCounters("decide_filters")

    def process(self, record: dict, global_cutoff=None):
        reason = language_drop_reason(record.get(Col.LANG), self._config)
        if reason is None:
            reason = clip_drop_reason(record, self._config, global_cutoff)
        if reason is None:
            yield record
        else:
            self._drops.inc(reason.value)
            yield beam.pvalue.TaggedOutput(FILTER_DROPS, {Col.UID: record[Col.UID], Col.REASON: reason.value})


def apply_filters(alive, config: CurateConfig):
    """alive records -> (records that pass every filter, (uid, drop) for the rest)."""
    verdicts = alive | "Filters" >> beam.ParDo(
        _PerSampleFilters(config), **global_cutoff_side_input(alive, config)
    ).with_outputs(FILTER_DROPS, main="remaining")
    return verdicts.remaining, verdicts[FILTER_DROPS] | "KeyFilterDrops" >> beam.Map(_tag_order(0))


def duplicate_drops(remaining, config: CurateConfig) -> list:
    """Exact and near-duplicate clusters among the samples that passed the filters."""
    if not (config.dedup_exact or config.dedup_near):
        return []
    return [remaining | "Deduplicate" >> Deduplicate(config)]


def _kept_record(uid_and_groups):
    _, groups = uid_and_groups
    if groups["decision"] and groups["decision"][0][Col.STATUS] == Status.KEPT and groups["candidate"]:
        yield groups["candidate"][0]


DECISION = "decision"  # the decision's entry among a uid's negatives partials


def _decision_with_negatives(uid: str, entries, k: int) -> dict:
    """A uid's decision and its negatives partials (kept uids only) -> the decision with its list."""
    entries = list(entries)
    decision = dict(next(payload for kind, payload in entries if kind == DECISION))
    partials = [entry for entry in entries if entry[0] != DECISION]
    decision[Col.HARD_NEGATIVES] = merge_negatives(uid, partials, k)[1] if partials else None
    return decision


def with_hard_negatives(decisions, remaining, config: CurateConfig):
    """Mine negatives among the kept samples only, and attach them to their decisions. Kept samples
    are found by joining the decisions with the records that passed the filters, cut down first to
    the columns mining reads (the join holds all of them at once). The mined partials are grouped
    by uid together with the decisions, so merging and attaching is one shuffle, not two."""
    if config.negatives_k <= 0 and not config.negatives_captions:
        return decisions
    keyed_decisions = decisions | "KeyDecisions" >> beam.Map(lambda d: (d[Col.UID], d))
    candidates = remaining | "NegativesColumns" >> beam.Map(
        lambda r: (r[Col.UID], {column: r.get(column) for column in NEGATIVES_INPUT_COLUMNS})
    )
    kept = (
        {"candidate": candidates, "decision": keyed_decisions}
        | "JoinKept" >> beam.CoGroupByKey()
        | "KeptRecords" >> beam.FlatMap(_kept_record)
    )
    partials = MineHardNegatives(config).partials(kept)
    tagged_decisions = keyed_decisions | "TagDecisions" >> beam.MapTuple(lambda uid, d: (uid, (DECISION, d)))
    k = config.negatives_k
    return (
        partials + [tagged_decisions]
        | "DecisionsAndPartials" >> beam.Flatten()
        | "ByUid" >> beam.GroupByKey()
        | "AttachNegatives" >> beam.MapTuple(lambda uid, entries: _decision_with_negatives(uid, entries, k))
    )


def build_decide(pipeline: beam.Pipeline, config: CurateConfig, layout: Layout):
    alive = read_alive_features(pipeline, layout)

    remaining, filter_drops = apply_filters(alive, config)

    dup_drops = [
        drops | f"KeyDupDrop{i}" >> beam.Map(_tag_order(100 + i))
        for i, drops in enumerate(duplicate_drops(remaining, config))
    ]
    drops = [filter_drops] + dup_drops | "AllDrops" >> beam.Flatten()
    alive_uids = alive | "AliveUids" >> beam.Map(lambda r: (r[Col.UID], None))  # the join needs no more
    decisions = (
        {"alive": alive_uids, "drops": drops}
        | "JoinDecisions" >> beam.CoGroupByKey()
        | "Decide" >> beam.Map(_decision)
    )
    decisions = with_hard_negatives(decisions, remaining, config)
    decisions | "WriteDecisions" >> WriteTable(layout.decisions, "decisions", DECISIONS_SCHEMA, config.ledger_rows_per_file)
    return decisions
