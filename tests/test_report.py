"""The run report: figures equal the ledger, the page is self-contained and renders in a real browser,
and the terminal progress prints rate and ETA."""

from __future__ import annotations

import collections
import html.parser
import io
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import progress
from pipeline.layout import Layout
from pipeline.report import (
    EXAMPLES_PER_REASON,
    FUNNEL_STAGES,
    REASON_STAGE,
    account,
    funnel,
    reason_stage,
)
from schemas import LEDGER_SCHEMA, SHARD_SCHEMA, Col, DropReason, Status
from tests.conftest import in_process_pipeline, run_cli

CHROMIUM = Path("/usr/bin/chromium")


def _ledger(out: Path) -> list[dict]:
    return pq.read_table(sorted((out / "ledger").glob("*.parquet"))).to_pylist()


def _summary(out: Path) -> dict:
    return json.loads((out / "report" / "summary.json").read_text())


# ---------------------------------------------------------------------------------------------
# An output with every optional section populated: CLIP scores, image duplicates, hard negatives.
# The demo run has none of those yet (other stages land them), so a copy of it is edited the way
# those stages will write it: scores on every decoded row, decide-phase drops, negatives in shards.
# ---------------------------------------------------------------------------------------------

THRESHOLD = 0.28


def _score(uid: str) -> float:
    return round(0.25 + (int(uid[:6], 16) % 1000) / 1000 * 0.15, 4)  # ~20% below THRESHOLD


@pytest.fixture(scope="module")
def enriched_output(demo_output, tmp_path_factory):
    out = tmp_path_factory.mktemp("enriched") / "out"
    shutil.copytree(demo_output, out, ignore=shutil.ignore_patterns("report"))
    enrich(out)
    assert run_cli("report", str(out)) == 0
    return out


def enrich(out: Path) -> None:
    ledger_path = sorted((out / "ledger").glob("*.parquet"))
    rows = [r for p in ledger_path for r in pq.read_table(p).to_pylist()]
    kept = sorted((r for r in rows if r[Col.STATUS] == Status.KEPT), key=lambda r: r[Col.UID])
    for row in rows:
        if row[Col.WIDTH] is not None:
            row[Col.CLIP_SCORE] = _score(row[Col.UID])
    high = [r for r in kept if r[Col.CLIP_SCORE] >= THRESHOLD]
    survivor_a, survivor_b = high[0], high[1]
    drops = {high[2][Col.UID]: (DropReason.DUPLICATE_NEAR, survivor_a), high[3][Col.UID]: (DropReason.DUPLICATE_NEAR, survivor_a),
             high[4][Col.UID]: (DropReason.DUPLICATE_EXACT, survivor_b)}
    for row in kept:
        if row[Col.UID] in drops:
            reason, survivor = drops[row[Col.UID]]
            row.update({Col.STATUS: Status.DROPPED, Col.REASON: reason.value, Col.DUPLICATE_OF: survivor[Col.UID],
                        Col.SHARD: None})
        elif row[Col.CLIP_SCORE] < THRESHOLD:
            row.update({Col.STATUS: Status.DROPPED, Col.REASON: DropReason.LOW_CLIP_SCORE.value, Col.SHARD: None})
    for path in ledger_path:
        path.unlink()
    pq.write_table(pa.Table.from_pylist(rows, schema=LEDGER_SCHEMA), ledger_path[0])
    still_kept = [r[Col.UID] for r in kept if r[Col.STATUS] == Status.KEPT]
    next_kept = {u: still_kept[(i + 1) % len(still_kept)] for i, u in enumerate(still_kept)}
    captions = {r[Col.UID]: r[Col.CAPTION] for r in kept}
    for path in sorted((out / "shards").glob("*.parquet")):
        shard = [r for r in pq.read_table(path).to_pylist() if r[Col.KEY] in next_kept]
        for r in shard:
            other = next_kept[r[Col.KEY]]
            r[Col.HARD_NEGATIVES] = [
                {"uid": other, "caption": captions[other], "score": 0.81, "kind": "image"},
                {"uid": other, "caption": captions[other], "score": 0.77, "kind": "text"},
                {"uid": None, "caption": "a purple cross on a navy background", "score": None, "kind": "attribute"},
            ]
        pq.write_table(pa.Table.from_pylist(shard, schema=SHARD_SCHEMA), path)


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------


