"""`curate run|fetch|decide|write|report`: the command line.

Our own flags are parsed here; everything else (--runner, --project, --region, --temp_location,
--setup_file, --direct_num_workers, ...) passes straight through to Beam's PipelineOptions.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import multiprocessing
import os
import resource
import sys
import time
import warnings
from typing import Optional

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline import progress
from pipeline.heap import release_freed_memory, share_one_arena
from pipeline.config import build_config, phase_fingerprint
from pipeline.decide import build_decide
from pipeline.fetch import build_fetch, build_retry
from pipeline.layout import PHASES, Layout
from pipeline.report import AccountingError, account, funnel_text, phase_infos, write_report
from pipeline.write import build_write
from transforms.spill import remove_work_directory
from transforms.write_output import join_path
from transforms.clip_filter import model_id

log = logging.getLogger("curate")

PHASE_BUILDERS = {"fetch": build_fetch, "decide": build_decide, "write": build_write}
COMMANDS = ("run", "fetch", "decide", "write", "report")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="curate", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=COMMANDS)
    parser.add_argument("output_dir", nargs="?", help="for `report`: the output folder (same as --output)")
    parser.add_argument("--input", help="input path, glob, or comma-separated list (csv/tsv/jsonl/parquet/tar, .gz too)")
    parser.add_argument("--output", help="output folder (local path or gs://...)")
    parser.add_argument("--input-format", dest="input_format")
    parser.add_argument("--url-col", dest="url_col")
    parser.add_argument("--caption-col", dest="caption_col")
    parser.add_argument("--config", help="YAML file of config keys")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--allow-host", dest="allow_hosts", action="append", default=[], metavar="HOST:PORT",
        help="admit one loopback host:port the SSRF guard would refuse (demo and tests only)",
    )
    parser.add_argument("--force", action="store_true", help="`run`: re-run phases that are up to date")
    parser.add_argument(
        "--retry-failed", action="store_true",
        help="`run`/`fetch`: re-fetch only rows whose earlier failure was transient (timeout, 5xx, 429, ...)",
    )
    parser.add_argument("--quiet", action="store_true")
    return parser


# decide and write on at least this many rows use every core (multi_processing, one worker per
# core) unless the user chose a runner mode: below it, starting the workers costs more than it saves
MULTI_PROCESS_MIN_ROWS = 200_000


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def beam_options(beam_args: list[str], phase: Optional[str] = None, rows: Optional[int] = None) -> PipelineOptions:
    """Pass Beam flags through. Locally the DirectRunner, and unless a mode is named its
    in-process mode (Beam's own default would download the Prism runner), or for a decide/write
    of at least MULTI_PROCESS_MIN_ROWS rows its multi_processing mode with a worker per core (the
    columnar phases carry file paths between stages, so their work spreads over processes at
    little cost)."""
    args = list(beam_args)
    if not any(a.startswith("--runner") for a in args):
        args.append("--runner=DirectRunner")
    runner = next((a.split("=", 1)[1] for a in args if a.startswith("--runner=")), "DirectRunner")
    if runner.endswith("DirectRunner") and not any(a.startswith(("--direct_running_mode", "--direct_num_workers"))
                                                   for a in args):
        cores = _cores()
        if phase in ("decide", "write") and cores > 1 and rows is not None and rows >= MULTI_PROCESS_MIN_ROWS:
            args += ["--direct_running_mode=multi_processing", f"--direct_num_workers={cores}"]
        else:
            args.append("--direct_running_mode=in_memory")
    return PipelineOptions(args)


def _threads_for(options: PipelineOptions) -> None:
    """Threads of the numeric libraries in the decide and write phases: several local worker
    processes share the cores (one thread each per core share), and OpenMP waits passively (a
    spinning wait on a busy machine costs more than it saves)."""
    from apache_beam.options.pipeline_options import DirectOptions

    direct = options.view_as(DirectOptions)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if direct.direct_running_mode == "multi_processing" and (direct.direct_num_workers or 1) > 1:
        from transforms.neighbours import THREADS_ENV

        os.environ[THREADS_ENV] = str(max(1, _cores() // direct.direct_num_workers))


def clip_model_id(config):
    if not config.clip_enabled:
        return None
    return model_id(config)


def _metrics(result) -> dict:
    counters = {}
    try:
        for counter in result.metrics().query()["counters"]:
            name = f"{counter.key.metric.namespace}/{counter.key.metric.name}"
            counters[name] = counters.get(name, 0) + (counter.committed or counter.attempted or 0)
    except Exception:  # noqa: BLE001 - some runners do not report metrics
        pass
    return dict(sorted(counters.items()))


def input_signature(config) -> str:
    """Paths, sizes and modification times of the input files: a changed file re-runs fetch."""
    if not config.input:
        return ""
    patterns = [p.strip() for p in config.input.split(",") if p.strip()]
    entries = sorted(
        (m.path, m.size_in_bytes, m.last_updated_in_seconds)
        for result in FileSystems.match(patterns)
        for m in result.metadata_list
    )
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16]


def fingerprint(config, phase: str) -> str:
    extra = input_signature(config) if phase == "fetch" else ""
    return phase_fingerprint(config, phase) + extra


def phase_is_current(phase: str, config, layout: Layout) -> bool:
    """A finished phase whose inputs and config keys are unchanged need not run again."""
    info = layout.read_phase_info(phase)
    return bool(info) and info.get("fingerprint") == fingerprint(config, phase)


def peak_rss_mb() -> int:
    """This process's peak resident memory so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10))


def cpu_seconds() -> float:
    """CPU time of this process so far, every thread, user + system."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_phase(phase: str, config, layout: Layout, beam_args: list[str], quiet: bool = False) -> dict:
    release_freed_memory()  # each phase starts on a trimmed heap with glibc's default policy
    started, cpu_started = time.time(), cpu_seconds()
    later = PHASES[PHASES.index(phase):]
    for stale in later:  # a crash from here on must not leave a marker that says "done"
        layout.clear(layout.phase_marker(stale))
    for directory in {"fetch": [layout.features, layout.raw_shards], "decide": [layout.decisions],
                      "write": [layout.shards, layout.ledger]}[phase] + [layout.work(phase)]:
        layout.clear(directory)
    local = progress.is_local_runner(beam_options(beam_args, phase))
    total = progress.phase_total(phase, config, layout) if local else None
    options = beam_options(beam_args, phase, total)
    if phase in ("decide", "write"):
        _threads_for(options)
    pipeline = beam.Pipeline(options=options)
    rows = PHASE_BUILDERS[phase](pipeline, config, layout)
    # Progress (and the per-pass record) where the DoFns run on this machine (the local runners:
    # multi_processing workers write their counts to files the reporter reads); --quiet keeps the
    # record and prints nothing.
    passes: list = []
    if local:
        progress.watch(rows, phase)
        progress.start_phase(phase, total, silent=quiet)
        os.environ[progress.SHARED_DIR_ENV] = join_path(layout.work(phase), "progress")
        os.environ[progress.SHARED_PHASE_ENV] = phase
    try:
        result = pipeline.run()
        result.wait_until_finish()
    finally:
        reporter = progress.current()
        progress.finish_phase()
        if reporter is not None:
            passes = reporter.pass_records()
        os.environ.pop(progress.SHARED_DIR_ENV, None)
        os.environ.pop(progress.SHARED_PHASE_ENV, None)
        remove_work_directory(layout.work(phase))
    info = {"seconds": round(time.time() - started, 3), "metrics": _metrics(result), "config": config.to_json(),
            "clip_model_id": clip_model_id(config),
            "fingerprint": fingerprint(config, phase),
            # the process's peak so far: under `curate run`, where each phase has a process of its
            # own, the phase's peak (local runners; on Dataflow the work runs on the workers)
            "process_peak_rss_mb": peak_rss_mb(),
            # CPU time the phase took in this process, all threads (local runners): on a machine
            # whose cores every stage shares, seconds of CPU are what the stages compete for
            "cpu_seconds": round(cpu_seconds() - cpu_started, 1),
            # per pass over the rows (decide, write): rows, seconds, peak RSS of the process tree
            "passes": passes,
            "pid": os.getpid()}
    layout.write_phase_info(phase, info)
    if not quiet:
        print(f"[curate] {phase} finished in {info['seconds']:.1f}s", file=sys.stderr)
    return info


def retry_failed(config, layout: Layout, beam_args: list[str], quiet: bool = False) -> dict:
    """Re-fetch the rows whose failure was transient; everything else of the fetch phase stays."""
    previous = layout.read_phase_info("fetch")
    if previous is None:
        raise SystemExit("curate: --retry-failed needs a finished fetch phase in --output")
    started = time.time()
    round_number = int(previous.get("retry_rounds", 0)) + 1
    for stale in PHASES:
        layout.clear(layout.phase_marker(stale))
    layout.clear(layout.features_staging)
    pipeline = beam.Pipeline(options=beam_options(beam_args, "fetch"))
    build_retry(pipeline, config, layout, round_number)
    result = pipeline.run()
    result.wait_until_finish()
    layout.replace(layout.features, layout.features_staging)
    info = dict(previous, retry_rounds=round_number, retry_seconds=round(time.time() - started, 3),
                retry_metrics=_metrics(result))
    layout.write_phase_info("fetch", info)
    if not quiet:
        print(f"[curate] retry round {round_number} finished in {info['retry_seconds']:.1f}s", file=sys.stderr)
    return info


def report(layout: Layout, quiet: bool = False) -> dict:
    summary = account(layout)
    path = write_report(layout, summary, phase_infos(layout))
    if not quiet:
        print(funnel_text(summary))
        print(f"shards:  {layout.shards}/  ({summary['shards']} tar + parquet)")
        print(f"ledger:  {layout.ledger}/")
        print(f"report:  {path}")
    return summary


def report_or_fail(layout: Layout, quiet: bool) -> int:
    """Exit code 3, loudly, when the ledger does not account for every input row."""
    try:
        report(layout, quiet)
    except AccountingError as error:
        print(f"curate: ACCOUNTING FAILED: {error}", file=sys.stderr)
        return 3
    return 0


RETRY = "retry"  # the --retry-failed round of fetch, a task like a phase


class PhaseFailed(RuntimeError):
    pass


def _output(args) -> str:
    return (args.output or args.output_dir).rstrip("/")


def _layout_and_config(args):
    output = _output(args)
    explicit = {k: getattr(args, k) for k in ("input", "input_format", "url_col", "caption_col")}
    explicit["output"] = output
    if args.allow_hosts:
        explicit["allow_hosts"] = args.allow_hosts
    return Layout(output), build_config(args.config, args.overrides, **explicit)


def run_task(task: str, config, layout: Layout, beam_args: list[str], quiet: bool) -> None:
    if task == RETRY:
        retry_failed(config, layout, beam_args, quiet)
    else:
        run_phase(task, config, layout, beam_args, quiet)


def _own_process_main(task: str, argv: list[str]) -> None:
    """A phase's own process: the same command line, one task."""
    share_one_arena()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args, beam_args = _parser().parse_known_args(argv)
    layout, config = _layout_and_config(args)
    run_task(task, config, layout, beam_args, args.quiet)


# A phase process re-runs the main module as __mp_main__ (multiprocessing's spawn preparation);
# under `python -m pipeline.cli` the fork server has imported it already, which is harmless, but
# runpy warns about it once per phase. The filter is inherited from the fork server.
warnings.filterwarnings("ignore", message=r"'pipeline\.cli' found in sys\.modules", category=RuntimeWarning)


def _phase_processes():
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["pipeline.cli"])
    return context


