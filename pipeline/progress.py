"""Terminal progress for local runs: rows processed, rate and ETA of the phase in progress.

How it fits together:
- the CLI calls `start_phase(phase, total_rows)` before running a phase and `finish_phase()`
  after it; that starts one reporter thread in the launching process, which prints a line to
  stderr every `interval_s` seconds;
- a phase builder wraps the PCollections worth counting with `ReportProgress(phase, stage)`, a
  pass-through ParDo that adds to the reporter of the process it runs in.

On the in-process DirectRunner (the local default) the DoFns run in the launching process, so the
counts reach the reporter. On Dataflow (or DirectRunner multi_processing) the DoFns run in other
processes where no reporter was started: the transform then only passes elements through (no
output, no cost beyond a function call), and the launcher prints nothing because it has no counts.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import IO, Optional, Sequence

import apache_beam as beam

DEFAULT_INTERVAL_S = 2.0  # on a terminal, where the line is overwritten in place
DEFAULT_PIPE_INTERVAL_S = 30.0  # to a file or a pipe (CI logs), where every line stays
_RATE_WINDOW_S = 30.0  # rate over the recent past: reacts to slow-downs, smooths bundle bursts
_ETA_AFTER_S = 20.0  # no ETA until rows have been done for this long...
_ETA_AFTER_SHARE = 0.05  # ...and this share of the total is done: earlier it only swings
_FLUSH_EVERY = 64  # elements a DoFn counts locally before taking the reporter's lock...
_FLUSH_AFTER_S = 0.5  # ...or seconds since its last flush, whichever comes first


def _duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "unknown"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _trim(history: list, now: float) -> None:
    """Drop counts older than the rate window, keeping one just before it as the rate's start."""
    while len(history) > 2 and now - history[1][0] > _RATE_WINDOW_S:
        history.pop(0)


def _percent(done: int, total: int) -> int:
    """Rounded down, and never 100 before every row is done."""
    percent = 100 * done // total
    return min(percent, 99) if done < total else 100