def test_every_reason_has_a_funnel_stage():
    assert set(REASON_STAGE) == {r.value for r in DropReason}
    assert len(REASON_STAGE) == sum(len(reasons) for _, _, reasons in FUNNEL_STAGES)  # one stage each


def test_funnel_steps_add_up():
    steps = funnel(100, {"malformed_row": 2, "timeout": 3, "duplicate_near": 4, "not_a_known_reason": 1})
    assert [s["remaining"] for s in steps] == [98, 98, 95, 95, 95, 91, 90]
    assert reason_stage("not_a_known_reason") == "errors"


def test_summary_matches_the_ledger(demo_output):
    summary = _summary(demo_output)
    rows = _ledger(demo_output)
    kept = [r for r in rows if r[Col.STATUS] == Status.KEPT]
    reasons = collections.Counter(r[Col.REASON] for r in rows if r[Col.STATUS] == Status.DROPPED)
    assert summary["rows_in"] == len(rows) and summary["kept"] == len(kept)
    assert summary["drop_reasons"] == dict(reasons)
    assert summary["funnel"][-1]["remaining"] == len(kept)
    assert sum(step["dropped"] for step in summary["funnel"]) == summary["dropped"]
    table = {r["reason"]: r for r in summary["drop_reason_table"]}
    assert {k: v["count"] for k, v in table.items()} == dict(reasons)
    assert table["duplicate_row"]["share_of_rows"] == round(reasons["duplicate_row"] / len(rows), 4)
    langs = summary["languages"]["languages"]
    assert sum(v["kept"] + v["dropped"] for v in langs.values()) == len(rows)
    assert langs["en"]["kept"] == sum(1 for r in kept if r[Col.LANG] == "en")
    fetch_reasons = {r.value for stage, _, rs in FUNNEL_STAGES if stage == "fetch" for r in rs}
    failures = [r for r in rows if r[Col.REASON] in fetch_reasons]
    assert summary["downloads"]["error_classes"] == dict(collections.Counter(r[Col.REASON] for r in failures))
    domains = collections.Counter(urlsplit(r[Col.URL]).hostname for r in failures)
    top = summary["downloads"]["top_failing_domains"][0]
    assert top["failures"] == max(domains.values()) and domains[top["domain"]] == top["failures"]
    statuses = collections.Counter(str(r[Col.HTTP_STATUS]) for r in rows if r[Col.HTTP_STATUS] is not None)
    assert summary["downloads"]["http_status"] == dict(statuses)
    assert summary["image_sizes"]["shorter_side_kept"]["count"] == sum(1 for r in kept if r[Col.ORIGINAL_WIDTH])
    assert summary["caption_lengths"]["chars_kept"]["max"] == max(len(r[Col.CAPTION]) for r in kept)
    for reason, examples in summary["examples"].items():
        assert 1 <= len(examples) <= EXAMPLES_PER_REASON
        uids = sorted(r[Col.UID] for r in rows if r[Col.REASON] == reason)
        assert [e["uid"] for e in examples] == uids[:EXAMPLES_PER_REASON]  # lowest uids
    assert summary["models"]["clip_model"] and "clip_threshold" in summary["config"]
    assert set(summary["timings"]) == {"fetch", "decide", "write"}
    assert summary["timings"]["fetch"]["seconds"] > 0 and summary["timings"]["fetch"]["rows_per_s"] > 0
    assert summary["clip"]["available"] is (any(r[Col.CLIP_SCORE] is not None for r in rows))