def run_in_own_process(task: str, argv: list[str]) -> None:
    """Run one task of `curate run` in a fresh process and wait for it.

    In one process every phase would start on the last one's high-water mark: the fetch phase
    leaves torch, the CLIP model and lingua's language models loaded (~1 GB) and the heap its
    buffers grew, and the decide phase's shuffles grow on top of that. A process per phase hands
    all of it back to the OS when the phase ends, so a run peaks at its heaviest phase instead
    of their sum. (On Dataflow each phase is a job of its own anyway: the process submits it and
    waits.) Not forked from this process: it may hold threads, and a fork would copy its heap.
    Forked from multiprocessing's fork server instead, a single-threaded process that has only
    imported this module: each phase starts without re-importing Beam and the project (~1 s)."""
    process = _phase_processes().Process(target=_own_process_main, args=(task, argv), name=f"curate-{task}")
    process.start()
    try:
        process.join()
    except BaseException:  # Ctrl-C or an error here: leave no phase running behind us
        process.terminate()
        process.join()
        raise
    if process.exitcode != 0:
        raise PhaseFailed(f"the {task} phase failed (exit code {process.exitcode}); its error is above")


def main(argv: Optional[list[str]] = None) -> int:
    share_one_arena()  # before Beam's threads take arenas of their own (pipeline/heap.py says why)
    argv = list(sys.argv[1:] if argv is None else argv)
    args, beam_args = _parser().parse_known_args(argv)
    if not (args.output or args.output_dir):
        print("curate: --output is required", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "report":
        return report_or_fail(Layout(_output(args)), args.quiet)
    layout, config = _layout_and_config(args)
    if args.command in ("run", "fetch") and not config.input:
        print("curate: --input is required", file=sys.stderr)
        return 2
    beam_options(beam_args)  # bad Beam flags fail here, before any phase
    if args.retry_failed and args.command not in ("run", "fetch"):
        print("curate: --retry-failed goes with `run` or `fetch`", file=sys.stderr)
        return 2
    tasks = [RETRY] if args.retry_failed else []
    for phase in PHASES if args.command == "run" else (args.command,):
        if phase == "fetch" and args.retry_failed:
            continue
        if not tasks and args.command == "run" and not args.force and phase_is_current(phase, config, layout):
            if not args.quiet:
                print(f"[curate] {phase} is up to date, skipped (--force re-runs it)", file=sys.stderr)
            continue
        tasks.append(phase)  # every phase after one that runs must run too
    try:
        for task in tasks:
            if args.command == "run":
                run_in_own_process(task, argv)
            else:
                run_task(task, config, layout, beam_args, args.quiet)
    except PhaseFailed as error:
        print(f"curate: {error}", file=sys.stderr)
        return 1
    if args.command in ("run", "write"):
        return report_or_fail(layout, args.quiet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