class ProgressReporter:
    """Counts per stage of one phase; a daemon thread prints them with rate and ETA.

    The line follows the stage furthest behind (the one that decides when the phase ends); stages
    the phase builder declared (`watch`) count from 0 before their first row, so a phase never
    shows 100% while its last stage has not started. The rate is that stage's own, measured over
    the last `_RATE_WINDOW_S` seconds from its first row on (never the start-up, never another
    stage's counts: it cannot go negative); the ETA waits until it means something.
    """

    def __init__(self, phase: str, total_rows: Optional[int], stream: IO[str] = None,
                 interval_s: Optional[float] = None, clock=time.monotonic, stages: Sequence[tuple] = ()):
        self.phase = phase
        self.total_rows = total_rows
        self.stream = stream if stream is not None else sys.stderr
        # Overwrite one line on a terminal; append lines to a file or a pipe (CI logs, tests).
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        if interval_s is None:
            interval_s = DEFAULT_INTERVAL_S if self._tty else DEFAULT_PIPE_INTERVAL_S
        self.interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self._totals: dict[str, Optional[int]] = {}
        self._history: dict[str, list[tuple[float, int]]] = {}  # per stage: (time, count) over the rate window
        self._first_done: dict[str, float] = {}  # per stage: when its first rows were counted
        self._started = clock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        for stage, total in stages:  # declared by the phase builder: shown from 0
            self._counts.setdefault(stage, 0)
            self._totals.setdefault(stage, total if total is not None else total_rows)

    # -- counting (called from DoFns, any thread) ---------------------------------------------
    def add(self, stage: str, count: int, total_rows: Optional[int] = None) -> None:
        with self._lock:
            if stage not in self._counts:
                self._counts[stage] = 0
                self._totals[stage] = total_rows if total_rows is not None else self.total_rows
            self._counts[stage] += count
            now = self._clock()
            if stage not in self._first_done:
                self._first_done[stage] = now
                self._history[stage] = [(now, 0)]
            history = self._history[stage]
            history.append((now, self._counts[stage]))
            _trim(history, now)

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    # -- rendering -----------------------------------------------------------------------------
    def _eta_stage(self) -> Optional[str]:
        """The stage furthest behind among those with a known total: it decides when we finish."""
        known = [(self._counts[s] / t, s) for s, t in self._totals.items() if t]
        return min(known)[1] if known else (next(reversed(self._counts)) if self._counts else None)

    def _rate(self, stage: str, now: float) -> Optional[float]:
        """Rows per second of `stage` over the recent window; None before it has done two counts."""
        history = self._history.get(stage) or []
        _trim(history, now)
        if len(history) < 2:
            return None
        then, before = history[0]
        span = now - then
        return max(history[-1][1] - before, 0) / span if span > 0.5 else None

    def line(self, final: bool = False) -> str:
        now = self._clock()
        with self._lock:
            stage = self._eta_stage()
            counts = dict(self._counts)
            totals = dict(self._totals)
            rate = self._rate(stage, now) if stage is not None else None
            first_done = self._first_done.get(stage)
        elapsed = now - self._started
        if stage is None:
            return f"[curate] {self.phase}: starting ({_duration(elapsed)} elapsed)"
        done, total = counts[stage], totals.get(stage)
        others = ", ".join(f"{s} {c:,}" for s, c in counts.items() if s != stage)
        tail = f" [{others}]" if others else ""
        if final:
            average = done / (now - first_done) if first_done is not None and now - first_done > 0 else 0.0
            share = f" ({_percent(done, total)}%)" if total and done >= total else ""
            return (f"[curate] {self.phase}: {stage} {done:,} rows{share} in {_duration(elapsed)}, "
                    f"{average:,.1f} rows/s" + tail)
        rate_text = f"{rate:,.1f} rows/s" if rate is not None else "rate measuring"
        if total:
            progress = f"{done:,}/{total:,} rows ({_percent(done, total)}%)"
            meaningful = (first_done is not None and now - first_done >= _ETA_AFTER_S
                          and done >= _ETA_AFTER_SHARE * total and rate)
            eta = _duration(max(total - done, 0) / rate) if meaningful else "estimating"
            if done >= total:
                eta = "finishing"
        else:
            eta, progress = "unknown", f"{done:,} rows (total unknown)"
        return (
            f"[curate] {self.phase}: {stage} {progress}, {rate_text}, ETA {eta}, "
            f"{_duration(elapsed)} elapsed" + tail
        )

    def _emit(self, text: str, final: bool = False) -> None:
        try:
            if self._tty:
                self.stream.write("\r\x1b[2K" + text + ("\n" if final else ""))
            else:
                self.stream.write(text + "\n")
            self.stream.flush()
        except (OSError, ValueError):  # a closed stream must never fail the pipeline
            pass

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._emit(self.line())

    def start(self) -> "ProgressReporter":
        self._thread = threading.Thread(target=self._loop, name=f"curate-progress-{self.phase}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if any(self.counts().values()):
            self._emit(self.line(final=True), final=True)


_REPORTER: Optional[ProgressReporter] = None
_REPORTER_LOCK = threading.Lock()
_DECLARED: dict[str, list[tuple[str, Optional[int]]]] = {}  # phase -> stages `watch` saw wired


def current() -> Optional[ProgressReporter]:
    return _REPORTER


def start_phase(phase: str, total_rows: Optional[int] = None, stream: IO[str] = None,
                interval_s: Optional[float] = None) -> ProgressReporter:
    """Start reporting a phase in this process (stops the previous phase's reporter). The period:
    `interval_s`, else CURATE_PROGRESS_INTERVAL_S, else 2 s on a terminal and 30 s off one."""
    global _REPORTER
    if interval_s is None and os.environ.get("CURATE_PROGRESS_INTERVAL_S"):
        interval_s = float(os.environ["CURATE_PROGRESS_INTERVAL_S"])
    with _REPORTER_LOCK:
        if _REPORTER is not None:
            _REPORTER.stop()
        _REPORTER = ProgressReporter(phase, total_rows, stream=stream, interval_s=interval_s,
                                     stages=_DECLARED.pop(phase, ())).start()
        return _REPORTER


def finish_phase() -> None:
    global _REPORTER
    with _REPORTER_LOCK:
        if _REPORTER is not None:
            _REPORTER.stop()
        _REPORTER = None


class _CountDoFn(beam.DoFn):
    def __init__(self, phase: str, stage: str, total_rows: Optional[int]):
        self._phase = phase
        self._stage = stage
        self._total = total_rows
        self._pending = 0

    def start_bundle(self):
        self._pending = 0
        self._flushed_at = time.monotonic()

    def _flush(self) -> None:
        # Looked up at run time, never captured: a pickled copy on a remote worker finds None.
        reporter = _REPORTER
        if reporter is not None and self._pending and reporter.phase == self._phase:
            reporter.add(self._stage, self._pending, self._total)
        self._pending = 0
        self._flushed_at = time.monotonic()

    def process(self, element):
        self._pending += 1
        # Batched for fast stages, but never held back longer than a moment for slow ones.
        if self._pending >= _FLUSH_EVERY or time.monotonic() - self._flushed_at > _FLUSH_AFTER_S:
            self._flush()
        yield element

    def finish_bundle(self):
        self._flush()


class ReportProgress(beam.PTransform):
    """Pass-through that counts elements for the terminal progress line of `phase`.

    `total_rows` is what the stage is expected to reach (for the ETA); None means "the phase's
    total" as given to `start_phase` by the CLI (unknown when that is None too).
    """

    def __init__(self, phase: str, stage: str, total_rows: Optional[int] = None):
        super().__init__()
        self._phase = phase
        self._stage = stage
        self._total = total_rows

    def expand(self, pcoll):
        # Remembered on the pipeline so the CLI's fallback `watch` does not count the phase twice,
        # and so the progress line knows the phase's stages before their first row (`watch`).
        wired = getattr(pcoll.pipeline, "_curate_progress_phases", set())
        pcoll.pipeline._curate_progress_phases = wired | {self._phase}
        stages = getattr(pcoll.pipeline, "_curate_progress_stages", [])
        pcoll.pipeline._curate_progress_stages = stages + [(self._phase, self._stage, self._total)]
        return pcoll | "Count" >> beam.ParDo(_CountDoFn(self._phase, self._stage, self._total))


# What each phase builder returns, counted for the progress line (one element per row).
PHASE_STAGES = {"fetch": "rows fetched", "decide": "rows decided", "write": "ledger rows"}


def watch(rows, phase: str, stage: Optional[str] = None) -> None:
    """Fallback for a phase whose builder wired no ReportProgress: count what the builder returned
    (a side branch; the graph is otherwise unchanged). Coarser: a Flatten or a join before it makes
    the count move in steps."""
    if not isinstance(rows, beam.pvalue.PCollection):
        return
    if phase not in getattr(rows.pipeline, "_curate_progress_phases", set()):
        rows | f"Progress{phase.capitalize()}" >> ReportProgress(phase, stage or PHASE_STAGES.get(phase, "rows"))
    # the next start_phase(phase) shows these stages from 0
    _DECLARED[phase] = [(s, total) for p, s, total in rows.pipeline._curate_progress_stages if p == phase]


# ---------------------------------------------------------------------------------------------
# Cheap totals for the ETA (local files only: never worth a remote scan)
# ---------------------------------------------------------------------------------------------

_MAX_COUNT_BYTES = 2_000_000_000  # counting newlines in more than this costs more than it tells


def _local_paths(pattern_list: str) -> Optional[list[str]]:
    import glob

    paths = []
    for pattern in (p.strip() for p in pattern_list.split(",")):
        if not pattern:
            continue
        if "://" in pattern:
            return None
        paths.extend(sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern])
    return paths


