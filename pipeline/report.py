"""Accounting and the run report: read the ledger back, check nothing was lost, summarise.

The accounting check is the pipeline's promise made executable: every input row is exactly one
ledger row, kept or dropped with a reason from the closed enum, and the kept rows are exactly the
samples in the shards. A run that breaks it fails loudly instead of shipping a silent hole.
"""

from __future__ import annotations

import collections
import html
import json
from typing import Optional

import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from pipeline.layout import Layout
from schemas import REASON_DESCRIPTIONS, Col, DropReason, Status
from transforms.write_output import join_path, write_atomically


class AccountingError(RuntimeError):
    """Rows in != kept + dropped, or kept rows != shard samples."""


def _glob(pattern: str) -> list[str]:
    result = FileSystems.match([pattern])[0]
    return sorted(m.path for m in result.metadata_list)


def read_table(pattern: str, columns: Optional[list[str]] = None) -> Optional[pa.Table]:
    tables = []
    for path in _glob(pattern):
        with FileSystems.open(path) as handle:
            tables.append(pq.read_table(pa.BufferReader(handle.read()), columns=columns))
    return pa.concat_tables(tables) if tables else None


def account(layout: Layout) -> dict:
    """Count and check. Raises AccountingError when the ledger does not add up."""
    features = read_table(layout.features_glob(), [Col.UID])
    ledger = read_table(layout.ledger_glob(), [Col.UID, Col.STATUS, Col.REASON, Col.SHARD])
    shards = read_table(join_path(layout.shards, "*.parquet"), [Col.KEY])
    rows_in = features.num_rows if features is not None else 0
    ledger_rows = ledger.to_pylist() if ledger is not None else []
    status = collections.Counter(r[Col.STATUS] for r in ledger_rows)
    reasons = collections.Counter(r[Col.REASON] for r in ledger_rows if r[Col.STATUS] == Status.DROPPED)
    shard_samples = shards.num_rows if shards is not None else 0
    problems = []
    if len(ledger_rows) != rows_in:
        problems.append(f"ledger has {len(ledger_rows)} rows for {rows_in} input rows")
    if status[Status.KEPT] + status[Status.DROPPED] != len(ledger_rows):
        problems.append(f"rows with an unknown status: {dict(status)}")
    unknown = sorted(set(reasons) - {r.value for r in DropReason})
    if unknown or None in reasons:
        problems.append(f"drop reasons outside the enum: {unknown or [None]}")
    if status[Status.KEPT] != shard_samples:
        problems.append(f"{status[Status.KEPT]} kept ledger rows but {shard_samples} samples in shards")
    kept_uids = {r[Col.UID] for r in ledger_rows if r[Col.STATUS] == Status.KEPT}
    if shards is not None and set(shards.column(Col.KEY).to_pylist()) != kept_uids:
        problems.append("the uids in the shards differ from the kept uids of the ledger")
    summary = {
        "rows_in": rows_in,
        "kept": status[Status.KEPT],
        "dropped": status[Status.DROPPED],
        "drop_reasons": dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))),
        "shards": len(_glob(join_path(layout.shards, "*.tar"))),
        "shard_samples": shard_samples,
        "accounting_ok": not problems,
        "accounting_problems": problems,
    }
    if problems:
        raise AccountingError("; ".join(problems))
    return summary


def funnel_text(summary: dict) -> str:
    lines = [f"rows in:  {summary['rows_in']}", f"kept:     {summary['kept']}", f"dropped:  {summary['dropped']}"]
    for reason, count in summary["drop_reasons"].items():
        lines.append(f"  - {reason:<22} {count}")
    return "\n".join(lines)


def write_report(layout: Layout, summary: dict, phases: dict) -> str:
    summary = dict(summary, phases=phases)
    write_atomically(join_path(layout.report, "summary.json"), json.dumps(summary, indent=2, sort_keys=True).encode())
    rows = "".join(
        f"<tr><td>{html.escape(reason)}</td><td>{count}</td>"
        f"<td>{html.escape(REASON_DESCRIPTIONS[DropReason(reason)])}</td></tr>"
        for reason, count in summary["drop_reasons"].items()
    )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>curate report</title></head>
<body><h1>Curation report</h1>
<p>rows in: {summary['rows_in']} &middot; kept: {summary['kept']} &middot; dropped: {summary['dropped']}
&middot; shards: {summary['shards']}</p>
<table border="1"><tr><th>reason</th><th>rows</th><th>meaning</th></tr>{rows}</table>
</body></html>"""
    path = join_path(layout.report, "index.html")
    write_atomically(path, page.encode("utf-8"))
    return path
