"""Decide phase: per-sample filters (language, then CLIP score) decided record by record."""

from __future__ import annotations

import pytest

from pipeline.config import CurateConfig
from pipeline.decide import filter_reasons
from schemas import Col, DropReason, to_table, FEATURES_SCHEMA
from tests.conftest import run_decide
from transforms.clip_filter import clip_drop_reason


def _record(uid, lang, score):
    return {Col.UID: uid, Col.LANG: lang, Col.CLIP_SCORE: score}


def test_clip_drop_reason_modes():
    absolute = CurateConfig(clip_threshold=0.3, clip_thresholds_per_lang={"de": 0.1})
    assert clip_drop_reason(_record("a", "en", 0.2), absolute) == DropReason.LOW_CLIP_SCORE
    assert clip_drop_reason(_record("a", "de", 0.2), absolute) is None  # its language's threshold
    assert clip_drop_reason(_record("a", "en", None), absolute) is None  # no score: dropped elsewhere
    top = CurateConfig(clip_threshold=0.9, clip_keep_top_percent=10.0)
    assert clip_drop_reason(_record("a", "en", 0.5), top, global_cutoff=0.6) == DropReason.LOW_CLIP_SCORE
    assert clip_drop_reason(_record("a", "en", 0.5), top, global_cutoff=0.4) is None  # threshold unused
    assert clip_drop_reason(_record("a", "en", 0.5), top, global_cutoff=None) is None  # empty dataset


def test_filters_pass_survivors_and_give_each_drop_its_first_reason():
    config = CurateConfig(languages=["en"], clip_threshold=0.3, clip_thresholds_per_lang={"de": 0.95})
    records = [
        _record("pass", "en", 0.5),
        _record("no_score", "en", None),
        _record("french_low", "fr", 0.1),  # fails both: the language filter comes first
        _record("german", "de", 0.9),
        _record("english_low", "en", 0.1),
        _record("no_lang", None, 0.9),  # "und" is not wanted either
    ]
    table = to_table(records, FEATURES_SCHEMA)
    reasons = filter_reasons(table, config, None).tolist()
    assert reasons == [None, None, DropReason.LANGUAGE_NOT_WANTED.value, DropReason.LANGUAGE_NOT_WANTED.value,
                       DropReason.LOW_CLIP_SCORE.value, DropReason.LANGUAGE_NOT_WANTED.value]
    # the batch form decides as the per-record functions do
    for record, reason in zip(records, reasons):
        expected = clip_drop_reason(record, CurateConfig(clip_threshold=0.3, clip_thresholds_per_lang={"de": 0.95}))
        if reason != DropReason.LANGUAGE_NOT_WANTED.value:
            assert reason == (expected.value if expected else None)


@pytest.mark.parametrize("top_percent", [25.0, 100.0])
def test_top_percent_cut_is_global_across_files(tmp_path, top_percent):
    records = [dict(_record(f"{i:032x}", "en", round(0.01 * i, 2)), **{Col.CAPTION: "a caption"}) for i in range(200)]
    decisions, _ = run_decide(records, tmp_path, clip_keep_top_percent=top_percent, clip_threshold=0.9,
                              negatives_k=0, negatives_captions=False)
    kept = sorted(round(0.01 * int(uid, 16), 2) for uid, row in decisions.items() if row[Col.STATUS] == "kept")
    assert abs(len(kept) - round(200 * top_percent / 100)) <= 2
    assert kept[-1] == pytest.approx(1.99)  # the best are the ones kept
    dropped = {row[Col.REASON] for row in decisions.values() if row[Col.STATUS] == "dropped"}
    assert dropped <= {DropReason.LOW_CLIP_SCORE.value}


def test_large_outputs_are_spilled_in_the_step_that_makes_them(tmp_path):
    """The in-memory runners keep a PCollection that crosses from one fused stage to the next in
    the runner process until it is consumed: a Flatten of both spaces' neighbour tables held every
    neighbour of the dataset there (2 GB at 1M rows). Each step that makes a table per partition
    hands it straight to its spill writer, and only (partition, paths) cross stages."""
    from collections import defaultdict

    from apache_beam.pipeline import PipelineVisitor

    from pipeline.decide import RECALL_EXACT, RECALL_FOUND, build_decide
    from pipeline.layout import Layout
    from tests.conftest import in_process_pipeline

    class Consumers(PipelineVisitor):
        def __init__(self):
            self.consumers, self.outputs = defaultdict(list), {}

        def visit_transform(self, node):
            for pcoll in node.inputs:
                self.consumers[pcoll].append(node.full_label)
            self.outputs[node.full_label] = list(node.outputs.items())

    pipeline = in_process_pipeline()
    build_decide(pipeline, CurateConfig(output=str(tmp_path)), Layout(str(tmp_path)))
    visitor = Consumers()
    pipeline.visit(visitor)
    makers = [label for label in visitor.outputs
              if label.split("/")[0] in ("Verdicts", "NearDedup", "ImageNegatives", "TextNegatives")]
    assert len(makers) == 4, makers
    spilled = 0
    for label in makers:
        for tag, pcoll in visitor.outputs[label]:
            consumers = visitor.consumers[pcoll]
            # untagged outputs of the multi-output steps: unused, or the verified pairs (a side input);
            # the recall estimate's tables (k rows per sampled query and partition) are side inputs
            if tag in (RECALL_EXACT, RECALL_FOUND):
                assert not consumers and label.startswith(("ImageNegatives", "TextNegatives")), (label, tag, consumers)
                continue
            assert consumers or (tag is None and label.startswith(("Verdicts", "NearDedup"))), (label, tag)
            assert all(c.startswith("Spill") and c.endswith("/Write") for c in consumers), (label, tag, consumers)
            spilled += len(consumers)
    assert spilled == 7  # alive, exact, image, text, payloads, neighbours of each space
