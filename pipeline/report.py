"""Accounting and the run report: read the outputs back, check nothing was lost, explain the rest.

The accounting check is the pipeline's promise made executable: every input row is exactly one
ledger row, kept or dropped with a reason from the closed enum, and the kept rows are exactly the
samples in the shards. A run that breaks it fails loudly instead of shipping a silent hole.

The report (`report/summary.json` + `report/index.html`) is built from the ledger, the shards'
Parquet, `run/*.json` and a few images from `raw/` and `shards/`; it never downloads anything.
- summary.json holds every figure the page shows. Apart from its `timings` block (wall clock,
  copied from run/*.json) it depends only on the ledger, the shards and the config, so it is
  byte-stable for identical inputs; re-running `curate report` on one folder rewrites it byte for
  byte.
- index.html is self-contained: plots are matplotlib PNGs and thumbnails small JPEGs, both inlined
  as data: URIs; no script, no external stylesheet, and URLs from the input are shown as text,
  never as links (they are untrusted: `javascript:` and friends are in the corpus on purpose).
"""

from __future__ import annotations

import base64
import collections
import html
import io
import json
import math
from typing import Any, Iterable, Iterator, Optional
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from pipeline.layout import PHASES, Layout
from schemas import LEDGER_SCHEMA, REASON_DESCRIPTIONS, Col, DropReason, Status
from transforms.write_output import RawImageReader, join_path, read_tar_samples, write_atomically


class AccountingError(RuntimeError):
    """Rows in != kept + dropped, or kept rows != shard samples."""


def _glob(pattern: str) -> list[str]:
    result = FileSystems.match([pattern])[0]
    return sorted(m.path for m in result.metadata_list)


def each_table(pattern: str, columns: Optional[list[str]] = None) -> Iterator[pa.Table]:
    """The files of `pattern` one at a time: what a report reads from an output of tens of millions
    of rows is filtered or counted file by file, never concatenated whole."""
    for path in _glob(pattern):
        with FileSystems.open(path, compression_type="uncompressed") as handle:
            parquet = pq.ParquetFile(handle)
            if columns is None:
                yield parquet.read()
            else:
                # Columns another stage has not landed yet (older outputs) are simply absent.
                present = set(parquet.schema_arrow.names)
                yield parquet.read(columns=[c for c in columns if c in present])


def _value_counts(values: pa.Array) -> dict:
    """{value: count} of an array (nulls as None), counted in Arrow."""
    counts = pc.value_counts(values)
    return dict(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist()))


def _read_columns(path: str, columns: list[str]) -> pa.Table:
    with FileSystems.open(path, compression_type="uncompressed") as handle:
        parquet = pq.ParquetFile(handle)
        return parquet.read(columns=[c for c in columns if c in parquet.schema_arrow.names])


def _uid_fingerprint(uids: pa.Array) -> np.ndarray:
    """(count, and two sums of the uids' hex halves mod 2^64): equal for equal multisets of uids
    whatever their order or files; two different sets match with probability ~2^-128."""
    from transforms.batch import hex_prefix_uint64

    uids = uids.combine_chunks() if isinstance(uids, pa.ChunkedArray) else uids
    high, _ = hex_prefix_uint64(uids, 16)
    low, _ = hex_prefix_uint64(pc.utf8_slice_codeunits(uids, 16, 32), 16)
    with np.errstate(over="ignore"):
        return np.array([len(uids), int(high.sum(dtype=np.uint64)), int(low.sum(dtype=np.uint64))], dtype=object)


def _add(total: np.ndarray, part: np.ndarray) -> np.ndarray:
    return np.array([total[0] + part[0], (total[1] + part[1]) % 2**64, (total[2] + part[2]) % 2**64], dtype=object)


def account(layout: Layout) -> dict:
    """Count and check. Raises AccountingError when the ledger does not add up. One file at a
    time: a ledger of tens of millions of rows is never held whole, nor checked row by row in
    Python (the kept uids and the shards' keys are compared as multisets by fingerprint)."""
    from pipeline.progress import count_table_rows

    rows_in = count_table_rows(layout.features_glob()) or 0
    status: collections.Counter = collections.Counter()
    reasons: collections.Counter = collections.Counter()
    kept = np.array([0, 0, 0], dtype=object)
    for path in _glob(layout.ledger_glob()):
        table = _read_columns(path, [Col.UID, Col.STATUS, Col.REASON])
        status.update(_value_counts(table.column(Col.STATUS)))
        dropped = table.filter(pc.equal(table.column(Col.STATUS), Status.DROPPED))
        reasons.update(_value_counts(dropped.column(Col.REASON)))
        kept = _add(kept, _uid_fingerprint(table.filter(pc.equal(table.column(Col.STATUS), Status.KEPT)).column(Col.UID)))
    ledger_rows = sum(status.values())
    keys = np.array([0, 0, 0], dtype=object)
    shard_files = _glob(join_path(layout.shards, "*.parquet"))
    for path in shard_files:
        keys = _add(keys, _uid_fingerprint(_read_columns(path, [Col.KEY]).column(Col.KEY)))
    shard_samples = int(keys[0])
    problems = []
    if ledger_rows != rows_in:
        problems.append(f"ledger has {ledger_rows} rows for {rows_in} input rows")
    if status[Status.KEPT] + status[Status.DROPPED] != ledger_rows:
        problems.append(f"rows with an unknown status: {dict(status)}")
    unknown = sorted(r for r in reasons if r is not None and r not in _ENUM_VALUES)
    if unknown or None in reasons:
        problems.append(f"drop reasons outside the enum: {unknown or [None]}")
    if status[Status.KEPT] != shard_samples:
        problems.append(f"{status[Status.KEPT]} kept ledger rows but {shard_samples} samples in shards")
    elif shard_files and list(kept) != list(keys):
        problems.append("the uids in the shards differ from the kept uids of the ledger")
    summary = {
        "rows_in": rows_in,
        "kept": status[Status.KEPT],
        "dropped": status[Status.DROPPED],
        "drop_reasons": dict(sorted(((r, c) for r, c in reasons.items() if r is not None), key=lambda kv: (-kv[1], kv[0]))),
        "shards": len(_glob(join_path(layout.shards, "*.tar"))),
        "shard_samples": shard_samples,
        "accounting_ok": not problems,
        "accounting_problems": problems,
    }
    if problems:
        raise AccountingError("; ".join(problems))
    return summary


# ---------------------------------------------------------------------------------------------
# Stages of the funnel: every drop reason belongs to the stage that drops it, in pipeline order.
# ---------------------------------------------------------------------------------------------

R = DropReason
FUNNEL_STAGES: list[tuple[str, str, tuple[DropReason, ...]]] = [
    ("input", "input rows parsed", (R.MALFORMED_ROW, R.MISSING_URL, R.INVALID_URL, R.UNSUPPORTED_SCHEME,
                                   R.DUPLICATE_ROW)),
    ("captions", "caption rules", (R.CAPTION_TOO_SHORT, R.CAPTION_TOO_LONG, R.CAPTION_BOILERPLATE)),
    ("fetch", "downloaded", (R.SSRF_BLOCKED, R.DNS_ERROR, R.CONNECTION_ERROR, R.TIMEOUT, R.TOO_MANY_REDIRECTS,
                             R.HTTP_CLIENT_ERROR, R.HTTP_SERVER_ERROR, R.RATE_LIMITED, R.BODY_TOO_LARGE,
                             R.ROBOTS_NOAI, R.NOT_AN_IMAGE, R.SOURCE_MISSING_IMAGE,
                             R.ROBOTS_DISALLOWED, R.TDM_RESERVED, R.AI_USAGE_REFUSED)),
    ("decode", "decoded, image rules", (R.DECODE_ERROR, R.DECOMPRESSION_BOMB, R.TOO_SMALL, R.BAD_ASPECT_RATIO,
                                        R.BLANK_IMAGE)),
    ("filters", "decide filters (language, CLIP)", (R.LANGUAGE_NOT_WANTED, R.LOW_CLIP_SCORE)),
    ("dedup", "deduplicated", (R.DUPLICATE_EXACT, R.DUPLICATE_NEAR)),
    # A stage that raised can be any of the above; counted last so the stages above stay exact.
    ("errors", "internal errors", (R.INTERNAL_ERROR,)),
]
REASON_STAGE: dict[str, str] = {r.value: stage for stage, _, reasons in FUNNEL_STAGES for r in reasons}
OTHER_STAGE = "errors"  # a reason added to the enum but not mapped here still gets counted
FETCH_ERROR_STAGES = ("fetch",)
DUPLICATE_REASONS = (R.DUPLICATE_EXACT.value, R.DUPLICATE_NEAR.value)
SHOW_SURVIVOR_REASONS = DUPLICATE_REASONS + (R.DUPLICATE_ROW.value,)
IMAGE_NEGATIVE_KINDS = ("image",)
CAPTION_NEGATIVE_KINDS = ("swap", "attribute", "object", "text")  # preferred first

EXAMPLES_PER_REASON = 4
HARD_NEGATIVE_TRIPLES = 4
_TRIPLE_CANDIDATES = 64  # anchors looked at for the triples (most have both kinds)
THUMBNAIL_PX = 96
TOP_LANGUAGES = 15
TOP_DOMAINS = 10
STATS_DIGITS = 4

