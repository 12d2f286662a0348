"""Decide phase: per-sample filters (language, then CLIP score) decided record by record."""

from __future__ import annotations

import apache_beam as beam
import pytest
from apache_beam.testing.util import assert_that, equal_to

from pipeline.config import CurateConfig
from pipeline.decide import apply_filters
from schemas import Col, DropReason
from tests.conftest import in_process_pipeline
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
    config = CurateConfig(languages=["en"], clip_threshold=0.3)
    records = [
        _record("pass", "en", 0.5),
        _record("no_score", "en", None),
        _record("french_low", "fr", 0.1),  # fails both: the language filter comes first
        _record("german", "de", 0.9),
        _record("english_low", "en", 0.1),
    ]
    with in_process_pipeline() as p:
        remaining, drops = apply_filters(p | beam.Create(records), config)
        assert_that(remaining | beam.Map(lambda r: r[Col.UID]), equal_to(["pass", "no_score"]), label="remaining")
        assert_that(
            drops | beam.MapTuple(lambda uid, drop: (uid, drop[Col.REASON])),
            equal_to([
                ("french_low", DropReason.LANGUAGE_NOT_WANTED.value),
                ("german", DropReason.LANGUAGE_NOT_WANTED.value),
                ("english_low", DropReason.LOW_CLIP_SCORE.value),
            ]),
            label="drops",
        )


@pytest.mark.parametrize("top_percent", [25.0, 100.0])
def test_top_percent_cut_is_global_across_bundles(top_percent):
    config = CurateConfig(clip_keep_top_percent=top_percent, clip_threshold=0.9)
    records = [_record(f"r{i:03d}", "en", round(0.01 * i, 2)) for i in range(200)]
    expected_kept = round(200 * top_percent / 100)
    with in_process_pipeline() as p:
        remaining, _ = apply_filters(p | beam.Create(records) | beam.Reshuffle(), config)

        def check(rows):
            scores = sorted(r[Col.CLIP_SCORE] for r in rows)
            assert abs(len(scores) - expected_kept) <= 2
            assert scores[-1] == pytest.approx(1.99)  # the best are the ones kept

        assert_that(remaining, check)
