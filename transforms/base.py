"""What every stage shares: records, drop marking, counting, and dead-letter routing.

A record is a plain dict keyed by `schemas.Col` names (cheap to pickle between Beam stages).
A stage's per-sample function takes a record and returns it, either still alive or marked dropped
with a `DropReason` via `mark_dropped`. `ApplyStage` wraps such a function in a DoFn that:
  - counts every drop per reason in Beam Metrics (namespace = stage name),
  - routes dropped records to the `dropped` output (they become ledger rows, never vanish),
  - turns an unexpected exception into an INTERNAL_ERROR drop instead of failing the bundle.
"""

from __future__ import annotations

import logging
import posixpath
import tarfile
import traceback
from typing import Callable, Iterable, Iterator, Optional

import apache_beam as beam
from apache_beam.metrics import Metrics

from schemas import Col, DropReason, Status

DROPPED = "dropped"
KEPT = "kept"

log = logging.getLogger(__name__)


def caption_of(record: dict) -> str:
    """The caption the models look at: the clean one, the raw one when there is none ("" if neither)."""
    caption = record.get(Col.CAPTION_CLEAN)
    if caption is None:
        caption = record.get(Col.CAPTION)
    return caption if isinstance(caption, str) else ""


def mark_dropped(record: dict, reason: DropReason, detail: Optional[str] = None) -> dict:
    """Mark a record dropped. The first reason wins: a later stage never overwrites it."""
    if record.get(Col.STATUS) == Status.DROPPED:
        return record
    record[Col.STATUS] = Status.DROPPED
    record[Col.REASON] = DropReason(reason).value
    if detail:
        record[Col.ERROR_DETAIL] = str(detail)[:500]
    return record


def is_dropped(record: dict) -> bool:
    return record.get(Col.STATUS) == Status.DROPPED


def iter_tar_members(handle, max_member_bytes: Optional[int] = None) -> Iterator[tuple[str, dict]]:
    """Stream a WebDataset tar as (key, {extension: bytes}): consecutive members share a key.

    Members over `max_member_bytes` are not read; they appear as `EXT_oversize` with no bytes.
    Tar errors propagate to the caller, which decides what a broken archive costs.
    """
    current, members = None, {}
    with tarfile.open(fileobj=handle, mode="r|*") as archive:
        for member in archive:
            if not member.isfile():
                continue
            key, _, ext = posixpath.basename(member.name).partition(".")
            ext = ext.lower()
            if current is not None and key != current:
                yield current, members
                members = {}
            current = key
            if max_member_bytes is not None and member.size > max_member_bytes:
                members[ext + "_oversize"] = b""
                continue
            extracted = archive.extractfile(member)
            members[ext] = extracted.read() if extracted else b""
    if current is not None:
        yield current, members


class DropCounters:
    """One Beam counter per drop reason (`dropped_REASON` in `namespace`), created on first use."""

    def __init__(self, namespace: str):
        self._namespace = namespace
        self._counters: dict[str, object] = {}

    def inc(self, reason: str) -> None:
        counter = self._counters.get(reason)
        if counter is None:
            counter = self._counters[reason] = Metrics.counter(self._namespace, f"dropped_{reason}")
        counter.inc()


class _StageDoFn(beam.DoFn):
    def __init__(self, stage_name: str, fn: Callable[[dict], dict], setup: Optional[Callable[[], None]] = None):
        self._stage_name = stage_name
        self._fn = fn
        self._setup_fn = setup
        self._seen = Metrics.counter(stage_name, "records_in")
        self._drops = DropCounters(stage_name)

    def setup(self):
        if self._setup_fn is not None:
            self._setup_fn()

    def process(self, record: dict) -> Iterable:
        self._seen.inc()
        if is_dropped(record):  # dropped upstream: pass along untouched
            yield beam.pvalue.TaggedOutput(DROPPED, record)
            return
        try:
            result = self._fn(record)
        except Exception as error:  # noqa: BLE001 - a stage bug must cost one row, not the job
            log.warning("%s failed on %s: %s", self._stage_name, record.get(Col.UID), error)
            detail = f"{self._stage_name}: {type(error).__name__}: {error}"
            result = mark_dropped(record, DropReason.INTERNAL_ERROR, detail + " | " + traceback.format_exc(limit=2))
        if is_dropped(result):
            self._drops.inc(result[Col.REASON])
            result.pop(Col.IMAGE_BYTES, None)  # dead letters never carry image bytes
            yield beam.pvalue.TaggedOutput(DROPPED, result)
        else:
            yield result


class ApplyStage(beam.PTransform):
    """Apply a pure per-record function; returns a tuple-like result with `.kept` and `.dropped`."""

    def __init__(self, stage_name: str, fn: Callable[[dict], dict], setup: Optional[Callable[[], None]] = None):
        super().__init__(label=stage_name)
        self._stage_name = stage_name
        self._fn = fn
        self._setup = setup

    def expand(self, records):
        return records | beam.ParDo(_StageDoFn(self._stage_name, self._fn, self._setup)).with_outputs(
            DROPPED, main=KEPT
        )