LEDGER_REPORT_COLUMNS = [
    Col.UID, Col.URL, Col.CAPTION, Col.STATUS, Col.REASON, Col.ERROR_DETAIL, Col.DUPLICATE_OF, Col.SHARD,
    Col.HTTP_STATUS, Col.WIDTH, Col.HEIGHT, Col.ORIGINAL_WIDTH, Col.ORIGINAL_HEIGHT, Col.LANG, Col.LANG_SCORE,
    Col.CLIP_SCORE,
]


_ENUM_VALUES = {r.value for r in DropReason}


def reason_stage(reason: str) -> str:
    return REASON_STAGE.get(reason, OTHER_STAGE)


def funnel_text(summary: dict) -> str:
    lines = [f"rows in:  {summary['rows_in']}", f"kept:     {summary['kept']}", f"dropped:  {summary['dropped']}"]
    for reason, count in summary["drop_reasons"].items():
        lines.append(f"  - {reason:<22} {count}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Figures (pure: ledger columns in, JSON-ready dicts out)
# ---------------------------------------------------------------------------------------------


def _r(value: Optional[float]) -> Optional[float]:
    return None if value is None or not math.isfinite(value) else round(float(value), STATS_DIGITS)


def _share(part: int, whole: int) -> float:
    return round(part / whole, STATS_DIGITS) if whole else 0.0


def _stats(values: np.ndarray) -> dict:
    if values.size == 0:
        return {"count": 0}
    values = values.astype(np.float64)  # the ledger's numbers are held as float32
    q = np.quantile(values, [0.05, 0.25, 0.5, 0.75, 0.95])
    return {"count": int(values.size), "min": _r(values.min()), "p05": _r(q[0]), "p25": _r(q[1]),
            "median": _r(q[2]), "p75": _r(q[3]), "p95": _r(q[4]), "max": _r(values.max()),
            "mean": _r(values.mean())}


def _counts(values, top: Optional[int] = None) -> dict:
    counted = values if isinstance(values, collections.Counter) else collections.Counter(values)
    ordered = sorted(counted.items(), key=lambda kv: (-kv[1], str(kv[0])))
    return {str(k): v for k, v in (ordered[:top] if top else ordered)}


def funnel(rows_in: int, drop_reasons: dict) -> list[dict]:
    remaining, steps = rows_in, []
    for stage, label, reasons in FUNNEL_STAGES:
        mapped = {r.value for r in reasons}
        if stage == OTHER_STAGE:
            mapped |= {r for r in drop_reasons if r not in REASON_STAGE}
        here = {r: c for r, c in drop_reasons.items() if r in mapped}
        dropped = sum(here.values())
        remaining -= dropped
        steps.append({"stage": stage, "label": label, "dropped": dropped, "remaining": remaining,
                      "reasons": dict(sorted(here.items(), key=lambda kv: (-kv[1], kv[0])))})
    return steps


def reason_table(summary: dict) -> list[dict]:
    return [
        {"reason": reason, "stage": reason_stage(reason), "count": count,
         "share_of_rows": _share(count, summary["rows_in"]), "share_of_dropped": _share(count, summary["dropped"]),
         "description": REASON_DESCRIPTIONS[DropReason(reason)] if reason in _ENUM_VALUES else ""}
        for reason, count in summary["drop_reasons"].items()
    ]


def _threshold_info(config: dict) -> dict:
    return {
        "threshold": config.get("clip_threshold"),
        "thresholds_per_lang": dict(sorted((config.get("clip_thresholds_per_lang") or {}).items())),
        "keep_top_percent": config.get("clip_keep_top_percent"),
        "enabled": config.get("clip_enabled"),
    }


HIST_BINS = 40


def _histogram(groups: dict[str, np.ndarray], bins: np.ndarray) -> dict:
    return {"edges": [_r(e) for e in bins],
            **{name: np.histogram(values, bins=bins)[0].astype(int).tolist() for name, values in groups.items()}}


def clip_figures(rows: dict, config: dict) -> dict:
    scores = rows[Col.CLIP_SCORE]
    kept_mask = rows["_kept"]
    present = ~np.isnan(scores)
    info = {"available": bool(present.any()), "scored_rows": int(present.sum()), **_threshold_info(config)}
    if not info["available"]:
        return info
    kept, dropped = scores[present & kept_mask], scores[present & ~kept_mask]
    low = scores[present & _is_reason(rows, R.LOW_CLIP_SCORE.value)]
    info.update(kept=_stats(kept), dropped=_stats(dropped), dropped_low_clip=_stats(low))
    if info["keep_top_percent"]:
        # A percentile cut has no fixed threshold; the lowest kept score is where it fell.
        info["effective_threshold"] = _r(kept.min()) if kept.size else None
    else:
        info["effective_threshold"] = info["threshold"]
    lo, hi = float(scores[present].min()), float(scores[present].max())
    if hi - lo < 1e-6:
        lo, hi = lo - 0.01, hi + 0.01
    info["histogram"] = _histogram({"kept": kept, "dropped": dropped}, np.linspace(lo, hi, HIST_BINS + 1))
    return info


def language_figures(rows: dict) -> dict:
    names = rows["_lang_values"]
    kept = np.bincount(rows["_lang"][rows["_kept"]], minlength=len(names))
    dropped = np.bincount(rows["_lang"][~rows["_kept"]], minlength=len(names))
    by_lang = {name: {"kept": int(k), "dropped": int(d)} for name, k, d in zip(names, kept, dropped) if k or d}
    ordered = sorted(by_lang.items(), key=lambda kv: (-(kv[1]["kept"] + kv[1]["dropped"]), kv[0]))
    table = dict(ordered[:TOP_LANGUAGES])
    rest = ordered[TOP_LANGUAGES:]
    if rest:
        table["(other)"] = {"kept": sum(c["kept"] for _, c in rest), "dropped": sum(c["dropped"] for _, c in rest)}
    scores = rows[Col.LANG_SCORE].astype(np.float64)
    kept_languages = collections.Counter({lang: c["kept"] for lang, c in by_lang.items() if c["kept"]})
    return {"languages": table, "distinct": len(by_lang),
            "kept_languages": _counts(kept_languages),
            "lang_score": _stats(scores[~np.isnan(scores)])}


SIDE_BUCKETS = [0, 32, 64, 128, 256, 512, 1024, 2048, 4096]


def _bucket_label(value: float, edges: list[int]) -> str:
    for low, high in zip(edges, edges[1:]):
        if value < high:
            return f"{low}-{high - 1}"
    return f">={edges[-1]}"


def _bucket_counts(values: np.ndarray, kept: np.ndarray, edges: list[int]) -> dict:
    """{bucket label: {kept, dropped}} of the buckets that have rows (`_bucket_label`'s buckets)."""
    index = np.searchsorted(np.asarray(edges[1:], dtype=float), values, side="right")
    labels = _ordered_labels(edges)
    out = {}
    for position, label in enumerate(labels):
        here = index == position
        if here.any():
            out[label] = {"kept": int(np.sum(kept & here)), "dropped": int(np.sum(~kept & here))}
    return out


def image_size_figures(rows: dict) -> dict:
    w, h = rows[Col.ORIGINAL_WIDTH].astype(np.float64), rows[Col.ORIGINAL_HEIGHT].astype(np.float64)
    known = ~np.isnan(w) & ~np.isnan(h)
    shorter = np.minimum(w[known], h[known])
    longer = np.maximum(w[known], h[known])
    kept = rows["_kept"][known]
    with np.errstate(divide="ignore", invalid="ignore"):
        aspect = np.where(shorter > 0, longer / np.maximum(shorter, 1), np.nan)
    out_w, out_h = rows[Col.WIDTH].astype(np.float64), rows[Col.HEIGHT].astype(np.float64)
    sized = ~np.isnan(out_w) & ~np.isnan(out_h)
    pairs, counts = np.unique(np.stack([out_w[sized], out_h[sized]], axis=1).astype(np.int64), axis=0, return_counts=True)
    final = collections.Counter({f"{a}x{b}": int(c) for (a, b), c in zip(pairs.tolist(), counts.tolist())})
    return {
        "measured_rows": int(known.sum()),
        "shorter_side_kept": _stats(shorter[kept]),
        "shorter_side_dropped": _stats(shorter[~kept]),
        "shorter_side_buckets": _bucket_counts(shorter, kept, SIDE_BUCKETS),
        "aspect_ratio": _stats(aspect[~np.isnan(aspect)]),
        "megapixels": _stats((w[known] * h[known]) / 1e6),
        "output_sizes": _counts(final, top=10),
    }


def _ordered_labels(edges: list[int]) -> list[str]:
    return [f"{a}-{b - 1}" for a, b in zip(edges, edges[1:])] + [f">={edges[-1]}"]


CAPTION_BUCKETS = [0, 1, 10, 20, 50, 100, 200, 500, 1000]


def caption_figures(rows: dict) -> dict:
    chars = rows["_caption_chars"]
    words = rows["_caption_words"]
    kept = rows["_kept"]
    return {
        "chars_kept": _stats(chars[kept]), "chars_dropped": _stats(chars[~kept]),
        "words_kept": _stats(words[kept]), "words_dropped": _stats(words[~kept]),
        "char_buckets": _bucket_counts(chars, kept, CAPTION_BUCKETS),
    }


def duplicate_figures(rows: dict) -> dict:
    duplicates = rows["_duplicates"]
    clustered = duplicates.filter(pc.is_in(duplicates["reason"], value_set=pa.array(list(DUPLICATE_REASONS))))
    grouped = clustered.group_by(["survivor", "reason"]).aggregate([([], "count_all")])
    clusters: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for survivor, reason, count in zip(grouped["survivor"].to_pylist(), grouped["reason"].to_pylist(),
                                       grouped["count_all"].to_pylist()):
        clusters[survivor][reason] += count
    repeated = duplicates.filter(pc.equal(duplicates["reason"], R.DUPLICATE_ROW.value))
    row_dups = collections.Counter(_value_counts(repeated["survivor"]) if repeated.num_rows else {})
    sizes = collections.Counter(1 + sum(c.values()) for c in clusters.values())
    largest = sorted(clusters.items(), key=lambda kv: (-sum(kv[1].values()), kv[0]))[:5]
    return {
        "clusters": len(clusters),
        "duplicates": sum(sum(c.values()) for c in clusters.values()),
        "cluster_sizes": {str(size): count for size, count in sorted(sizes.items())},
        "largest": [{"survivor": uid, "size": 1 + sum(c.values()), "members": dict(sorted(c.items()))}
                    for uid, c in largest],
        "duplicate_row_groups": len(row_dups),
        "duplicate_row_sizes": {str(s): n for s, n in sorted(collections.Counter(1 + c for c in row_dups.values()).items())},
    }


def _domain(url: Optional[str]) -> str:
    try:
        host = urlsplit(url or "").hostname
    except ValueError:
        host = None
    return host or "(none)"


_NETLOC = r"^[A-Za-z][A-Za-z0-9+.\-]*://(?:[^@/?#]*@)?(?P<host>\[[^\]/?#]*\]|[^:/?#]*)"


def domains(urls: pa.Array) -> pa.Array:
    """`_domain` of every url, in Arrow: the host (lowercase, no port, no brackets) of an
    http(s)-style url; urls the pattern does not take are parsed one by one."""
    hosts = pc.utf8_lower(pc.struct_field(pc.extract_regex(pc.fill_null(urls, ""), _NETLOC), [0]))
    hosts = pc.utf8_trim(hosts, "[]")
    missing = pc.fill_null(pc.equal(hosts, ""), True)
    if pc.any(missing).as_py():
        rows = np.flatnonzero(missing.to_numpy(zero_copy_only=False))
        fixed = [_domain(u) for u in urls.take(pa.array(rows)).to_pylist()]
        values = np.asarray(pc.fill_null(hosts, "").to_pylist(), dtype=object)
        values[rows] = fixed
        return pa.array(values.tolist(), pa.string())
    return hosts


def _stages(rows: dict) -> np.ndarray:
    """Each row's funnel stage (None for a kept row), from its reason."""
    stage_of = np.array([reason_stage(r) if r else None for r in rows["_reason_values"]], dtype=object)
    return stage_of[rows["_reason"]] if len(stage_of) else np.full(len(rows["_reason"]), None, dtype=object)


def download_figures(rows: dict) -> dict:
    stages = _stages(rows)
    failed = np.isin(stages, FETCH_ERROR_STAGES)
    # Domains are counted over rows that reached the download (input-stage drops never did).
    attempted = ~np.isin(stages, ("input", "captions"))
    reasons, domain_names = rows["_reason_values"], rows["_domain_values"]
    per_domain: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    tried = np.bincount(rows["_domain"][attempted], minlength=len(domain_names))
    for code in np.flatnonzero(tried).tolist():
        per_domain[domain_names[code]]["rows"] += int(tried[code])
    pairs, counts = np.unique(np.stack([rows["_domain"][failed], rows["_reason"][failed]], axis=1), axis=0,
                              return_counts=True) if failed.any() else (np.zeros((0, 2), np.int64), np.zeros(0, np.int64))
    error_classes: collections.Counter = collections.Counter()
    for (domain, reason), count in zip(pairs.tolist(), counts.tolist()):
        per_domain[domain_names[domain]]["failures"] += count
        per_domain[domain_names[domain]]["reason:" + reasons[reason]] += count
        error_classes[reasons[reason]] += count
    top = sorted(((d, c) for d, c in per_domain.items() if c["failures"]), key=lambda kv: (-kv[1]["failures"], kv[0]))
    statuses = rows[Col.HTTP_STATUS]
    values, status_counts = np.unique(statuses[~np.isnan(statuses)].astype(np.int64), return_counts=True)
    return {
        "attempted": int(attempted.sum()),
        "failed": int(failed.sum()),
        "error_classes": _counts(error_classes),
        "http_status": _counts(collections.Counter(dict(zip(values.tolist(), status_counts.tolist())))),
        "top_failing_domains": [
            {"domain": d, "failures": c["failures"], "rows": c["rows"], "failure_share": _share(c["failures"], c["rows"]),
             "reasons": {k[7:]: v for k, v in sorted(c.items(), key=lambda kv: (-kv[1], kv[0])) if k.startswith("reason:")}}
            for d, c in top[:TOP_DOMAINS]
        ],
    }


POLICY_SIGNALS = (  # (signal, the reason it gives, the config key that turns it off)
    ("robots.txt (RFC 9309)", R.ROBOTS_DISALLOWED, "respect_robots_txt"),
    ("TDMRep (W3C)", R.TDM_RESERVED, "respect_tdmrep"),
    ("Content-Usage (IETF AIPREF)", R.AI_USAGE_REFUSED, "respect_content_usage"),
    ("X-Robots-Tag noai", R.ROBOTS_NOAI, "respect_noai"),
)
POLICY_COUNTER_NAMESPACE = "policy/"
TOP_POLICY_HOSTS = 10
_URL_HOST = r"^[A-Za-z][A-Za-z0-9+.-]*://(?:[^@/?#]*@)?(?P<host>\[[^\]]*\]|[^:/?#]*)"


def site_policy_figures(table: pa.Table, counters: dict, config: dict) -> dict:
    """Rows refused per signal, the hosts with most refusals, and what fetching the policy files cost."""
    reasons = [reason.value for _, reason, _ in POLICY_SIGNALS]
    if table.num_rows and Col.REASON in table.column_names and Col.URL in table.column_names:
        refused = table.filter(pc.fill_null(pc.is_in(table.column(Col.REASON), value_set=pa.array(reasons)), False))
    else:
        refused = pa.table({Col.URL: pa.array([], pa.string()), Col.REASON: pa.array([], pa.string())})
    counts = {row["values"]: row["counts"] for row in pc.value_counts(refused.column(Col.REASON)).to_pylist()}
    hosts = pc.utf8_lower(pc.struct_field(pc.extract_regex(refused.column(Col.URL), _URL_HOST), [0]))
    pairs = pa.table({"host": pc.fill_null(hosts, "(none)"), "reason": refused.column(Col.REASON)})
    per_host = pairs.group_by("host").aggregate([([], "count_all")])
    top = per_host.sort_by([("count_all", "descending"), ("host", "ascending")]).slice(0, TOP_POLICY_HOSTS)
    top_hosts = top.column("host").to_pylist()
    detail = pairs.filter(pc.is_in(pairs.column("host"), value_set=top.column("host")))
    by_reason = detail.group_by(["host", "reason"]).aggregate([([], "count_all")]).to_pylist()
    return {
        "checks": [{"signal": signal, "reason": reason.value, "config_key": key, "on": bool(config.get(key, True)),
                    "rows_refused": int(counts.get(reason.value, 0))} for signal, reason, key in POLICY_SIGNALS],
        "rows_refused": refused.num_rows,
        "hosts_with_refusals": per_host.num_rows,
        "top_hosts": [
            {"host": host, "rows_refused": count,
             "reasons": dict(sorted(((r["reason"], r["count_all"]) for r in by_reason if r["host"] == host),
                                    key=lambda kv: (-kv[1], kv[0])))}
            for host, count in zip(top_hosts, top.column("count_all").to_pylist())
        ],
        "policy_fetches": {name[len(POLICY_COUNTER_NAMESPACE):]: value for name, value in sorted(counters.items())
                           if name.startswith(POLICY_COUNTER_NAMESPACE)},
    }


# ---------------------------------------------------------------------------------------------
# Reading what the report needs
# ---------------------------------------------------------------------------------------------


def _float_array(table: pa.Table, name: str) -> np.ndarray:
    if name not in table.column_names:
        return np.full(table.num_rows, np.nan)
    return pc.fill_null(table.column(name).cast(pa.float64()), np.nan).to_numpy(zero_copy_only=False).astype(float)


def _str_list(table: pa.Table, name: str) -> list:
    return table.column(name).to_pylist() if name in table.column_names else [None] * table.num_rows


def _column(table: pa.Table, name: str, kind=pa.string()) -> pa.Array:
    if name not in table.column_names:
        return pa.nulls(table.num_rows, kind)
    values = table.column(name)
    return values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values


def _is_reason(rows: dict, reason: str) -> np.ndarray:
    values = rows["_reason_values"]
    return rows["_reason"] == values.index(reason) if reason in values else np.zeros(len(rows["_reason"]), dtype=bool)


_WORD = "[^\t\n\x0b\x0c\r\x1c-\x1f \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+"


def _codes(values: pa.Array, vocabulary: dict) -> np.ndarray:
    """Codes of a string column in a vocabulary that grows as new values come (file by file)."""
    encoded = pc.dictionary_encode(values)
    encoded = encoded.combine_chunks() if isinstance(encoded, pa.ChunkedArray) else encoded
    mapping = np.array([vocabulary.setdefault(v, len(vocabulary)) for v in encoded.dictionary.to_pylist()],
                       dtype=np.int32)
    indices = encoded.indices.to_numpy(zero_copy_only=False)
    return mapping[indices] if len(mapping) else np.zeros(len(values), dtype=np.int32)


_EXAMPLE_COLUMNS = [Col.UID, Col.URL, Col.CAPTION, Col.ERROR_DETAIL, Col.WIDTH, Col.HTTP_STATUS, Col.CLIP_SCORE,
                    Col.LANG, Col.DUPLICATE_OF, Col.REASON]


def ledger_columns(layout: Layout) -> dict:
    """What the figures need from the ledger, read one file at a time (a ledger may have tens of
    millions of rows: text columns are never all in memory): numbers and flags as numpy arrays
    (float32), reason / language / url host as codes into small vocabularies, and small tables of
    the rows a figure lists (each reason's lowest uids, duplicates, site-policy refusals)."""
    numbers = (Col.CLIP_SCORE, Col.LANG_SCORE, Col.WIDTH, Col.HEIGHT, Col.ORIGINAL_WIDTH, Col.ORIGINAL_HEIGHT,
               Col.HTTP_STATUS)
    parts: dict[str, list] = collections.defaultdict(list)
    vocabulary = {name: {} for name in ("_reason", "_lang", "_domain")}
    policy_reasons = pa.array([reason.value for _, reason, _ in POLICY_SIGNALS])
    duplicate_reasons = pa.array(list(DUPLICATE_REASONS) + [R.DUPLICATE_ROW.value])
    for path in _glob(layout.ledger_glob()):
        with FileSystems.open(path, compression_type="uncompressed") as handle:
            parquet = pq.ParquetFile(handle)
            table = parquet.read(columns=[c for c in LEDGER_REPORT_COLUMNS if c in parquet.schema_arrow.names])
        if not table.num_rows:
            continue
        table = table.sort_by([(Col.UID, "ascending")]).combine_chunks()
        reasons = pc.fill_null(_column(table, Col.REASON), "")
        parts["_reason"].append(_codes(reasons, vocabulary["_reason"]))
        langs = pc.if_else(pc.fill_null(pc.not_equal(_column(table, Col.LANG), ""), False), _column(table, Col.LANG),
                           "unknown")
        parts["_lang"].append(_codes(langs, vocabulary["_lang"]))
        parts["_domain"].append(_codes(domains(_column(table, Col.URL)), vocabulary["_domain"]))
        parts["_kept"].append(pc.fill_null(pc.equal(_column(table, Col.STATUS), Status.KEPT), False).to_numpy(
            zero_copy_only=False))
        captions = pc.fill_null(_column(table, Col.CAPTION), "")
        parts["_caption_chars"].append(pc.utf8_length(captions).to_numpy(zero_copy_only=False).astype(np.float32))
        parts["_caption_words"].append(
            pc.count_substring_regex(captions, _WORD).to_numpy(zero_copy_only=False).astype(np.float32))
        for name in numbers:
            parts[name].append(_float_array(table, name).astype(np.float32))
        dropped = table.filter(pc.not_equal(_column(table, Col.STATUS), Status.KEPT))
        for reason in pc.unique(pc.fill_null(_column(dropped, Col.REASON), "")).to_pylist():
            of_reason = dropped.filter(pc.equal(pc.fill_null(_column(dropped, Col.REASON), ""), reason))
            parts["_examples"].append(of_reason.slice(0, EXAMPLES_PER_REASON).select(
                [c for c in _EXAMPLE_COLUMNS if c in of_reason.column_names]))
        parts["_duplicates"].append(pa.table({"survivor": _column(table, Col.DUPLICATE_OF), "reason": reasons}).filter(
            pc.and_(pc.fill_null(pc.not_equal(_column(table, Col.DUPLICATE_OF), ""), False),
                    pc.is_in(reasons, value_set=duplicate_reasons))))
        parts["_refused"].append(pa.table({Col.URL: _column(table, Col.URL), Col.REASON: reasons}).filter(
            pc.is_in(reasons, value_set=policy_reasons)))
    rows = {"_rows": sum(len(part) for part in parts["_kept"])}
    for name in ("_reason", "_lang", "_domain"):
        rows[name] = np.concatenate(parts[name]) if parts[name] else np.zeros(0, dtype=np.int32)
        rows[name + "_values"] = [value for value, _ in sorted(vocabulary[name].items(), key=lambda kv: kv[1])]
    rows["_kept"] = np.concatenate(parts["_kept"]) if parts["_kept"] else np.zeros(0, dtype=bool)
    for name in numbers + ("_caption_chars", "_caption_words"):
        rows[name] = np.concatenate(parts[name]) if parts[name] else np.zeros(0, dtype=np.float32)
    example_schema = pa.schema([pa.field(c, LEDGER_SCHEMA.field(c).type) for c in _EXAMPLE_COLUMNS])
    rows["_examples"] = pa.concat_tables(parts["_examples"], promote_options="default") if parts["_examples"] \
        else example_schema.empty_table()
    rows["_duplicates"] = pa.concat_tables(parts["_duplicates"]) if parts["_duplicates"] \
        else pa.table({"survivor": pa.array([], pa.string()), "reason": pa.array([], pa.string())})
    rows["_refused"] = pa.concat_tables(parts["_refused"]) if parts["_refused"] \
        else pa.table({Col.URL: pa.array([], pa.string()), Col.REASON: pa.array([], pa.string())})
    return rows


def phase_infos(layout: Layout) -> dict:
    return {phase: layout.read_phase_info(phase) for phase in PHASES}


def _config_of(info: Optional[dict]) -> dict:
    config = (info or {}).get("config")
    if isinstance(config, str):
        try:
            config = json.loads(config)
        except ValueError:
            config = None
    return config if isinstance(config, dict) else {}


def run_config(infos: dict) -> tuple[dict, list[str]]:
    """The config of the latest phase that ran, and the keys whose values differed across phases."""
    configs = {p: _config_of(infos.get(p)) for p in PHASES}
    latest = next((configs[p] for p in reversed(PHASES) if configs[p]), {})
    differing = sorted({k for c in configs.values() if c for k in set(c) | set(latest)
                        if c.get(k) != latest.get(k)})
    return latest, differing


def model_ids(config: dict) -> dict:
    keys = ("clip_enabled", "clip_model", "clip_pretrained", "clip_checkpoint", "clip_device", "langid_backend")
    found = {k: config[k] for k in keys if k in config}
    found.update({k: v for k, v in config.items() if "model" in k and k not in found})
    return dict(sorted(found.items()))


def phase_figures(infos: dict, summary: dict, alive: int) -> tuple[dict, dict]:
    """(phases, timings): counters are deterministic; seconds and throughput are not."""
    rows = {"fetch": summary["rows_in"], "decide": alive, "write": summary["rows_in"]}
    phases, timings = {}, {}
    for phase in PHASES:
        info = infos.get(phase) or {}
        phases[phase] = {"ran": bool(info), "rows": rows[phase], "counters": info.get("metrics") or {}}
        seconds = info.get("seconds")
        timings[phase] = {
            "seconds": seconds, "finished_at": info.get("finished_at"),
            "rows_per_s": round(rows[phase] / seconds, 1) if seconds else None,
            "peak_rss_mb": info.get("process_peak_rss_mb"),
            "cpu_seconds": info.get("cpu_seconds"),
        }
    return phases, timings


# ---------------------------------------------------------------------------------------------
# Images: a few thumbnails, read from the tars where they already are (never downloaded)
# ---------------------------------------------------------------------------------------------


def thumbnail_uri(image: bytes, size: int = THUMBNAIL_PX) -> Optional[str]:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(image)) as img:
            img.draft("RGB", (size * 2, size * 2))  # JPEG: decode at a reduced scale
            thumb = img.convert("RGB")
            thumb.thumbnail((size, size))
            buffer = io.BytesIO()
            thumb.save(buffer, "JPEG", quality=75)
        return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    except Exception:  # noqa: BLE001 - a bad image costs one placeholder, not the report
        return None


