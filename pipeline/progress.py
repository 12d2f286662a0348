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

import json
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
                 interval_s: Optional[float] = None, clock=time.monotonic, stages: Sequence[tuple] = (),
                 silent: bool = False):
        self.phase = phase
        self.silent = silent  # counts and records, prints nothing (--quiet)
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
        # passes of a phase that goes over its rows several times (declare_passes)
        self._passes: dict[str, _PassStats] = {name: _PassStats(weight) for name, weight in _DECLARED_PASSES.get(phase, [])}
        self._fraction_history: list[tuple[float, float]] = []
        # counts written by other local processes (multi_processing workers), by pid
        self._shared: dict[str, dict] = {}
        self._wall_offset = time.time() - clock()
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

    def read_shared(self, directory: Optional[str]) -> None:
        """Take in the counts other local processes wrote to `directory` (one file each)."""
        if not directory or not os.path.isdir(directory):
            return
        for name in os.listdir(directory):
            if not name.endswith(".json"):
                continue
            try:
                with open(os.path.join(directory, name)) as handle:
                    data = json.load(handle)
            except (OSError, ValueError):
                continue  # being replaced: read it next time
            with self._lock:
                previous = self._shared.get(name, {"stages": {}, "passes": {}})
                for stage, count in data.get("stages", {}).items():
                    before = previous["stages"].get(stage, 0)
                    if stage not in self._counts:
                        self._counts[stage] = 0
                        self._totals[stage] = self.total_rows
                    self._counts[stage] += count - before
                for pass_name, record in data.get("passes", {}).items():
                    stats = self._passes.get(pass_name)
                    if stats is None:
                        stats = self._passes[pass_name] = _PassStats(0.0)
                    before = previous["passes"].get(pass_name, {}).get("rows", 0)
                    stats.rows += record["rows"] - before
                    started, last = record["started"] - self._wall_offset, record["last"] - self._wall_offset
                    stats.started = started if stats.started is None else min(stats.started, started)
                    stats.last = last if stats.last is None else max(stats.last, last)
                    if record.get("total") is not None:
                        stats.total = record["total"]
                self._shared[name] = data
        if any(stats.started is not None and not stats.peak_rss for stats in self._passes.values()):
            rss = tree_rss_bytes()
            with self._lock:
                for stats in self._passes.values():
                    if stats.started is not None and not stats.peak_rss:
                        stats.peak_rss = rss

    def add_pass(self, name: str, rows: int, total: Optional[int] = None) -> None:
        now = self._clock()
        with self._lock:
            stats = self._passes.get(name)
            if stats is None:
                stats = self._passes[name] = _PassStats(0.0)
            starting = stats.started is None
            if starting:
                stats.started = now
            stats.last = now
            stats.rows += rows
            if total is not None:
                stats.total = total
        if starting:  # a pass shorter than the sampling period still gets its memory
            rss = tree_rss_bytes()
            with self._lock:
                stats.peak_rss = max(stats.peak_rss, rss)

    def sample_memory(self) -> None:
        """Attribute the process tree's resident memory now to the passes active in the last moment."""
        if not self._passes:
            return
        rss = tree_rss_bytes()
        now = self._clock()
        with self._lock:
            started = [stats for stats in self._passes.values() if stats.started is not None]
            latest = max(started, key=lambda stats: stats.started, default=None)
            for stats in started:
                if stats is latest or now - stats.last <= _PASS_ACTIVE_S:
                    stats.peak_rss = max(stats.peak_rss, rss)

    def pass_records(self) -> list[dict]:
        """Per pass, in order: rows, when it started (seconds into the phase: the gaps between
        passes are start-up, shuffles and single-element steps), seconds from its first to its last
        row, peak RSS (MB) while active."""
        with self._lock:
            return [
                {"pass": name, "rows": stats.rows, "start": round(stats.started - self._started, 3),
                 "seconds": round((stats.last or 0) - (stats.started or 0), 3),
                 "peak_rss_mb": round(stats.peak_rss / 2**20) if stats.peak_rss else None}
                for name, stats in self._passes.items() if stats.started is not None
            ]

    def _overall(self) -> tuple[Optional[str], float]:
        """(the pass active last, the phase's weighted fraction done)."""
        weights = sum(stats.weight for stats in self._passes.values()) or 1.0
        done, active, latest = 0.0, None, -1.0
        for name, stats in self._passes.items():
            total = stats.total if stats.total is not None else self.total_rows
            if stats.rows and total:
                done += stats.weight * min(1.0, stats.rows / total)
            if stats.last is not None and stats.last > latest:
                active, latest = name, stats.last
        return active, min(1.0, done / weights)

    def _pass_line(self, now: float, elapsed: float) -> str:
        with self._lock:
            active, fraction = self._overall()
            stats = self._passes.get(active) if active else None
            names = list(self._passes)
        if active is None:
            return f"[curate] {self.phase}: starting ({_duration(elapsed)} elapsed)"
        self._fraction_history.append((now, fraction))
        while len(self._fraction_history) > 2 and now - self._fraction_history[0][0] > _RATE_WINDOW_S:
            self._fraction_history.pop(0)
        then, before = self._fraction_history[0]
        rate = (fraction - before) / (now - then) if now - then > 0.5 else (fraction / elapsed if elapsed > 0 else 0.0)
        eta = _duration((1.0 - fraction) / rate) if rate > 0 and fraction < 1.0 else ("0s" if fraction >= 1.0 else "unknown")
        total = stats.total if stats.total is not None else self.total_rows
        rows = f"{stats.rows:,}/{total:,} rows" if total else f"{stats.rows:,} rows"
        return (f"[curate] {self.phase}: pass {names.index(active) + 1}/{len(names)} {active}, {rows}; "
                f"{100.0 * fraction:.0f}% of the phase, ETA {eta}, {_duration(elapsed)} elapsed")

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
        if any(stats.started is not None for stats in self._passes.values()):
            return self._pass_line(now, now - self._started)
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
        if self.silent:
            return
        try:
            if self._tty:
                self.stream.write("\r\x1b[2K" + text + ("\n" if final else ""))
            else:
                self.stream.write(text + "\n")
            self.stream.flush()
        except (OSError, ValueError):  # a closed stream must never fail the pipeline
            pass

    def _loop(self) -> None:
        printed = self._clock()
        while not self._stop.wait(min(self.interval_s, _MEMORY_SAMPLE_S)):
            self.read_shared(os.environ.get(SHARED_DIR_ENV))
            self.sample_memory()
            if self._clock() - printed >= self.interval_s:
                printed = self._clock()
                self._emit(self.line())

    def start(self) -> "ProgressReporter":
        self._thread = threading.Thread(target=self._loop, name=f"curate-progress-{self.phase}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.read_shared(os.environ.get(SHARED_DIR_ENV))
        if any(self.counts().values()) or any(stats.rows for stats in self._passes.values()):
            self._emit(self.line(final=True), final=True)


_PASS_ACTIVE_S = 1.0  # a pass that counted rows this recently is running
_MEMORY_SAMPLE_S = 0.25


class _PassStats:
    __slots__ = ("weight", "rows", "total", "started", "last", "peak_rss")

    def __init__(self, weight: float):
        self.weight = weight
        self.rows = 0
        self.total: Optional[int] = None
        self.started: Optional[float] = None
        self.last: Optional[float] = None
        self.peak_rss = 0


# phase -> [(pass name, share of the phase's time)], declared by the phase builders
_DECLARED_PASSES: dict[str, list[tuple[str, float]]] = {}


def declare_passes(phase: str, passes: list[tuple[str, float]]) -> None:
    """The passes a phase makes over its rows, in order, with the share of its time each takes
    (for one ETA over all of them); the builder declares them before the phase starts."""
    _DECLARED_PASSES[phase] = list(passes)


def add_pass_rows(phase: str, name: str, rows: int, total: Optional[int] = None) -> None:
    """Count `rows` done by pass `name` of `phase` (from a DoFn: a no-op where no reporter runs);
    0 rows marks the pass as working (a DoFn that takes one large element says so when it starts)."""
    reporter = _REPORTER
    if reporter is not None and reporter.phase == phase:
        reporter.add_pass(name, rows, total)
        return
    shared = _shared_counts(phase)
    if shared is not None:
        shared.add_pass(name, rows, total)


# Counts of other local processes: the DirectRunner's multi_processing workers run the DoFns in
# processes of their own, which find no reporter; the launcher names a folder in the environment
# (they inherit it), each worker keeps its counts in a file of its own there, and the launcher's
# reporter adds them up. On Dataflow the variable is not set and nothing is written.
SHARED_DIR_ENV = "CURATE_PROGRESS_DIR"
SHARED_PHASE_ENV = "CURATE_PROGRESS_PHASE"


class _SharedCounts:
    def __init__(self, directory: str):
        self.pid = os.getpid()
        self.path = os.path.join(directory, f"{self.pid}.json")
        self.stages: dict[str, int] = {}
        self.passes: dict[str, dict] = {}
        os.makedirs(directory, exist_ok=True)

    def add_stage(self, stage: str, count: int) -> None:
        self.stages[stage] = self.stages.get(stage, 0) + count
        self.write()

    def add_pass(self, name: str, rows: int, total: Optional[int]) -> None:
        now = time.time()
        record = self.passes.setdefault(name, {"rows": 0, "started": now, "last": now, "total": None})
        record["rows"] += rows
        record["last"] = now
        if total is not None:
            record["total"] = total
        self.write()

    def write(self) -> None:
        # every call: callers count a batch or a partition at a time, or flush a DoFn's counts
        temporary = f"{self.path}.{self.pid}.tmp"
        try:
            with open(temporary, "w") as handle:
                json.dump({"stages": self.stages, "passes": self.passes}, handle)
            os.replace(temporary, self.path)
        except OSError:
            pass  # progress is a nicety: never fail a DoFn over it


_SHARED: Optional[_SharedCounts] = None


def _shared_counts(phase: str) -> Optional[_SharedCounts]:
    global _SHARED
    directory = os.environ.get(SHARED_DIR_ENV)
    if not directory or os.environ.get(SHARED_PHASE_ENV) != phase:
        return None
    if _SHARED is None or _SHARED.pid != os.getpid():
        _SHARED = _SharedCounts(directory)
    return _SHARED


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process (one pass over /proc)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    parents[int(entry)] = int(handle.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    return parents


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it (Linux /proc; [pid] elsewhere)."""
    if not os.path.isdir("/proc"):
        return [pid]
    children: dict[int, list] = {}
    for child, parent in _parents().items():
        children.setdefault(parent, []).append(child)
    found, stack = [], [pid]
    while stack:
        current = stack.pop()
        found.append(current)
        stack.extend(children.get(current, ()))
    return found


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _resident_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as handle:
            return int(handle.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


class ProcessTree:
    """Resident memory of a process and all its descendants, cheap enough to sample several times
    a second next to the work it measures: the descendants are looked up again (one pass over
    /proc) at most every `refresh_s`, and in between only their statm files are read. Looking
    them up on every sample (or through every thread's children file: a Beam worker has dozens
    of threads) kept a share of a core busy on a two-core machine."""

    def __init__(self, pid: int, refresh_s: float = 2.0, clock=time.monotonic):
        self.pid = pid
        self._refresh_s = refresh_s
        self._clock = clock
        self._pids: list[int] = []
        self._found_at: Optional[float] = None

    def rss_bytes(self) -> int:
        now = self._clock()
        if self._found_at is None or now - self._found_at >= self._refresh_s:
            self._pids = descendants(self.pid)
            self._found_at = now
        return sum(_resident_bytes(pid) for pid in self._pids)


_OWN_TREE: Optional[ProcessTree] = None


def tree_rss_bytes() -> int:
    """Resident memory of this process and its descendants (the local runner's workers)."""
    global _OWN_TREE
    if _OWN_TREE is None or _OWN_TREE.pid != os.getpid():
        _OWN_TREE = ProcessTree(os.getpid())
    return _OWN_TREE.rss_bytes()


_REPORTER: Optional[ProgressReporter] = None
_REPORTER_LOCK = threading.Lock()
_DECLARED: dict[str, list[tuple[str, Optional[int]]]] = {}  # phase -> stages `watch` saw wired


def current() -> Optional[ProgressReporter]:
    return _REPORTER


def start_phase(phase: str, total_rows: Optional[int] = None, stream: IO[str] = None,
                interval_s: Optional[float] = None, silent: bool = False) -> ProgressReporter:
    """Start reporting a phase in this process (stops the previous phase's reporter). The period:
    `interval_s`, else CURATE_PROGRESS_INTERVAL_S, else 2 s on a terminal and 30 s off one.
    `silent`: count and record, print nothing (--quiet)."""
    global _REPORTER
    if interval_s is None and os.environ.get("CURATE_PROGRESS_INTERVAL_S"):
        interval_s = float(os.environ["CURATE_PROGRESS_INTERVAL_S"])
    with _REPORTER_LOCK:
        if _REPORTER is not None:
            _REPORTER.stop()
        _REPORTER = ProgressReporter(phase, total_rows, stream=stream, interval_s=interval_s,
                                     stages=_DECLARED.pop(phase, ()), silent=silent).start()
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
        elif self._pending:
            shared = _shared_counts(self._phase)
            if shared is not None:
                shared.add_stage(self._stage, self._pending)
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


class _CountPassDoFn(beam.DoFn):
    def __init__(self, phase: str, name: str, rows):
        self._phase = phase
        self._name = name
        self._rows = rows

    def process(self, element):
        add_pass_rows(self._phase, self._name, int(self._rows(element)))
        yield element


def _table_rows(table) -> int:
    return getattr(table, "num_rows", 1)


class ReportPass(beam.PTransform):
    """Pass-through that counts the rows of each element (an Arrow table by default) as done by
    pass `name` of `phase`, for the progress line and the per-pass record in run/PHASE.json."""

    def __init__(self, phase: str, name: str, rows=None):
        super().__init__()
        self._phase = phase
        self._name = name
        self._rows = rows or _table_rows

    def expand(self, pcoll):
        wired = getattr(pcoll.pipeline, "_curate_progress_phases", set())
        pcoll.pipeline._curate_progress_phases = wired | {self._phase}
        return pcoll | "Count" >> beam.ParDo(_CountPassDoFn(self._phase, self._name, self._rows))


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
    stages = getattr(rows.pipeline, "_curate_progress_stages", [])  # none when the phase counts passes
    _DECLARED[phase] = [(s, total) for p, s, total in stages if p == phase]


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
    import pyarrow.parquet as pq
    from apache_beam.io.filesystems import FileSystems

    try:
        total = 0
        for metadata in FileSystems.match([pattern])[0].metadata_list:
            with FileSystems.open(metadata.path, compression_type="uncompressed") as handle:
                total += pq.ParquetFile(handle).metadata.num_rows  # the footer only
        return total
    except Exception:  # noqa: BLE001 - a total is a nicety; never fail a phase over it
        return None


def count_alive_rows(pattern: str) -> Optional[int]:
    """Rows of the features table that survived fetch (what decide decides on): one column read."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from apache_beam.io.filesystems import FileSystems

    from schemas import Col, Status

    try:
        total = 0
        for metadata in FileSystems.match([pattern])[0].metadata_list:
            with FileSystems.open(metadata.path, compression_type="uncompressed") as handle:
                status = pq.read_table(handle, columns=[Col.STATUS]).column(Col.STATUS)  # one column
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
        # multi_processing workers are processes of this machine: they write their counts to files
        # the reporter reads (SHARED_DIR_ENV)
        return name.endswith(("DirectRunner", "FnApiRunner")) and mode in (None, "in_memory", "multi_threading",
                                                                           "multi_processing")
    except Exception:  # noqa: BLE001
        return False