def _count_file_rows(path: str, fmt: str) -> Optional[int]:
    import gzip

    if fmt == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    if fmt == "webdataset":
        import tarfile

        # Distinct keys = samples; tarfile seeks past member data, so this reads headers only.
        with tarfile.open(path, "r:") as archive:
            return len({m.name.rsplit("/", 1)[-1].split(".", 1)[0] for m in archive if m.isfile()})
    if path.endswith((".bz2", ".zst", ".zstd", ".deflate")):
        return None
    opener = gzip.open if path.endswith(".gz") else open
    lines, last = 0, b"\n"
    with opener(path, "rb") as handle:
        while True:
            block = handle.read(1 << 20)
            if not block:
                break
            lines += block.count(b"\n")
            last = block[-1:]
    lines += last != b"\n"  # a last line without a newline
    # CSV/TSV have a header; a quoted caption spanning lines makes this an estimate (ETA only).
    return max(lines - 1, 0) if fmt in ("csv", "tsv") else lines


def count_input_rows(config) -> Optional[int]:
    """Rows in the local input files (None when remote, too big, or not countable)."""
    from transforms.read_input import detect_format

    try:
        paths = _local_paths(config.input or "")
        if not paths or sum(os.path.getsize(p) for p in paths) > _MAX_COUNT_BYTES:
            return None
        total = 0
        for path in paths:
            fmt = config.input_format if config.input_format != "auto" else detect_format(path)
            count = _count_file_rows(path, fmt)
            if count is None:
                return None
            total += count
        return total
    except (OSError, ValueError, ImportError):
        return None