def _read_from_tars(wanted_by_path: dict[str, set]) -> dict[str, str]:
    """uid -> thumbnail. Our tars are sorted by uid, so each is read only up to its last wanted uid."""
    found = {}
    for path, uids in sorted(wanted_by_path.items()):
        if not FileSystems.exists(path):
            continue
        last = max(uids)
        with FileSystems.open(path) as handle:
            for key, image, _ in read_tar_samples(handle):
                if key in uids and image:
                    uri = thumbnail_uri(image)
                    if uri:
                        found[key] = uri
                if key >= last:
                    break
    return found


def _read_from_raw(layout: Layout, uids: set) -> dict[str, str]:
    """uid -> thumbnail for samples decoded in fetch but not shipped: read from raw/ by offset."""
    wanted = pa.array(sorted(uids), pa.string())
    parts = [table.filter(pc.is_in(table.column(Col.UID), value_set=wanted))
             for table in each_table(layout.features_glob(), [Col.UID, Col.RAW_FILE, Col.RAW_OFFSET, Col.RAW_LENGTH])
             if Col.RAW_FILE in table.column_names]
    if not parts:
        return {}
    locations = pa.concat_tables(parts)
    found = {}
    reader = RawImageReader(layout.raw_shards)
    try:
        for row in locations.to_pylist():
            if row[Col.UID] in uids and row[Col.RAW_FILE] and row[Col.UID] not in found:
                try:
                    uri = thumbnail_uri(reader.read(row))
                except (OSError, KeyError):
                    continue  # a missing raw file costs a placeholder, not the report
                if uri:
                    found[row[Col.UID]] = uri
    finally:
        reader.close()
    return found