def test_optional_sections_appear_when_their_data_exists(enriched_output):
    summary = _summary(enriched_output)
    rows = _ledger(enriched_output)
    assert account(Layout(str(enriched_output)))["accounting_ok"]
    clip = summary["clip"]
    scored = [r for r in rows if r[Col.CLIP_SCORE] is not None]
    assert clip["available"] and clip["scored_rows"] == len(scored) and clip["effective_threshold"] == THRESHOLD
    assert clip["kept"]["count"] == sum(1 for r in scored if r[Col.STATUS] == Status.KEPT)
    assert sum(clip["histogram"]["kept"]) == clip["kept"]["count"]
    assert sum(clip["histogram"]["dropped"]) == clip["dropped"]["count"]
    assert clip["kept"]["min"] >= THRESHOLD
    dups = [r for r in rows if r[Col.REASON] in (DropReason.DUPLICATE_EXACT.value, DropReason.DUPLICATE_NEAR.value)]
    per_survivor = collections.Counter(r[Col.DUPLICATE_OF] for r in dups)
    sizes = collections.Counter(count + 1 for count in per_survivor.values())
    assert len(per_survivor) >= 2  # the two planted clusters, plus the demo's real ones
    assert summary["duplicates"]["clusters"] == len(per_survivor)
    assert summary["duplicates"]["cluster_sizes"] == {str(k): v for k, v in sorted(sizes.items())}
    assert summary["funnel"][[s["stage"] for s in summary["funnel"]].index("dedup")]["dropped"] == len(dups)
    negatives = summary["hard_negatives"]
    assert negatives["available"] and negatives["triples"]
    triple = negatives["triples"][0]
    assert triple["image_negative"]["kind"] == "image" and triple["caption_negative"]["kind"] == "attribute"
    page = (enriched_output / "report" / "index.html").read_text()
    assert clip["dropped_low_clip"]["count"] == summary["drop_reasons"][DropReason.LOW_CLIP_SCORE.value]
    for text in ("threshold 0.28", f"{len(per_survivor)} image clusters ({len(dups)} duplicates dropped", "image negative",
                 "caption negative (attribute)", "a purple cross on a navy background"):
        assert text in page, text
    # Decide-phase drops have their image in raw/: thumbnails, not placeholders.
    low = summary["examples"][DropReason.LOW_CLIP_SCORE.value]
    assert all(e["image_stored"] for e in low)
    assert page.count("data:image/jpeg;base64,") >= len(low) + 2 * len(negatives["triples"])


