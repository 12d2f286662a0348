"""ApplyStage, the DoFn every per-sample stage runs under: routing and counting."""

from __future__ import annotations

import apache_beam as beam
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.util import assert_that, equal_to

from schemas import Col, DropReason, Status
from transforms.base import ApplyStage, mark_dropped

ROWS = 785


def _rule(record: dict) -> dict:
    """Fails on multiples of 7, drops multiples of 3, keeps the rest."""
    number = record["n"]
    if number % 7 == 0:
        raise ValueError(f"bad row {number}")
    return mark_dropped(record, DropReason.CAPTION_TOO_SHORT) if number % 3 == 0 else record


def _rows():
    rows = [{Col.UID: f"{n:05d}", "n": n} for n in range(1, ROWS + 1)]
    rows.append({Col.UID: "upstream", "n": -1, Col.STATUS: Status.DROPPED, Col.REASON: "timeout"})
    return rows


def _run():
    pipeline = beam.Pipeline(runner=FnApiRunner())
    result = pipeline | beam.Create(_rows(), reshuffle=False) | ApplyStage("rule", _rule)
    kept = result.kept | "Kept" >> beam.Map(lambda r: r[Col.UID])
    dropped = result.dropped | "Dropped" >> beam.Map(lambda r: (r[Col.UID], r[Col.REASON]))
    expected_kept = [f"{n:05d}" for n in range(1, ROWS + 1) if n % 7 and n % 3]
    expected_dropped = [(f"{n:05d}", DropReason.INTERNAL_ERROR.value) for n in range(1, ROWS + 1) if not n % 7]
    expected_dropped += [(f"{n:05d}", DropReason.CAPTION_TOO_SHORT.value) for n in range(1, ROWS + 1)
                         if n % 7 and not n % 3]
    expected_dropped.append(("upstream", "timeout"))  # dropped upstream: passes untouched
    assert_that(kept, equal_to(expected_kept), label="kept")
    assert_that(dropped, equal_to(expected_dropped), label="dropped")
    outcome = pipeline.run()
    outcome.wait_until_finish()
    counters = outcome.metrics().query(MetricsFilter().with_namespace("rule"))["counters"]
    return {counter.key.metric.name: counter.committed for counter in counters}


def test_a_stage_routes_and_counts_every_row():
    """Kept rows go on; drops and failures (INTERNAL_ERROR) go to the dropped output with their
    reason and are counted per reason; a row dropped upstream passes untouched and uncounted."""
    counters = _run()
    failed = sum(1 for n in range(1, ROWS + 1) if not n % 7)
    too_short = sum(1 for n in range(1, ROWS + 1) if n % 7 and not n % 3)
    assert counters == {"records_in": ROWS + 1,
                        f"dropped_{DropReason.INTERNAL_ERROR.value}": failed,
                        f"dropped_{DropReason.CAPTION_TOO_SHORT.value}": too_short}