def load_thumbnails(layout: Layout, uids: set) -> dict[str, str]:
    """Kept samples come from their final shard (bounded size); the others from raw/. The rows of
    the wanted uids are read from the ledger file by file."""
    if not uids:
        return {}
    wanted_uids = pa.array(sorted(uids), pa.string())
    found_rows = []
    for path in _glob(layout.ledger_glob()):
        with FileSystems.open(path, compression_type="uncompressed") as handle:
            table = pq.ParquetFile(handle).read(columns=[Col.UID, Col.SHARD, Col.WIDTH])
        found_rows.append(table.filter(pc.is_in(table.column(Col.UID), value_set=wanted_uids)))
    if not found_rows:
        return {}
    wanted = pa.concat_tables(found_rows)
    shard_col = _str_list(wanted, Col.SHARD)
    width_col = _str_list(wanted, Col.WIDTH)
    index: dict[str, int] = {}
    for i, uid in enumerate(wanted.column(Col.UID).to_pylist()):
        # Repeated input rows share a uid: the row that has an image (in a shard, or decoded) wins.
        rank = (bool(shard_col[i]), width_col[i] is not None)
        if uid not in index or rank > (bool(shard_col[index[uid]]), width_col[index[uid]] is not None):
            index[uid] = i
    by_path: dict[str, set] = collections.defaultdict(set)
    from_raw = set()
    for uid in uids:
        i = index.get(uid)
        if i is None:
            continue
        if shard_col[i]:
            by_path[join_path(layout.shards, f"{shard_col[i]}.tar")].add(uid)
        elif width_col[i] is not None:  # decoded in fetch, so its image is in raw/
            from_raw.add(uid)
    found = _read_from_tars(by_path)
    if from_raw:
        found.update(_read_from_raw(layout, from_raw))
    return found