def count_table_rows(pattern: str) -> Optional[int]:
    """Rows of a Parquet table from the footers only (features/ for decide and write)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from apache_beam.io.filesystems import FileSystems

    try:
        total = 0
        for metadata in FileSystems.match([pattern])[0].metadata_list:
            with FileSystems.open(metadata.path) as handle:
                total += pq.ParquetFile(pa.BufferReader(handle.read())).metadata.num_rows
        return total
    except Exception:  # noqa: BLE001 - a total is a nicety; never fail a phase over it
        return None


def count_alive_rows(pattern: str) -> Optional[int]:
    """Rows of the features table that survived fetch (what decide decides on): one column read."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from apache_beam.io.filesystems import FileSystems

    from schemas import Col, Status

    try:
        total = 0
        for metadata in FileSystems.match([pattern])[0].metadata_list:
            with FileSystems.open(metadata.path) as handle:
                status = pq.read_table(pa.BufferReader(handle.read()), columns=[Col.STATUS]).column(Col.STATUS)
                total += pc.sum(pc.equal(status, Status.KEPT)).as_py() or 0
        return total
    except Exception:  # noqa: BLE001
        return None


def phase_total(phase: str, config, layout) -> Optional[int]:
    """The rows a phase will process, as cheaply as can be known before it starts:
    fetch: input rows; decide: rows that survived fetch; write: ledger rows (= features rows)."""
    if phase == "fetch":
        return count_input_rows(config)
    if phase == "decide":
        return count_alive_rows(layout.features_glob())
    return count_table_rows(layout.features_glob())


def is_local_runner(beam_args_or_options) -> bool:
    """Progress only makes sense where the DoFns run in this process (in-memory DirectRunner)."""
    try:
        from apache_beam.options.pipeline_options import DirectOptions, StandardOptions

        options = beam_args_or_options
        runner = options.view_as(StandardOptions).runner or "DirectRunner"
        mode = options.view_as(DirectOptions).direct_running_mode
        name = runner if isinstance(runner, str) else type(runner).__name__
        return name.endswith(("DirectRunner", "FnApiRunner")) and mode in (None, "in_memory", "multi_threading")
    except Exception:  # noqa: BLE001
        return False
