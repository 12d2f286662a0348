"""The error ceiling: a run in which most rows fail the same way is a broken run, not a small dataset.

Checked when `curate run|write` ends (on the ledger) and when `curate fetch` ends (on the features
table), after everything is written: the outputs stay for the user to inspect, but the exit code
(4, EXIT_CEILING) says they are not to be trusted. Three checks:
- internal_error rows over all rows above `max_internal_error_share` (our bug, or a stage meeting
  input it never foresaw: either way the rows are lost for a reason nobody chose);
- failed downloads over the rows that reached the download above `max_download_failure_share`
  (a dead mirror, a firewall, a rate-limited host: everything refused at once);
- no row kept at all (an empty dataset is never a success).

Ledgers have millions of rows: everything is read columnar, file by file (pyarrow.compute counts
the `reason` column; examples are taken from the first record batches that have them), never a
row at a time in Python.
"""

from __future__ import annotations

import collections
import json
from typing import Iterator, Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from schemas import BEFORE_DOWNLOAD_REASONS, DOWNLOAD_FAILURE_REASONS, Col, DropReason, Status

TOP_REASONS = 3
EXAMPLE_CHARS = 160
_DOWNLOAD_FAILURES = {reason.value for reason in DOWNLOAD_FAILURE_REASONS}
_BEFORE_DOWNLOAD = {reason.value for reason in BEFORE_DOWNLOAD_REASONS}


def _parquet_files(pattern: str) -> Iterator[pq.ParquetFile]:
    for metadata in sorted(FileSystems.match([pattern])[0].metadata_list, key=lambda m: m.path):
        with FileSystems.open(metadata.path, compression_type="uncompressed") as handle:
            yield pq.ParquetFile(handle)


def count_rows(pattern: str) -> tuple[int, int, collections.Counter]:
    """(rows, kept rows, drop reason -> rows) of a features or ledger table, one column read per file."""
    rows, kept, reasons = 0, 0, collections.Counter()
    for parquet in _parquet_files(pattern):
        table = parquet.read(columns=[Col.STATUS, Col.REASON])
        rows += table.num_rows
        kept += pc.sum(pc.equal(table[Col.STATUS], Status.KEPT)).as_py() or 0
        dropped = table.filter(pc.equal(table[Col.STATUS], Status.DROPPED))[Col.REASON]
        for entry in pc.value_counts(dropped).to_pylist():
            reasons[entry["values"]] += entry["counts"]
    return rows, kept, reasons


def examples(pattern: str, reasons: list[str]) -> dict[str, str]:
    """One example row per reason: its url (or caption) and error detail, from the first batches
    that have one. Reads three columns, a record batch at a time, and stops when every reason has one."""
    found: dict[str, str] = {}
    wanted = pa.array(reasons, pa.string())
    for parquet in _parquet_files(pattern):
        for batch in parquet.iter_batches(batch_size=65_536, columns=[Col.REASON, Col.URL, Col.CAPTION, Col.ERROR_DETAIL]):
            hits = pa.Table.from_batches([batch]).filter(pc.is_in(batch.column(0), value_set=wanted))
            for row in hits.slice(0, 1000).to_pylist():
                reason = row[Col.REASON]
                if reason not in found:
                    caption = json.dumps((row[Col.CAPTION] or "")[:60], ensure_ascii=False)
                    detail = f": {row[Col.ERROR_DETAIL]}" if row[Col.ERROR_DETAIL] else ""
                    found[reason] = f"{row[Col.URL] or '(no url)'} {caption}{detail}".replace("\n", " ")[:EXAMPLE_CHARS]
            if len(found) == len(reasons):
                return found
    return found


def _top(counts: collections.Counter, only: Optional[set] = None) -> list[tuple[str, int]]:
    items = [(reason, n) for reason, n in counts.items() if only is None or reason in only]
    return sorted(items, key=lambda item: (-item[1], item[0]))[:TOP_REASONS]


def _share(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.0f}%" if whole else "0%"


def breach(pattern: str, config, final: bool) -> Optional[str]:
    """The message (a headline and a few lines of reasons) when the table at `pattern` breaks a
    ceiling; None when it does not. `final`: the ledger of a finished run (else fetch's features)."""
    rows, kept, reasons = count_rows(pattern)
    failed = sum(n for reason, n in reasons.items() if reason in _DOWNLOAD_FAILURES)
    before = sum(n for reason, n in reasons.items() if reason in _BEFORE_DOWNLOAD)
    attempted = rows - before
    internal = reasons.get(DropReason.INTERNAL_ERROR.value, 0)
    what = "the ledger" if final else "the fetch phase"
    if rows == 0:
        return "NO INPUT ROWS: the input files held no rows, so the output is empty; check --input"
    if internal > config.max_internal_error_share * rows:
        headline = (f"ERROR CEILING: {internal:,} of {rows:,} rows ({_share(internal, rows)}) are internal_error in {what}, "
                    f"over max_internal_error_share={config.max_internal_error_share:g}")
        top, setting = [(DropReason.INTERNAL_ERROR.value, internal)], "max_internal_error_share"
    elif attempted and failed > config.max_download_failure_share * attempted:
        headline = (f"ERROR CEILING: {failed:,} of {attempted:,} downloads failed ({_share(failed, attempted)}), "
                    f"over max_download_failure_share={config.max_download_failure_share:g}")
        top, setting = _top(reasons, _DOWNLOAD_FAILURES), "max_download_failure_share"
    elif kept == 0:
        headline = f"NO SAMPLE KEPT: all {rows:,} rows were dropped in {what}"
        top, setting = _top(reasons), ""
    else:
        return None
    found = examples(pattern, [reason for reason, _ in top])
    lines = [headline, "top reasons:"]
    lines += [f"  {reason:<20} {n:>8,}  e.g. {found.get(reason, '')}" for reason, n in top]
    accept = f"; to accept it, --set {setting}=1" if setting else ""
    lines.append(f"the outputs are written (the report and ledger say what happened to every row){accept}")
    return "\n".join(lines)