def _clip_text(text: Optional[str], limit: int = 160) -> Optional[str]:
    if text is None:
        return None
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def pick_examples(rows: dict, summary: dict) -> dict[str, list[dict]]:
    """The lowest uids of each reason: deterministic, and early in every uid-sorted tar."""
    examples: dict[str, list[dict]] = {r: [] for r in summary["drop_reasons"]}
    candidates = rows["_examples"].sort_by([(Col.UID, "ascending")])
    reasons = pc.fill_null(candidates[Col.REASON], "").to_pylist() if candidates.num_rows else []
    for row, reason in zip(candidates.to_pylist(), reasons):
        bucket = examples.get(reason)
        if bucket is None or len(bucket) >= EXAMPLES_PER_REASON:
            continue
        clip = row.get(Col.CLIP_SCORE)
        bucket.append({
            "uid": row[Col.UID], "url": _clip_text(row.get(Col.URL)), "caption": _clip_text(row.get(Col.CAPTION)),
            "detail": _clip_text(row.get(Col.ERROR_DETAIL)), "http_status": row.get(Col.HTTP_STATUS),
            "lang": row.get(Col.LANG), "clip_score": _r(clip) if clip is not None else None,
            "duplicate_of": row.get(Col.DUPLICATE_OF), "image_stored": row.get(Col.WIDTH) is not None,
        })
    return examples


def pick_hard_negatives(layout: Layout) -> tuple[dict, list[dict]]:
    """Counts of the shards' hard negatives by kind, and a few (anchor, image negative, caption
    negative) triples from the anchors with the lowest keys: shard file by shard file, keeping only
    the lowest-key anchors seen so far."""
    stats = {"available": False, "anchors_with_negatives": 0, "negatives_by_kind": {}}
    kinds: collections.Counter = collections.Counter()
    candidates = None
    for table in each_table(join_path(layout.shards, "*.parquet"), [Col.KEY, Col.CAPTION, Col.HARD_NEGATIVES]):
        if Col.HARD_NEGATIVES not in table.column_names or not table.num_rows:
            continue
        negatives = table.column(Col.HARD_NEGATIVES)
        lengths = pc.fill_null(pc.list_value_length(negatives), 0).to_numpy(zero_copy_only=False)
        stats["anchors_with_negatives"] += int(np.sum(lengths > 0))
        kinds.update(_value_counts(pc.fill_null(pc.struct_field(pc.list_flatten(negatives), Col.NEGATIVE_KIND), "unknown")))
        lowest = table.filter(pa.array(lengths > 0))
        if candidates is not None:
            lowest = pa.concat_tables([candidates, lowest])
        candidates = lowest.sort_by([(Col.KEY, "ascending")]).slice(0, _TRIPLE_CANDIDATES).combine_chunks()
    stats["negatives_by_kind"] = _counts(kinds)
    if candidates is None:
        return stats, []
    triples = []
    for key, caption, listed in zip(candidates.column(Col.KEY).to_pylist(), candidates.column(Col.CAPTION).to_pylist(),
                                    candidates.column(Col.HARD_NEGATIVES).to_pylist()):
        if len(triples) >= HARD_NEGATIVE_TRIPLES:
            break

        def first(accepted):
            for kind in accepted:
                for n in listed:
                    if n.get(Col.NEGATIVE_KIND) == kind:
                        return {"uid": n.get(Col.NEGATIVE_UID), "caption": _clip_text(n.get(Col.NEGATIVE_CAPTION)),
                                "score": _r(n[Col.NEGATIVE_SCORE]) if n.get(Col.NEGATIVE_SCORE) is not None else None,
                                "kind": kind}
            return None

        image_negative, caption_negative = first(IMAGE_NEGATIVE_KINDS), first(CAPTION_NEGATIVE_KINDS)
        if image_negative or caption_negative:
            triples.append({"anchor": {"uid": key, "caption": _clip_text(caption)},
                            "image_negative": image_negative, "caption_negative": caption_negative})
    stats["available"] = stats["anchors_with_negatives"] > 0
    return stats, triples


# ---------------------------------------------------------------------------------------------
# The summary (every figure of the page)
# ---------------------------------------------------------------------------------------------


def build_summary(layout: Layout, accounting: dict, infos: dict) -> tuple[dict, dict, dict]:
    """(summary, ledger columns, config): everything the page shows is in summary."""
    rows = ledger_columns(layout)
    config, differing = run_config(infos)
    alive = int(np.sum(rows["_kept"] | np.isin(_stages(rows), ("filters", "dedup")))) if rows["_rows"] else 0
    phases, timings = phase_figures(infos, accounting, alive)
    negatives_stats, triples = pick_hard_negatives(layout)
    summary = dict(accounting)
    summary.update(
        report_version=2,
        funnel=funnel(accounting["rows_in"], accounting["drop_reasons"]),
        drop_reason_table=reason_table(accounting),
        clip=clip_figures(rows, config),
        languages=language_figures(rows),
        image_sizes=image_size_figures(rows),
        caption_lengths=caption_figures(rows),
        duplicates=duplicate_figures(rows),
        downloads=download_figures(rows),
        site_policies=site_policy_figures(rows["_refused"], phases["fetch"]["counters"], config),
        phases=phases,
        timings=timings,
        config=config,
        config_keys_differing_between_phases=differing,
        models=model_ids(config),
        examples=pick_examples(rows, accounting),
        hard_negatives=dict(negatives_stats, triples=triples, recall=negatives_recall(phases["decide"]["counters"])),
    )
    return summary, rows, config


def negatives_recall(counters: dict) -> dict:
    """{space: {queries, exact, found, recall}} from decide's counters: the sampled queries'
    neighbours against an exact search over every kept sample (`negatives_recall_queries`)."""
    found = {}
    for space in ("image", "text"):
        exact = int(counters.get(f"negatives/{space}_recall_exact", 0))
        if exact:
            hits = int(counters.get(f"negatives/{space}_recall_found", 0))
            found[space] = {"queries": int(counters.get(f"negatives/{space}_recall_queries", 0)), "exact": exact,
                            "found": hits, "recall": _share(hits, exact)}
    return found