def test_report_is_deterministic(demo_output, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(demo_output, out)
    before = [(out / "report" / name).read_bytes() for name in ("summary.json", "index.html")]
    assert run_cli("report", str(out)) == 0
    after = [(out / "report" / name).read_bytes() for name in ("summary.json", "index.html")]
    assert before == after


# ---------------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------------


class _Links(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs, self.tags = [], collections.Counter()

    def handle_starttag(self, tag, attrs):
        self.tags[tag] += 1
        self.refs += [(tag, name, value or "") for name, value in attrs if name in ("src", "href", "srcset", "data")]


def _check_self_contained(page: str) -> _Links:
    links = _Links()
    links.feed(page)
    for tag, name, value in links.refs:
        assert value.startswith(("data:image/png;base64,", "data:image/jpeg;base64,", "#")), (tag, name, value[:80])
    assert not links.tags["script"] and not links.tags["link"] and not links.tags["iframe"]
    assert not re.search(r"url\(\s*['\"]?(https?:)?//", page)  # nothing fetched from CSS either
    return links


def test_page_is_self_contained(demo_output, enriched_output):
    for out in (demo_output, enriched_output):
        page = (out / "report" / "index.html").read_text(encoding="utf-8")
        links = _check_self_contained(page)
        assert links.tags["img"] >= 5
        assert (out / "report" / "index.html").stat().st_size < 3_000_000  # bounded: a few examples per reason
    # Input URLs (javascript:, file:, ...) are shown as escaped text, never as links.
    page = (demo_output / "report" / "index.html").read_text()
    assert "javascript:alert" in page and 'href="javascript' not in page


_CHECK_SCRIPT = """<script>window.addEventListener("load", function () {
  var imgs = [].slice.call(document.images);
  var broken = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); }).map(function (i) { return i.alt; });
  var out = document.createElement("pre"); out.id = "curate-check";
  out.textContent = JSON.stringify({images: imgs.length, broken: broken, height: document.body.scrollHeight});
  document.body.appendChild(out);
});</script>"""


def _chromium(*args: str, timeout: int = 90) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(
            [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--hide-scrollbars", f"--user-data-dir={profile}", *args],
            capture_output=True, text=True, timeout=timeout,
        )


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium (.ci/run installs it)")
def test_page_renders_in_headless_chromium(enriched_output, tmp_path):
    from PIL import Image, ImageStat

    page = (enriched_output / "report" / "index.html").read_text(encoding="utf-8")
    expected_images = page.count("<img ")
    # A copy with a checker script: the report itself carries no script.
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", _CHECK_SCRIPT + "</body>"), encoding="utf-8")
    dom = _chromium("--virtual-time-budget=10000", "--dump-dom", probe.as_uri())
    found = re.search(r'<pre id="curate-check">([^<]*)</pre>', dom.stdout)
    assert found, dom.stderr[-2000:]
    check = json.loads(found.group(1).replace("&quot;", '"'))
    assert check["images"] == expected_images >= 10
    assert check["broken"] == []
    assert check["height"] > 3000  # every section laid out, not an error page

    shot = tmp_path / "report.png"
    _chromium("--window-size=1280,2400", f"--screenshot={shot}", (enriched_output / "report" / "index.html").as_uri())
    assert shot.exists()
    image = Image.open(shot).convert("RGB")
    assert image.size == (1280, 2400)
    small = image.resize((320, 600))
    colours = len(small.getcolors(maxcolors=1 << 20))
    stddev = sum(ImageStat.Stat(small).stddev) / 3
    assert colours > 200 and stddev > 20, (colours, stddev)  # plots and text, not a blank page
    # The header band is the report's blue: the page rendered our CSS, not a browser error page.
    r, g, b = image.getpixel((640, 10))
    assert b > 150 and r < 100, (r, g, b)


# ---------------------------------------------------------------------------------------------
# Terminal progress
# ---------------------------------------------------------------------------------------------


def _slow(x):
    time.sleep(0.002)
    return x


def test_progress_prints_rate_and_eta_for_a_small_run():
    stream = io.StringIO()
    progress.start_phase("fetch", total_rows=1500, stream=stream, interval_s=0.2)
    try:
        with in_process_pipeline() as pipeline:
            (pipeline | beam.Create(list(range(1500)), reshuffle=False)
             | "Work" >> beam.Map(_slow)
             | "Progress" >> progress.ReportProgress("fetch", "fetched"))
    finally:
        progress.finish_phase()
    lines = [line for line in stream.getvalue().splitlines() if line.strip()]
    assert len(lines) >= 3, lines  # refreshed while running, plus the final line
    running = [line for line in lines[:-1] if re.search(
        r"^\[curate\] fetch: fetched \d[\d,]*/1,500 rows \(\d+%\), [\d,.]+ rows/s, ETA \w+", line)]
    assert running, lines  # at least one refresh while the work was in progress
    assert re.match(r"^\[curate\] fetch: fetched 1,500 rows \(100%\) in \d+s, [\d,.]+ rows/s$", lines[-1]), lines[-1]
    assert not any("100%" in line for line in lines[:-1] if "1,500/1,500" not in line)
    assert progress.current() is None


def test_progress_over_passes_gives_one_eta_for_the_phase():
    clock = iter(float(t) for t in range(1000))
    progress.declare_passes("decide", [("read", 1.0), ("search", 3.0)])
    try:
        reporter = progress.ProgressReporter("decide", 100, stream=io.StringIO(), clock=lambda: next(clock))
        reporter.add_pass("read", 100)  # the first pass done: a quarter of the phase
        reporter.add_pass("search", 50, total=200)  # a quarter of the second: 3/16 more
        line = reporter.line()
        assert "pass 2/2 search, 50/200 rows" in line and "44% of the phase" in line and "ETA" in line
        records = {r["pass"]: r for r in reporter.pass_records()}
        assert records["read"]["rows"] == 100 and records["search"]["rows"] == 50
    finally:
        progress.declare_passes("decide", [])


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_progress_eta_waits_until_it_means_something_and_rates_are_smoothed():
    clock = _Clock()
    reporter = progress.ProgressReporter("fetch", 10_000, stream=io.StringIO(), clock=clock)
    clock.now = 5.0
    assert "ETA estimating" in reporter.line() or "starting" in reporter.line()
    for second in range(6, 17):  # 100 rows/s for 10 s: too early (and too little) for an ETA
        clock.now = float(second)
        reporter.add("rows done", 100)
    assert "ETA estimating" in reporter.line()
    for second in range(17, 40):  # bursts of 500 every 5 s (bundles) are ~100 rows/s smoothed
        clock.now = float(second)
        if second % 5 == 0:
            reporter.add("rows done", 500)
    line = reporter.line()
    rate = float(re.search(r"([\d.]+) rows/s", line).group(1))
    assert 80 <= rate <= 125, line
    eta = re.search(r"ETA (\d+)m(\d+)s", line)
    assert eta and 60 <= int(eta.group(1)) * 60 + int(eta.group(2)) <= 120, line


def test_progress_follows_the_last_stage_and_never_shows_100_before_it_is_done():
    clock = _Clock()
    reporter = progress.ProgressReporter("fetch", 300, stream=io.StringIO(), clock=clock,
                                         stages=[("rows read", None), ("rows done", None)])
    clock.now = 1.0
    reporter.add("rows read", 300)  # every row read at once, none done yet
    line = reporter.line()
    assert "rows done 0/300 rows (0%)" in line and "100%" not in line and "-" not in line.split("ETA")[0], line
    clock.now = 30.0
    reporter.add("rows done", 299)
    assert "(99%)" in reporter.line()
    clock.now = 31.0
    reporter.add("rows done", 1)
    assert "(100%)" in reporter.line() and "ETA finishing" in reporter.line()


def test_process_tree_memory_counts_a_child_and_forgets_it_once_it_exits():
    """A real child holding 200 MB: counted once the tree is looked up again, gone after it exits."""
    import sys

    now = [0.0]
    tree = progress.ProcessTree(os.getpid(), refresh_s=5.0, clock=lambda: now[0])
    alone = tree.rss_bytes()
    child = subprocess.Popen([sys.executable, "-c", "import sys, time; b = bytearray(200 << 20); b[::4096] = "
                              "b'x' * len(b[::4096]); print('ready', flush=True); sys.stdin.read()"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        assert tree.rss_bytes() < alone + (100 << 20)  # not looked up again yet: the sample stays cheap
        now[0] = 6.0
        assert tree.rss_bytes() > alone + (190 << 20)
        assert child.pid in progress.descendants(os.getpid())
    finally:
        child.stdin.close()
        child.wait(timeout=30)
    now[0] = 12.0
    assert tree.rss_bytes() < alone + (100 << 20)


def test_progress_prints_less_often_when_not_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    assert progress.ProgressReporter("fetch", 1, stream=io.StringIO()).interval_s == progress.DEFAULT_PIPE_INTERVAL_S
    assert progress.ProgressReporter("fetch", 1, stream=Terminal()).interval_s == progress.DEFAULT_INTERVAL_S
    assert progress.DEFAULT_PIPE_INTERVAL_S >= 10 * progress.DEFAULT_INTERVAL_S


def test_progress_is_silent_without_a_reporter_and_says_unknown_without_a_total():
    with in_process_pipeline() as pipeline:  # no reporter started (a Dataflow worker): pass-through only
        (pipeline | beam.Create([1, 2, 3]) | progress.ReportProgress("fetch", "rows")
         | beam.combiners.Count.Globally() | beam.Map(lambda n: n == 3))
    clock = iter(range(0, 1000, 2))
    reporter = progress.ProgressReporter("decide", None, stream=io.StringIO(), clock=lambda: next(clock))
    reporter.add("decided", 40)
    assert "40 rows (total unknown)" in reporter.line() and "ETA unknown" in reporter.line()


def test_input_rows_are_precounted_for_local_files(tmp_path):
    from pipeline.config import build_config

    (tmp_path / "a.csv").write_text("url,caption\nhttp://x/1,a b c\nhttp://x/2,d e f\n")
    (tmp_path / "b.jsonl").write_text('{"url": "http://x/3"}\n{"url": "http://x/4"}\n{"url": "http://x/5"}')
    config = build_config(input=f"{tmp_path}/a.csv,{tmp_path}/*.jsonl")
    assert progress.count_input_rows(config) == 5
    assert progress.count_input_rows(build_config(input="gs://bucket/rows/*.csv")) is None


def test_clip_section_handles_percentile_and_per_language_thresholds():
    import numpy as np

    from pipeline.report import clip_figures, plot_clip

    rows = {Col.CLIP_SCORE: np.array([0.1, 0.2, np.nan, 0.3, 0.4]),
            "_kept": np.array([False, False, False, True, True]),
            "_reason": np.array([0, 0, 1, 2, 2]), "_reason_values": ["low_clip_score", "timeout", ""]}
    config = {"clip_threshold": 0.28, "clip_keep_top_percent": 40.0, "clip_thresholds_per_lang": {"de": 0.25}}
    clip = clip_figures(rows, config)
    assert clip["scored_rows"] == 4 and clip["effective_threshold"] == 0.3
    assert clip["dropped_low_clip"]["count"] == 2 and clip["thresholds_per_lang"] == {"de": 0.25}
    assert plot_clip(clip).startswith("data:image/png;base64,")
    assert clip_figures({**rows, Col.CLIP_SCORE: np.full(5, np.nan)}, {})["available"] is False