def summary_json(summary: dict) -> bytes:
    return (json.dumps(summary, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")


# ---------------------------------------------------------------------------------------------
# Plots (matplotlib, Agg canvas; no pyplot so no global state is touched)
# ---------------------------------------------------------------------------------------------

KEPT_COLOUR, DROPPED_COLOUR, ACCENT = "#2b8a3e", "#c92a2a", "#1c7ed6"
STAGE_COLOURS = {"input": "#868e96", "captions": "#f08c00", "fetch": "#c92a2a", "decode": "#9c36b5",
                 "filters": "#1c7ed6", "dedup": "#0c8599", "errors": "#212529"}


def _figure(width: float = 7.0, height: float = 3.2):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _integer_counts(axis) -> None:
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def _plain_log(axis) -> None:
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    # Pixel sizes read better as 200, 500, 1000 than as 2x10^2.
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(ScalarFormatter())
    axis.set_minor_formatter(NullFormatter())


def _png(figure) -> str:
    buffer = io.BytesIO()
    figure.tight_layout()
    # No "Software" text chunk: identical inputs give identical bytes across matplotlib patches.
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def plot_funnel(steps: list[dict], rows_in: int) -> str:
    labels = ["rows in"] + [f"after {s['label']}" for s in steps]
    values = [rows_in] + [s["remaining"] for s in steps]
    fig = _figure(7.0, 0.45 * len(labels) + 0.8)
    ax = fig.add_subplot()
    y = np.arange(len(labels))[::-1]
    ax.barh(y, values, color=[ACCENT] + [STAGE_COLOURS.get(s["stage"], ACCENT) for s in steps])
    ax.set_yticks(y, labels)
    for yi, v, s in zip(y, values, [None] + steps):
        note = f"{v:,}" + (f"  (-{s['dropped']:,})" if s and s["dropped"] else "")
        ax.text(v, yi, " " + note, va="center", fontsize=8)
    ax.set_xlim(0, max(values + [1]) * 1.25)
    ax.set_xlabel("rows")
    ax.set_title("Funnel: rows remaining after each stage")
    return _png(fig)


def plot_reasons(table: list[dict]) -> Optional[str]:
    if not table:
        return None
    fig = _figure(7.0, 0.28 * len(table) + 1.0)
    ax = fig.add_subplot()
    y = np.arange(len(table))[::-1]
    ax.barh(y, [r["count"] for r in table], color=[STAGE_COLOURS.get(r["stage"], ACCENT) for r in table])
    ax.set_yticks(y, [r["reason"] for r in table], fontsize=8)
    _integer_counts(ax.xaxis)
    ax.set_xlabel("rows dropped")
    ax.set_title("Drop reasons (colour = stage)")
    return _png(fig)


def plot_clip(clip: dict) -> Optional[str]:
    if not clip.get("available"):
        return None
    hist = clip["histogram"]
    edges = np.array(hist["edges"], dtype=float)
    fig = _figure()
    ax = fig.add_subplot()
    width = np.diff(edges)
    ax.bar(edges[:-1], hist["kept"], width=width, align="edge", alpha=0.6, color=KEPT_COLOUR, label="kept")
    ax.bar(edges[:-1], hist["dropped"], width=width, align="edge", alpha=0.6, color=DROPPED_COLOUR, label="dropped")
    threshold = clip.get("effective_threshold")
    if threshold is not None:
        label = "cutoff (top %s%%)" % clip["keep_top_percent"] if clip.get("keep_top_percent") else f"threshold {threshold}"
        ax.axvline(threshold, color="black", linestyle="--", label=label)
    for lang, value in (clip.get("thresholds_per_lang") or {}).items():
        ax.axvline(float(value), color="grey", linestyle=":", linewidth=1)
        ax.text(float(value), ax.get_ylim()[1] * 0.95, f" {lang}", fontsize=7, color="grey")
    ax.set_xlabel("CLIP image-caption similarity")
    ax.set_ylabel("rows")
    ax.set_title("CLIP score: kept vs dropped")
    ax.legend(fontsize=8)
    return _png(fig)


def plot_languages(languages: dict) -> Optional[str]:
    table = languages["languages"]
    if not table:
        return None
    names = list(table)
    fig = _figure(7.0, 0.28 * len(names) + 1.0)
    ax = fig.add_subplot()
    y = np.arange(len(names))[::-1]
    kept = [table[n]["kept"] for n in names]
    ax.barh(y, kept, color=KEPT_COLOUR, label="kept")
    ax.barh(y, [table[n]["dropped"] for n in names], left=kept, color=DROPPED_COLOUR, label="dropped")
    ax.set_yticks(y, names, fontsize=8)
    ax.set_xlabel("rows")
    ax.set_title("Caption languages")
    ax.legend(fontsize=8)
    return _png(fig)


_SCATTER_POINTS = 20_000


def plot_image_sizes(rows: dict) -> Optional[str]:
    w, h = rows[Col.ORIGINAL_WIDTH], rows[Col.ORIGINAL_HEIGHT]
    known = ~np.isnan(w) & ~np.isnan(h) & (w > 0) & (h > 0)
    if not known.any():
        return None
    kept = rows["_kept"][known]
    w, h = w[known], h[known]
    if len(w) > _SCATTER_POINTS:  # evenly spaced rows (uid order): the same picture, drawable in a moment
        chosen = np.linspace(0, len(w) - 1, _SCATTER_POINTS).astype(np.int64)
        w, h, kept = w[chosen], h[chosen], kept[chosen]
    fig = _figure(8.0, 3.4)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    ax1.scatter(w[kept], h[kept], s=8, alpha=0.5, color=KEPT_COLOUR, label="kept")
    ax1.scatter(w[~kept], h[~kept], s=14, alpha=0.8, color=DROPPED_COLOUR, marker="x", label="dropped")
    if max(w.max(), h.max()) > 20 * min(w.min(), h.min()):  # log axes only when sizes span decades
        ax1.set_xscale("log")
        ax1.set_yscale("log")
        _plain_log(ax1.xaxis)
        _plain_log(ax1.yaxis)
    ax1.set_xlabel("original width (px)")
    ax1.set_ylabel("original height (px)")
    ax1.legend(fontsize=8)
    shorter = np.minimum(w, h)
    bins = np.logspace(math.log10(shorter.min() / 1.2), math.log10(shorter.max() * 1.2), 30)
    ax2.hist([shorter[kept], shorter[~kept]], bins=bins, stacked=True, color=[KEPT_COLOUR, DROPPED_COLOUR],
             label=["kept", "dropped"])
    ax2.set_xscale("log")
    _plain_log(ax2.xaxis)
    _integer_counts(ax2.yaxis)
    ax2.set_xlabel("shorter side (px)")
    ax2.set_ylabel("rows")
    fig.suptitle("Image sizes (as downloaded)")
    return _png(fig)


def plot_captions(rows: dict) -> Optional[str]:
    chars = rows["_caption_chars"]
    if chars.size == 0:
        return None
    kept = rows["_kept"]
    # Linear bins up to the 99th percentile; the long tail is folded into the last bin.
    top = max(float(np.quantile(chars, 0.99)), 10.0)
    bins = np.linspace(0, top, 41)
    clipped = np.minimum(chars, top)
    fig = _figure()
    ax = fig.add_subplot()
    ax.hist([clipped[kept], clipped[~kept]], bins=bins, stacked=True, color=[KEPT_COLOUR, DROPPED_COLOUR],
            label=["kept", "dropped"])
    ax.set_xlabel(f"caption length (characters; last bin: >= {top:.0f})")
    ax.set_ylabel("rows")
    ax.set_title("Caption lengths")
    ax.legend(fontsize=8)
    return _png(fig)


def plot_duplicates(duplicates: dict) -> Optional[str]:
    sizes = duplicates["cluster_sizes"]
    if not sizes:
        return None
    fig = _figure(6.0, 3.0)
    ax = fig.add_subplot()
    ax.bar([str(s) for s in sizes], list(sizes.values()), color=ACCENT)
    _integer_counts(ax.yaxis)
    ax.set_xlabel("cluster size (survivor + duplicates)")
    ax.set_ylabel("clusters")
    ax.set_title("Duplicate image clusters")
    return _png(fig)


def plot_downloads(downloads: dict) -> Optional[str]:
    classes, statuses = downloads["error_classes"], downloads["http_status"]
    if not classes and not statuses:
        return None
    fig = _figure(8.0, 3.2)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    if classes:
        y = np.arange(len(classes))[::-1]
        ax1.barh(y, list(classes.values()), color=DROPPED_COLOUR)
        ax1.set_yticks(y, list(classes), fontsize=8)
    _integer_counts(ax1.xaxis)
    ax1.set_title("Download error classes", fontsize=10)
    ax1.set_xlabel("rows")
    if statuses:
        ax2.bar(list(statuses), list(statuses.values()),
                color=[KEPT_COLOUR if s.startswith("2") else DROPPED_COLOUR for s in statuses])
    ax2.set_title("HTTP status of the final response", fontsize=10)
    ax2.set_ylabel("rows")
    return _png(fig)


def plot_timings(timings: dict) -> Optional[str]:
    phases = [p for p in PHASES if timings[p]["seconds"] is not None]
    if not phases:
        return None
    fig = _figure(6.0, 2.4)
    ax = fig.add_subplot()
    y = np.arange(len(phases))[::-1]
    seconds = [timings[p]["seconds"] for p in phases]
    ax.barh(y, seconds, color=ACCENT)
    ax.set_yticks(y, phases)
    for yi, p, s in zip(y, phases, seconds):
        rate = timings[p]["rows_per_s"]
        ax.text(s, yi, f" {s:.1f}s" + (f", {rate:,.1f} rows/s" if rate else ""), va="center", fontsize=8)
    ax.set_xlim(0, max(seconds) * 1.5 or 1)
    ax.set_xlabel("seconds")
    ax.set_title("Time per phase")
    return _png(fig)


# ---------------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------------

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#212529;background:#fff}
header{background:#1c7ed6;color:#fff;padding:14px 24px}header h1{margin:0;font-size:22px}
nav{padding:8px 24px;background:#f1f3f5;position:sticky;top:0;font-size:13px}nav a{margin-right:12px;color:#1864ab}
main{padding:0 24px 40px;max-width:1200px}section{margin-top:28px}h2{border-bottom:2px solid #dee2e6;padding-bottom:4px}
table{border-collapse:collapse;margin:8px 0;font-size:13px}th,td{border:1px solid #dee2e6;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f8f9fa}td.n{text-align:right;font-variant-numeric:tabular-nums}
.cards{display:flex;gap:12px;flex-wrap:wrap}.card{border:1px solid #dee2e6;border-radius:6px;padding:8px 14px;min-width:110px}
.card b{display:block;font-size:22px}.ok{color:#2b8a3e}.bad{color:#c92a2a}
img.plot{max-width:100%;height:auto;border:1px solid #f1f3f5}
.examples{display:flex;gap:10px;flex-wrap:wrap;margin:6px 0 14px}
.ex{width:210px;border:1px solid #dee2e6;border-radius:6px;padding:6px;font-size:12px;overflow-wrap:anywhere}
.ex img,.ph{width:96px;height:96px;object-fit:contain;background:#f8f9fa;display:block}
.ph{display:flex;align-items:center;justify-content:center;text-align:center;color:#868e96;font-size:11px;border:1px dashed #adb5bd}
.pair{display:flex;gap:6px}.muted{color:#868e96}code{font-size:12px}
.triple{display:flex;gap:10px;margin:8px 0;flex-wrap:wrap}.triple .ex{width:240px}
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _img(uri: Optional[str], alt: str) -> str:
    if not uri:
        return '<div class="ph">no image stored</div>'
    return f'<img src="{uri}" alt="{_e(alt)}" width="96" height="96">'


def _plot(uri: Optional[str], alt: str, empty: str) -> str:
    return f'<img class="plot" src="{uri}" alt="{_e(alt)}">' if uri else f'<p class="muted">{_e(empty)}</p>'


def _table(headers: list[str], rows: list[list], numeric: Iterable[int] = ()) -> str:
    numeric = set(numeric)
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f'<td{" class=n" if i in numeric else ""}>{_e(c)}</td>' for i, c in enumerate(row)) + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _stats_rows(named: dict) -> list[list]:
    keys = ("count", "min", "p05", "median", "p95", "max", "mean")
    return [[name] + [stats.get(k, "") for k in keys] for name, stats in named.items()]


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def render_html(summary: dict, rows: dict, thumbs: dict[str, str]) -> str:
    s = summary
    parts = []
    add = parts.append
    sections = [("funnel", "Funnel"), ("reasons", "Drop reasons"), ("examples", "Examples"), ("clip", "CLIP score"),
                ("languages", "Languages"), ("sizes", "Image sizes"), ("captions", "Captions"),
                ("duplicates", "Duplicates"), ("downloads", "Downloads"), ("policies", "Site policies"),
                ("negatives", "Hard negatives"),
                ("time", "Time"), ("config", "Config")]
    add("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">"
        f"<title>curate report: {s['kept']:,} kept of {s['rows_in']:,}</title><style>{CSS}</style></head><body>")
    add(f"<header><h1>Curation report</h1><div>{_e(s['config'].get('output', ''))}</div></header>")
    add("<nav>" + "".join(f'<a href="#{k}">{_e(v)}</a>' for k, v in sections) + "</nav><main>")

    ok = s["accounting_ok"]
    add('<section id="funnel"><h2>Funnel</h2><div class="cards">'
        f'<div class="card">rows in<b>{s["rows_in"]:,}</b></div>'
        f'<div class="card">kept<b class="ok">{s["kept"]:,}</b>{_pct(s["kept"] / s["rows_in"]) if s["rows_in"] else ""}</div>'
        f'<div class="card">dropped<b class="bad">{s["dropped"]:,}</b>{_pct(s["dropped"] / s["rows_in"]) if s["rows_in"] else ""}</div>'
        f'<div class="card">shards<b>{s["shards"]:,}</b>{s["shard_samples"]:,} samples</div>'
        f'<div class="card">accounting<b class="{"ok" if ok else "bad"}">{"OK" if ok else "FAILED"}</b>'
        "in = kept + dropped</div></div>")
    add(_plot(plot_funnel(s["funnel"], s["rows_in"]), "funnel", ""))
    add(_table(["stage", "dropped", "remaining after", "reasons"],
               [[f["label"], f["dropped"], f["remaining"], ", ".join(f"{r} {c}" for r, c in f["reasons"].items())]
                for f in s["funnel"]], numeric=(1, 2)))
    add("</section>")

    add('<section id="reasons"><h2>Drop reasons</h2>')
    add(_plot(plot_reasons(s["drop_reason_table"]), "drop reasons", "Nothing was dropped."))
    add(_table(["reason", "stage", "rows", "share of rows", "share of dropped", "meaning"],
               [[r["reason"], r["stage"], r["count"], _pct(r["share_of_rows"]), _pct(r["share_of_dropped"]),
                 r["description"]] for r in s["drop_reason_table"]], numeric=(2, 3, 4)))
    add("</section>")

    add(f'<section id="examples"><h2>Examples of each drop reason</h2><p class="muted">Up to {EXAMPLES_PER_REASON} '
        "rows per reason (lowest uids). Rows dropped before decoding have no stored image; their URL and caption "
        "are shown instead. URLs are untrusted and shown as text only.</p>")
    for reason, examples in s["examples"].items():
        add(f"<h3>{_e(reason)} <span class=\"muted\">({s['drop_reasons'].get(reason, 0):,} rows)</span></h3>"
            '<div class="examples">')
        for ex in examples:
            if reason == R.DUPLICATE_ROW.value:  # same uid as its survivor: one image for both rows
                pair = _img(thumbs.get(ex["duplicate_of"]), "the surviving row's image")
            else:
                pair = _img(thumbs.get(ex["uid"]) if ex["image_stored"] else None, ex["caption"] or ex["uid"])
            if ex.get("duplicate_of") and reason in DUPLICATE_REASONS:
                pair += _img(thumbs.get(ex["duplicate_of"]), "survivor")
            facts = [f"<code>{_e(ex['uid'][:12])}</code>"]
            if ex.get("duplicate_of"):
                facts.append(f"dup of <code>{_e(ex['duplicate_of'][:12])}</code>")
            for key in ("http_status", "lang", "clip_score"):
                if ex.get(key) is not None:
                    facts.append(f"{key}={_e(ex[key])}")
            add(f'<div class="ex"><div class="pair">{pair}</div><div>{" &middot; ".join(facts)}</div>'
                f'<div>&ldquo;{_e(ex["caption"])}&rdquo;</div><div class="muted">{_e(ex["url"])}</div>'
                + (f'<div class="muted">{_e(ex["detail"])}</div>' if ex.get("detail") else "") + "</div>")
        add("</div>")
    add("</section>")

    clip = s["clip"]
    add('<section id="clip"><h2>CLIP score</h2>')
    if clip.get("available"):
        add(_plot(plot_clip(clip), "clip score histogram", ""))
        thr = f"threshold {clip['threshold']}"
        if clip.get("keep_top_percent"):
            thr = f"keep top {clip['keep_top_percent']}% (effective cutoff {clip['effective_threshold']})"
        if clip.get("thresholds_per_lang"):
            thr += "; per language: " + ", ".join(f"{k}={v}" for k, v in clip["thresholds_per_lang"].items())
        add(f"<p>{_e(thr)}. {clip['scored_rows']:,} rows scored.</p>")
        add(_table(["", "count", "min", "p05", "median", "p95", "max", "mean"],
                   _stats_rows({"kept": clip["kept"], "dropped (any reason)": clip["dropped"],
                                "dropped low_clip_score": clip["dropped_low_clip"]}), numeric=range(1, 8)))
    else:
        add('<p class="muted">No CLIP scores in this run (CLIP stage disabled or not run).</p>')
    add("</section>")

    langs = s["languages"]
    add('<section id="languages"><h2>Languages</h2>')
    add(_plot(plot_languages(langs), "languages", "No language tags."))
    add(_table(["language", "kept", "dropped"], [[k, v["kept"], v["dropped"]] for k, v in langs["languages"].items()],
               numeric=(1, 2)))
    add(f"<p>{langs['distinct']} distinct tags; language score: median {langs['lang_score'].get('median')}</p>")
    add("</section>")

    sizes = s["image_sizes"]
    add('<section id="sizes"><h2>Image sizes</h2>')
    add(_plot(plot_image_sizes(rows), "image sizes", "No decoded images."))
    add(_table(["shorter side (px)", "kept", "dropped"],
               [[k, v["kept"], v["dropped"]] for k, v in sizes["shorter_side_buckets"].items()], numeric=(1, 2)))
    add(_table(["", "count", "min", "p05", "median", "p95", "max", "mean"],
               _stats_rows({"shorter side, kept": sizes["shorter_side_kept"],
                            "shorter side, dropped": sizes["shorter_side_dropped"],
                            "aspect ratio": sizes["aspect_ratio"], "megapixels": sizes["megapixels"]}),
               numeric=range(1, 8)))
    add("<p>Stored sizes: " + _e(", ".join(f"{k} ({v:,})" for k, v in sizes["output_sizes"].items())) + "</p>")
    add("</section>")

    caps = s["caption_lengths"]
    add('<section id="captions"><h2>Caption lengths</h2>')
    add(_plot(plot_captions(rows), "caption lengths", "No captions."))
    add(_table(["", "count", "min", "p05", "median", "p95", "max", "mean"],
               _stats_rows({"characters, kept": caps["chars_kept"], "characters, dropped": caps["chars_dropped"],
                            "words, kept": caps["words_kept"], "words, dropped": caps["words_dropped"]}),
               numeric=range(1, 8)))
    add("</section>")

    dups = s["duplicates"]
    add('<section id="duplicates"><h2>Duplicate clusters</h2>')
    add(f"<p>{dups['clusters']:,} image clusters ({dups['duplicates']:,} duplicates dropped, exact + near); "
        f"{dups['duplicate_row_groups']:,} groups of repeated input rows.</p>")
    add(_plot(plot_duplicates(dups), "duplicate cluster sizes", "No image duplicates in this run."))
    if dups["largest"]:
        add(_table(["survivor", "size", "members"],
                   [[c["survivor"], c["size"], ", ".join(f"{k} {v}" for k, v in c["members"].items())]
                    for c in dups["largest"]], numeric=(1,)))
    add("</section>")

    dl = s["downloads"]
    add('<section id="downloads"><h2>Downloads</h2>')
    add(f"<p>{dl['attempted']:,} rows reached the downloader; {dl['failed']:,} failed there.</p>")
    add(_plot(plot_downloads(dl), "download errors", "No download errors."))
    add("<h3>Domains with most failures</h3>")
    add(_table(["domain", "failures", "rows", "failure share", "reasons"],
               [[d["domain"], d["failures"], d["rows"], _pct(d["failure_share"]),
                 ", ".join(f"{k} {v}" for k, v in d["reasons"].items())] for d in dl["top_failing_domains"]],
               numeric=(1, 2, 3)))
    add("</section>")

    add(site_policy_html(s["site_policies"]))

    neg = s["hard_negatives"]
    add('<section id="negatives"><h2>Hard negatives</h2>')
    if neg["triples"]:
        add(f"<p>{neg['anchors_with_negatives']:,} kept samples carry negatives; by kind: "
            + _e(", ".join(f"{k} {v:,}" for k, v in neg["negatives_by_kind"].items())) + "</p>")
        if neg.get("recall"):
            add("<p>Recall of the neighbour search against an exact search over every kept sample, on "
                + _e(", ".join(f"{space} {r['found']:,} of {r['exact']:,} ({r['recall']:.1%}, {r['queries']:,} sampled queries)"
                               for space, r in neg["recall"].items()))
                + ": below 100% the search is approximate (see <code>negatives_probe</code> and "
                  "<code>negatives_group_size</code>).</p>")
        for t in neg["triples"]:
            # (title, item, show a picture): a caption negative is text only, paired with the anchor's image.
            cells = [("anchor", t["anchor"], True)]
            if t["image_negative"]:
                cells.append(("image negative", t["image_negative"], True))
            if t["caption_negative"]:
                cells.append((f"caption negative ({t['caption_negative']['kind']})", t["caption_negative"], False))
            add('<div class="triple">')
            for title, item, pictured in cells:
                picture = _img(thumbs.get(item.get("uid") or ""), item["caption"] or "") if pictured else ""
                score = f" &middot; score {_e(item['score'])}" if item.get("score") is not None else ""
                add(f'<div class="ex"><b>{_e(title)}</b>{score}{picture}<div>&ldquo;{_e(item["caption"])}&rdquo;</div></div>')
            add("</div>")
    else:
        add('<p class="muted">No hard negatives in this run.</p>')
    add("</section>")

    add('<section id="time"><h2>Time and throughput per phase</h2>')
    add(_plot(plot_timings(s["timings"]), "time per phase", "No phase timings recorded."))
    add(_table(["phase", "seconds", "CPU seconds", "rows", "rows/s", "peak memory (MB)", "finished at (UTC)"],
               [[p, s["timings"][p]["seconds"], s["timings"][p].get("cpu_seconds"), s["phases"][p]["rows"],
                 s["timings"][p]["rows_per_s"], s["timings"][p]["peak_rss_mb"], s["timings"][p]["finished_at"]]
                for p in PHASES],
               numeric=(1, 2, 3, 4, 5)))
    counters = [[p, name, value] for p in PHASES for name, value in s["phases"][p]["counters"].items()]
    if counters:
        add("<details><summary>Beam counters</summary>" + _table(["phase", "counter", "value"], counters, numeric=(2,))
            + "</details>")
    add("</section>")

    add('<section id="config"><h2>Config and models</h2>')
    add(_table(["model setting", "value"], [[k, json.dumps(v)] for k, v in s["models"].items()]))
    if s["config_keys_differing_between_phases"]:
        add("<p>Keys that differed between phases (shown: the latest phase's): "
            + _e(", ".join(s["config_keys_differing_between_phases"])) + "</p>")
    add("<details open><summary>Full config</summary>"
        + _table(["key", "value"], [[k, json.dumps(v, sort_keys=True)] for k, v in sorted(s["config"].items())])
        + "</details></section>")
    add("</main></body></html>")
    return "\n".join(parts)


def site_policy_html(policies: dict) -> str:
    fetches = policies["policy_fetches"]
    parts = ['<section id="policies"><h2>Site policies</h2>',
             f"<p>{policies['rows_refused']:,} rows refused by their site's owner, on "
             f"{policies['hosts_with_refusals']:,} hosts. Each check has its own config key; turning one off "
             "is the user's responsibility (README, \u201cSite policies\u201d).</p>",
             _table(["signal", "reason", "rows refused", "config key", "on"],
                    [[c["signal"], c["reason"], c["rows_refused"], c["config_key"], "yes" if c["on"] else "OFF"]
                     for c in policies["checks"]], numeric=(2,))]
    if policies["top_hosts"]:
        parts.append("<h3>Hosts with most refusals</h3>")
        parts.append(_table(["host", "rows refused", "reasons"],
                            [[h["host"], h["rows_refused"], ", ".join(f"{k} {v}" for k, v in h["reasons"].items())]
                             for h in policies["top_hosts"]], numeric=(1,)))
    parts.append("<h3>Cost of the policy files</h3>")
    if fetches:
        parts.append(_table(["counter (per worker: one request per host, then cache hits)", "value"],
                            [[k, v] for k, v in fetches.items()], numeric=(1,)))
    else:
        parts.append('<p class="muted">No policy file was fetched in this run.</p>')
    parts.append("</section>")
    return "".join(parts)


def _thumbnail_uids(summary: dict) -> set:
    uids = set()
    for reason, examples in summary["examples"].items():
        for ex in examples:
            if ex["image_stored"]:
                uids.add(ex["uid"])
            if ex.get("duplicate_of") and reason in SHOW_SURVIVOR_REASONS:
                uids.add(ex["duplicate_of"])
    for t in summary["hard_negatives"]["triples"]:
        uids.add(t["anchor"]["uid"])
        if t["image_negative"] and t["image_negative"].get("uid"):
            uids.add(t["image_negative"]["uid"])
    return uids


def write_report(layout: Layout, summary: dict, phases: Optional[dict] = None) -> str:
    """Write report/summary.json and report/index.html; returns the page's path.

    `summary` is what `account()` returned; `phases` maps phase -> its run/{phase}.json (read
    from the layout when None or when given as bare seconds).
    """
    infos = phases if phases and all(isinstance(v, dict) or v is None for v in phases.values()) else phase_infos(layout)
    full, rows, config = build_summary(layout, summary, infos)
    thumbs = load_thumbnails(layout, _thumbnail_uids(full))
    write_atomically(join_path(layout.report, "summary.json"), summary_json(full))
    page = render_html(full, rows, thumbs)
    path = join_path(layout.report, "index.html")
    write_atomically(path, page.encode("utf-8"))
    return path
