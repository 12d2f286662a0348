"""`curate run|fetch|decide|write|report|config`: the command line.

Each command has its own flags and help (`curate run --help`). Flags curate does not know go
to Beam's PipelineOptions (--runner, --project, --region, --temp_location, --setup_file,
--direct_num_workers, ...) when Beam knows them; a flag neither knows is an error with a
suggestion, never silently dropped. A user's mistake ends in one line and exit code 2
(pipeline/errors.py lists the codes), before any work starts where it can be known then.
"""

from __future__ import annotations

from pipeline import logs

logs.silence_import_noise()  # before Beam is imported: it logs through the root logger on import

import argparse  # noqa: E402
import atexit  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from typing import Optional  # noqa: E402

import apache_beam as beam  # noqa: E402
from apache_beam.io.filesystems import FileSystems  # noqa: E402
from apache_beam.options.pipeline_options import PipelineOptions  # noqa: E402

from pipeline import ceiling, checks, progress  # noqa: E402
from pipeline.config import PROJECT_NAME, PROJECT_VERSION, build_config, describe_keys, phase_fingerprint  # noqa: E402
from pipeline.errors import (  # noqa: E402
    EXIT_ACCOUNTING,
    EXIT_CEILING,
    EXIT_CODES,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    UsageError,
    did_you_mean,
)
from pipeline.heap import release_freed_memory, share_one_arena  # noqa: E402
from pipeline.layout import PHASES, Layout  # noqa: E402
from transforms.clip_filter import check_checkpoint_file, model_id  # noqa: E402
from transforms.read_input import input_patterns, match_input_pattern  # noqa: E402
from transforms.spill import remove_work_directory  # noqa: E402
from transforms.write_output import join_path  # noqa: E402

# The phases' modules (and the report's) are imported when they run: a mistake found at start-up
# is reported without loading them, and phase processes have them preloaded (_phase_processes).
PHASE_MODULES = {"fetch": "pipeline.fetch", "decide": "pipeline.decide", "write": "pipeline.write"}


def phase_builder(phase: str):
    import importlib

    return getattr(importlib.import_module(PHASE_MODULES[phase]), f"build_{phase}")


PIPELINE_COMMANDS = ("run", "fetch", "decide", "write")
INPUT_FLAGS = ("--input", "--input-format", "--url-col", "--caption-col", "--allow-host", "--retry-failed")
COMMANDS = PIPELINE_COMMANDS + ("report", "config")

# ---------------------------------------------------------------------------------------------
# Flags and help
# ---------------------------------------------------------------------------------------------

INPUT_FORMATS_HELP = """\
input (--input): a path, a glob or a comma-separated list of them, local or gs://...; .gz too
  csv, tsv     a header line naming the columns; --url-col and --caption-col pick two of them
  jsonl        one JSON object per line
  parquet      any Parquet table with the two columns
  webdataset   img2dataset-style .tar shards (KEY.jpg, KEY.txt, KEY.json): nothing is downloaded
The format comes from each file's extension unless --input-format says it. Other columns are
kept: the ledger's `extra` and each sample's KEY.json `extra` object."""

BEAM_HELP = """\
Beam options pass straight through: --runner, --project, --region, --temp_location,
--setup_file, --direct_num_workers, --direct_running_mode, ... (without --runner: the local
in-process DirectRunner). A flag that neither curate nor Beam knows is an error."""

CONFIG_HELP = """\
config: every key of `curate config` can be set in a YAML file (--config) or with --set KEY=VALUE
(repeatable; --set wins over the file). Unknown keys and values of the wrong type are errors."""

EXIT_HELP = "exit codes:\n" + "\n".join(f"  {code}  {meaning}" for code, meaning in EXIT_CODES.items())

OUTPUT_HELP = """\
output (--output): features/ raw/ (fetch), decisions/ (decide), shards/NNNNN.tar + .parquet,
ledger/, report/index.html (write); run/*.json per phase, run/beam.log (Beam's own log)."""

COMMAND_HELP = {
    "run": ("fetch, decide and write in turn, then check the accounting and write the report",
            "Runs the three phases, each in a process of its own, skipping a phase whose inputs and\n"
            "config keys are unchanged since it last finished (--force re-runs them)."),
    "fetch": ("phase 1: read the input, download, decode, caption rules, CLIP scores",
              "Reads the input rows and writes OUTPUT/features (one row per input row, failures\n"
              "included) and OUTPUT/raw (the survivors' images)."),
    "decide": ("phase 2: language and CLIP filters, duplicates, hard negatives (features only)",
               "Reads OUTPUT/features only (no download, no image bytes) and writes OUTPUT/decisions.\n"
               "Needs a finished fetch phase in OUTPUT. Re-run it with new thresholds in seconds."),
    "write": ("phase 3: shards, ledger and report; checks the accounting",
              "Reads OUTPUT/decisions and OUTPUT/features (images from OUTPUT/raw) and writes the\n"
              "WebDataset + Parquet shards, the ledger and the report. Needs a finished decide phase."),
    "report": ("re-check an output folder's accounting and rewrite its report",
               "Reads the ledger, the shards and run/*.json of a finished run; downloads nothing and\n"
               "runs no Beam job."),
    "config": ("list every config key: type, default, phase, meaning",
               "Every key can be set in a YAML file (--config) or with --set KEY=VALUE. With --config\n"
               "or --set, the value they give is shown too (and checked). `phase` is the earliest phase\n"
               "a change re-runs under `curate run`."),
}


class _Once(argparse.Action):
    """A flag that takes one value: given twice, argparse would keep the last one silently."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, f"_seen_{self.dest}", False):
            hint = " as one comma-separated list: --input a.csv,b.csv" if self.dest == "input" else " once"
            raise UsageError(f"{option_string} is given twice; give it{hint}")
        setattr(namespace, f"_seen_{self.dest}", True)
        setattr(namespace, self.dest, values)


class _Parser(argparse.ArgumentParser):
    """argparse, but a mistake is one line (UsageError), not a usage block and a message."""

    def error(self, message: str):
        raise UsageError(f"{message} (`{self.prog} --help` lists the flags)")


def _help_formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=30, width=100)


def _add_input_flags(parser: argparse.ArgumentParser, required: bool) -> None:
    group = parser.add_argument_group("input")
    group.add_argument("--input", required=required, metavar="PATHS", action=_Once,
                       help="input files: a path, a glob or a comma-separated list (see below)")
    group.add_argument("--input-format", dest="input_format", metavar="FORMAT", action=_Once,
                       choices=("auto", "csv", "tsv", "jsonl", "parquet", "webdataset"),
                       help="csv, tsv, jsonl, parquet or webdataset (default: from each file's extension)")
    group.add_argument("--url-col", dest="url_col", metavar="NAME", action=_Once, help="column holding the image URL (default: url)")
    group.add_argument("--caption-col", dest="caption_col", metavar="NAME", action=_Once,
                       help="column holding the caption (default: caption)")
    group.add_argument("--allow-host", dest="allow_hosts", action="append", default=[], metavar="HOST:PORT",
                       help="admit one loopback host:port the SSRF guard would refuse (demo and tests only; repeatable)")


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("config")
    group.add_argument("--config", metavar="FILE.yaml", action=_Once, help="YAML file of config keys (`curate config` lists them)")
    group.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="set one config key, e.g. --set clip_threshold=0.3 (repeatable; wins over --config)")


def _add_output_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", required=True, metavar="DIR", action=_Once,
                        help="output folder, local or gs://... (created if missing)")


def _add_quiet(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true",
                        help="no progress lines; the final summary and errors still print")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROJECT_NAME, formatter_class=_help_formatter, allow_abbrev=False,
                     description="Curate web image-text pairs into training-ready WebDataset + Parquet shards, "
                                 "with a ledger row for every input row.",
                     epilog="Run `curate COMMAND --help` for a command's flags.\n\n" + EXIT_HELP)
    parser.add_argument("--version", action="version",
                        version=f"{PROJECT_NAME} {PROJECT_VERSION} (apache-beam {beam.__version__})")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands", parser_class=_Parser)
    for name in COMMANDS:
        summary, details = COMMAND_HELP[name]
        epilog = {
            "run": [INPUT_FORMATS_HELP, OUTPUT_HELP, CONFIG_HELP, BEAM_HELP, EXIT_HELP],
            "fetch": [INPUT_FORMATS_HELP, CONFIG_HELP, BEAM_HELP, EXIT_HELP],
            "decide": [CONFIG_HELP, BEAM_HELP, EXIT_HELP],
            "write": [CONFIG_HELP, BEAM_HELP, EXIT_HELP],
            "report": [EXIT_HELP],
            "config": [],
        }[name]
        sub = commands.add_parser(name, help=summary, description=f"curate {name}: {summary}.\n\n{details}",
                                  epilog="\n\n".join(epilog), formatter_class=_help_formatter, allow_abbrev=False)
        if name in ("run", "fetch"):
            _add_input_flags(sub, required=True)
        if name in PIPELINE_COMMANDS:
            _add_output_flag(sub)
        if name in PIPELINE_COMMANDS or name == "config":
            _add_config_flags(sub)
        if name == "run":
            sub.add_argument("--force", action="store_true", help="re-run phases that are up to date")
        if name in ("run", "fetch"):
            sub.add_argument("--retry-failed", action="store_true",
                             help="re-fetch only rows whose failure was transient (timeout, connection, DNS, 429, 5xx), "
                                  "then decide and write again")
        if name == "report":
            sub.add_argument("output_dir", nargs="?", metavar="DIR", help="the --output folder of a run")
            sub.add_argument("--output", metavar="DIR", help="same as DIR")
        if name == "config":
            sub.add_argument("keys", nargs="*", metavar="KEY", help="only the keys whose name contains one of these")
            sub.add_argument("--json", action="store_true", help="print JSON instead of a table")
        if name != "config":
            _add_quiet(sub)
    return parser


def _option_strings(parser: argparse.ArgumentParser) -> list[str]:
    return [option for action in parser._actions for option in action.option_strings]


def beam_argument_parser() -> argparse.ArgumentParser:
    """A parser of every option Beam's PipelineOptions classes define (what PipelineOptions itself
    builds in get_all_options), whose errors are one line."""
    from apache_beam.options.pipeline_options import _BeamArgumentParser  # Beam's, for ValueProvider options

    class _OneLine(_BeamArgumentParser):
        def error(self, message: str):
            raise UsageError(f"Beam option: {message}")

    parser = _OneLine(allow_abbrev=False, add_help=False)
    for cls in {str(c): c for c in PipelineOptions.__subclasses__()}.values():
        cls._add_argparse_args(parser)
    return parser


def check_beam_args(beam_args: list[str], command: str, ours: list[str]) -> None:
    """Every flag left after ours must be one Beam knows: Beam would drop an unknown one with a
    warning among its logs (`--sett retries=1` ran without the setting)."""
    beam_parser = beam_argument_parser()
    _, unknown = beam_parser.parse_known_args(beam_args)
    flags = [arg for arg in unknown if arg.startswith("-")]
    if flags:
        flag = flags[0].split("=", 1)[0]
        if command in ("decide", "write") and flag in INPUT_FLAGS:
            raise UsageError(f"`curate {command}` reads the fetch phase's output in --output, not the input: "
                             f"drop {flag} (it goes with `curate run` and `curate fetch`)")
        raise UsageError(f"unknown flag {flag}" + did_you_mean(flag, ours + _option_strings(beam_parser))
                         + f" for `curate {command}`; `curate {command} --help` lists its flags, "
                           "and Beam's own options pass through")
    if unknown:
        raise UsageError(f"unexpected argument {unknown[0]!r} for `curate {command}`; "
                         f"`curate {command} --help` lists its flags")


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Our flags, and Beam's (checked: every one must be a flag Beam knows)."""
    parser = build_parser()
    if not argv:
        raise UsageError("no command given: curate run|fetch|decide|write|report|config "
                         "(`curate --help` says what each does)")
    if argv[0] not in COMMANDS and not argv[0].startswith("-"):
        raise UsageError(f"unknown command {argv[0]!r}" + did_you_mean(argv[0], COMMANDS, cutoff=0.6)
                         + "; the commands: " + ", ".join(COMMANDS))
    args, beam_args = parser.parse_known_args(argv)
    if args.command is None:
        raise UsageError("no command given: curate run|fetch|decide|write|report|config")
    command_parser = parser._subparsers._group_actions[0].choices[args.command]
    if args.command in PIPELINE_COMMANDS:
        check_beam_args(beam_args, args.command, _option_strings(command_parser))
    elif beam_args:
        command_parser.error(f"unrecognized arguments: {' '.join(beam_args)}")
    return args, beam_args


# decide and write on at least this many rows use every core (multi_processing, one worker per
# core) unless the user chose a runner mode: below it, starting the workers costs more than it saves
MULTI_PROCESS_MIN_ROWS = 200_000
# fetch on at least this many input rows does the same. Its per-row CPU work (decode, resize,
# hashes, language ID) is what the in-process runner leaves on one core, while each worker pays
# its imports and models again at start: below this, the two modes were even on the download
# benchmark (README, "Download throughput").
FETCH_MULTI_PROCESS_MIN_ROWS = 2_000
FETCH_MIN_ROWS_ENV = "CURATE_FETCH_MULTI_PROCESS_MIN_ROWS"  # overrides it (tests use a small corpus)


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def beam_options(beam_args: list[str], phase: Optional[str] = None, rows: Optional[int] = None) -> PipelineOptions:
    """Pass Beam flags through. Locally the DirectRunner, and unless a mode is named its
    in-process mode (Beam's own default would download the Prism runner), or, on a machine with
    more than one core, its multi_processing mode with a worker per core for a decide/write of at
    least MULTI_PROCESS_MIN_ROWS rows (the columnar phases carry file paths between stages, so
    their work spreads over processes at little cost) and for a fetch of at least
    FETCH_MULTI_PROCESS_MIN_ROWS input rows (its per-row CPU work would keep one core busy)."""
    from apache_beam.options.pipeline_options import StandardOptions

    args = list(beam_args)
    runner = PipelineOptions(args).view_as(StandardOptions).runner
    if runner is None:
        args.append("--runner=DirectRunner")
    if str(runner or "DirectRunner").endswith("DirectRunner") and not any(
            a.startswith(("--direct_running_mode", "--direct_num_workers")) for a in args):
        cores = _cores()
        threshold = {"decide": MULTI_PROCESS_MIN_ROWS, "write": MULTI_PROCESS_MIN_ROWS,
                     "fetch": int(os.environ.get(FETCH_MIN_ROWS_ENV) or FETCH_MULTI_PROCESS_MIN_ROWS)}.get(phase)
        if threshold is not None and cores > 1 and rows is not None and rows >= threshold:
            args += ["--direct_running_mode=multi_processing", f"--direct_num_workers={cores}"]
        else:
            args.append("--direct_running_mode=in_memory")
    return PipelineOptions(args)


class LocalRunner(beam.runners.DirectRunner):
    """Beam's DirectRunner without its first step: since Beam 2.68 it hands any pipeline it can to the
    Prism runner whatever `--direct_running_mode` says (offline it fails over after a failed
    download; online it downloads Prism and runs the phase there, in none of the modes the phases
    are built and tested for). This runs the FnApiRunner directly, set up as the DirectRunner sets
    it up once it has passed Prism over, so the in-process and multi_processing modes are what run."""

    def run_pipeline(self, pipeline, options):
        from apache_beam.portability.api import beam_provision_api_pb2
        from apache_beam.runners.portability.fn_api_runner import fn_runner
        from apache_beam.runners.portability.portable_runner import JobServiceHandle

        encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
        provision = fn_runner.ExtendedProvisionInfo(beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded))
        return fn_runner.FnApiRunner(provision_info=provision).run_pipeline(pipeline, options)


def new_pipeline(options: PipelineOptions) -> beam.Pipeline:
    """A phase's pipeline: on the DirectRunner, through LocalRunner; any other runner as named."""
    from apache_beam.options.pipeline_options import StandardOptions

    runner = options.view_as(StandardOptions).runner
    if isinstance(runner, str) and runner.split(".")[-1] in ("DirectRunner", "SwitchingDirectRunner"):
        return beam.Pipeline(runner=LocalRunner(), options=options)
    return beam.Pipeline(options=options)


def _runner_record(options: PipelineOptions) -> dict:
    from apache_beam.options.pipeline_options import DirectOptions, StandardOptions

    direct = options.view_as(DirectOptions)
    runner = options.view_as(StandardOptions).runner
    return {"runner": runner if isinstance(runner, str) else type(runner).__name__,
            "direct_running_mode": direct.direct_running_mode, "direct_num_workers": direct.direct_num_workers}


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
    entries = sorted(
        (m.path, m.size_in_bytes, m.last_updated_in_seconds)
        for pattern in input_patterns(config.input)
        for _, path in match_input_pattern(pattern)
        for m in FileSystems.match([path])[0].metadata_list
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


def resolve_clip(config, options: PipelineOptions) -> None:
    """The CLIP model exists, its weights can be had and it loads: checked before a fetch phase
    starts any work (else minutes of downloads end in a traceback inside RunInference)."""
    if not config.clip_enabled:
        return
    from transforms.clip_score import resolve_model  # torch: only in the phases that score

    resolve_model(config, keep=progress.is_local_runner(options))


def _remove_beam_temp(layout: Layout) -> None:
    """A failed write leaves Beam's `beam-temp-*` folders behind in the table folders."""
    for directory in (layout.features, layout.features_staging, layout.decisions, layout.ledger):
        try:
            files = FileSystems.match([f"{directory}/beam-temp-*/*"])[0].metadata_list
        except Exception:  # noqa: BLE001 - the folder does not exist: nothing to clean
            continue
        folders = sorted({metadata.path.rsplit("/", 1)[0] for metadata in files})
        if folders:
            FileSystems.delete(folders)


def _run_pipeline(pipeline: beam.Pipeline, phase: str, rows, total, layout: Layout, quiet: bool,
                  options) -> tuple[object, list]:
    """Run a built pipeline with Beam's output in run/beam.log and our progress on the terminal
    (counting `rows`, what the phase builder returned, if it wired no progress of its own).
    Returns (result, the record of each pass over the rows). Progress and the records where the
    DoFns run on this machine (local runners: multi_processing workers write their counts to
    files the reporter reads); --quiet keeps the records and prints nothing."""
    passes: list = []
    local = progress.is_local_runner(options)
    try:
        with logs.beam_output_to_log(logs.log_path_for(layout.root)):
            if local:
                progress.watch(rows, phase)
                progress.start_phase(phase, total() if callable(total) else total, stream=logs.terminal(),
                                     silent=quiet)
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
    except BaseException:
        _remove_beam_temp(layout)
        raise
    return result, passes


def _say(quiet: bool, text: str) -> None:
    if not quiet:
        print(text, file=logs.terminal(), flush=True)


def run_phase(phase: str, config, layout: Layout, beam_args: list[str], quiet: bool = False) -> dict:
    local = progress.is_local_runner(beam_options(beam_args, phase))
    total = progress.phase_total(phase, config, layout) if local else None
    options = beam_options(beam_args, phase, total)
    if phase == "fetch":
        resolve_clip(config, options)
    else:
        _threads_for(options)
    release_freed_memory()  # each phase starts on a trimmed heap with glibc's default policy
    started, cpu_started = time.time(), cpu_seconds()
    later = PHASES[PHASES.index(phase):]
    for stale in later:  # a crash from here on must not leave a marker that says "done"
        layout.clear(layout.phase_marker(stale))
    for directory in {"fetch": [layout.features, layout.raw_shards], "decide": [layout.decisions],
                      "write": [layout.shards, layout.ledger]}[phase] + [layout.work(phase)]:
        layout.clear(directory)
    pipeline = new_pipeline(options)
    rows = phase_builder(phase)(pipeline, config, layout)
    result, passes = _run_pipeline(pipeline, phase, rows, total, layout, quiet, options)
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
            # how the local runner ran the phase (beam_options' choice unless the user named one)
            "runner": _runner_record(options),
            "pid": os.getpid()}
    layout.write_phase_info(phase, info)
    _say(quiet, f"[curate] {phase} finished in {info['seconds']:.1f}s")
    if phase == "decide":
        from pipeline.report import negatives_recall

        recall = negatives_recall(info["metrics"])
        if recall:
            _say(quiet, "[curate] hard negatives vs exact search on sampled queries: " + ", ".join(
                f"{space} recall {r['recall']:.2f} ({r['found']} of {r['exact']}, {r['queries']} queries)"
                for space, r in recall.items()))
    return info


def retry_failed(config, layout: Layout, beam_args: list[str], quiet: bool = False) -> dict:
    """Re-fetch the rows whose failure was transient; everything else of the fetch phase stays."""
    previous = layout.read_phase_info("fetch")
    if previous is None:
        raise UsageError(f"--retry-failed needs a finished fetch phase in {layout.root!r}: "
                         "run `curate run` (or `curate fetch`) without it first")
    options = beam_options(beam_args, "fetch")
    resolve_clip(config, options)
    started = time.time()
    round_number = int(previous.get("retry_rounds", 0)) + 1
    for stale in PHASES:
        layout.clear(layout.phase_marker(stale))
    layout.clear(layout.features_staging)
    from pipeline.fetch import build_retry

    pipeline = new_pipeline(options)
    build_retry(pipeline, config, layout, round_number)
    result, _ = _run_pipeline(pipeline, "fetch", None, None, layout, True, options)
    layout.replace(layout.features, layout.features_staging)
    info = dict(previous, retry_rounds=round_number, retry_seconds=round(time.time() - started, 3),
                retry_metrics=_metrics(result))
    layout.write_phase_info("fetch", info)
    _say(quiet, f"[curate] retry round {round_number} finished in {info['retry_seconds']:.1f}s")
    return info


def report(layout: Layout) -> dict:
    """Account, write the report and print the summary (always: --quiet hides progress, not this)."""
    from pipeline.report import account, funnel_text, phase_infos, write_report

    summary = account(layout)
    path = write_report(layout, summary, phase_infos(layout))
    print(funnel_text(summary))
    print(f"shards:  {layout.shards}/  ({summary['shards']} tar + parquet)")
    print(f"ledger:  {layout.ledger}/")
    print(f"report:  {path}")
    sys.stdout.flush()
    return summary


def report_or_fail(layout: Layout) -> int:
    """Exit code 3, loudly, when the ledger does not account for every input row."""
    from pipeline.report import AccountingError

    try:
        report(layout)
    except AccountingError as error:
        print(f"curate: ACCOUNTING FAILED: {error}", file=sys.stderr)
        return EXIT_ACCOUNTING
    return EXIT_OK


def check_ceiling(pattern: str, config, final: bool) -> int:
    """Exit code 4 when too many rows failed (pipeline/ceiling.py), after everything is written."""
    message = ceiling.breach(pattern, config, final)
    if message is None:
        return EXIT_OK
    print("curate: " + message, file=sys.stderr)
    return EXIT_CEILING


def print_config(args) -> int:
    """`curate config`: every key with its type, default, phase and meaning (and the value that
    --config/--set give it)."""
    config = build_config(args.config, args.overrides) if (args.config or args.overrides) else None
    rows = [row for row in describe_keys() if not args.keys or any(k in row["key"] for k in args.keys)]
    if args.keys and not rows:
        raise UsageError(f"no config key contains {' or '.join(map(repr, args.keys))}"
                         + did_you_mean(args.keys[0], [r["key"] for r in describe_keys()]))
    for row in rows:
        if config is not None:
            row["value"] = getattr(config, row["key"])
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return EXIT_OK
    width = max(len(row["key"]) for row in rows)
    for row in rows:
        value = f"  = {json.dumps(row['value'], default=str)}" if "value" in row and row["value"] != row["default"] else ""
        print(f"{row['key']:<{width}}  {json.dumps(row['default'], default=str):<18} {row['phase']:<6} "
              f"{row['meaning']} [{row['type']}]{value}")
    if not args.keys:
        print(f"\n{len(rows)} keys. Columns: key, default, phase (the earliest phase a change re-runs), meaning "
              "[type]. Set them with --set KEY=VALUE or in a --config YAML file.")
    return EXIT_OK


RETRY = "retry"  # the --retry-failed round of fetch, a task like a phase


class PhaseFailed(RuntimeError):
    pass


class PhaseRefused(RuntimeError):
    """A phase process stopped at a user's mistake; it printed the line itself."""


def _layout_and_config(args):
    output = (args.output or "").rstrip("/") or args.output
    explicit = {k: getattr(args, k, None) for k in ("input", "input_format", "url_col", "caption_col")}
    explicit["output"] = output
    if getattr(args, "allow_hosts", None):
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
    try:
        args, beam_args = parse_args(argv)
        layout, config = _layout_and_config(args)
        logs.configure(logs.log_path_for(layout.root))
        run_task(task, config, layout, beam_args, args.quiet)
    except UsageError as error:
        print(f"curate: {error}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USAGE)


# A phase process re-runs the main module as __mp_main__ (multiprocessing's spawn preparation);
# under `python -m pipeline.cli` the fork server has imported it already, which is harmless, but
# runpy warns about it once per phase. The filter is inherited from the fork server.
warnings.filterwarnings("ignore", message=r"'pipeline\.cli' found in sys\.modules", category=RuntimeWarning)


_CODE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # holds pipeline/, transforms/, schemas/
_PACKAGES = ("pipeline", "transforms", "schemas")


def _cwd_shadows_this_code() -> bool:
    """Does the current directory hold packages named like ours other than the ones running?
    The fork server is started as `python -c`, which puts the current directory first on its
    path, and Python 3.11's fork server ignores the sys.path it is handed: its preloads would
    import that copy (another checkout of curate, or a project's own `transforms/`), and every
    phase would run it."""
    if os.path.realpath(os.getcwd()) == os.path.realpath(_CODE_ROOT):
        return False
    return any(os.path.exists(os.path.join(os.getcwd(), name)) for name in _PACKAGES)


def _phase_processes():
    context = multiprocessing.get_context("forkserver")
    # Without preloads each phase imports the project itself (~1 s), after multiprocessing has
    # given it this process's sys.path: used only when the current directory would shadow it.
    preload = [] if _cwd_shadows_this_code() else ["pipeline.cli"] + list(PHASE_MODULES.values()) + ["pipeline.report"]
    context.set_forkserver_preload(preload)
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
    if process.exitcode == EXIT_USAGE:
        raise PhaseRefused(task)
    if process.exitcode != 0:
        raise PhaseFailed(f"the {task} phase failed (exit code {process.exitcode}); its error is above")


def plan_tasks(args, config, layout: Layout) -> list[str]:
    """The tasks this command runs, in order: the --retry-failed round (when there is something to
    retry), then every phase that is not up to date, and every phase after one that runs."""
    tasks = []
    if getattr(args, "retry_failed", False):
        if layout.read_phase_info("fetch") is None:
            raise UsageError(f"--retry-failed needs a finished fetch phase in {layout.root!r}: "
                             "run the same command without --retry-failed first")
        if checks.transient_failures(layout):
            tasks.append(RETRY)
        else:
            print("[curate] --retry-failed: no row failed with a transient error (timeout, connection, DNS, 429, "
                  "5xx), so there is nothing to retry; skipped", file=sys.stderr)
    for phase in PHASES if args.command == "run" else (args.command,):
        if phase == "fetch" and getattr(args, "retry_failed", False):
            continue
        if (not tasks and args.command == "run" and not args.force
                and phase_is_current(phase, config, layout)):
            _say(args.quiet, f"[curate] {phase} is up to date, skipped (--force re-runs it)")
            continue
        tasks.append(phase)  # every phase after one that runs must run too
    return tasks


def start_up(args, config, layout: Layout, options: PipelineOptions) -> None:
    """Everything that can be known to be wrong before any work starts."""
    checks.check_runner(options)
    checks.check_output(layout.root)
    if args.command in ("run", "fetch") and not getattr(args, "retry_failed", False):
        checks.check_inputs(config)
        checks.check_inputs_not_in_output(config)
    checks.require_earlier_phase(args.command, layout)


def run_command(args, beam_args: list[str], argv: list[str]) -> int:
    layout, config = _layout_and_config(args)
    options = beam_options(beam_args)
    start_up(args, config, layout, options)
    tasks = plan_tasks(args, config, layout)
    if config.clip_enabled and ({"fetch", RETRY} & set(tasks)):
        check_checkpoint_file(config)  # the rest of the model's checks need torch: in the phase itself
    logs.configure(logs.log_path_for(layout.root))
    try:
        for task in tasks:
            if args.command == "run":
                run_in_own_process(task, argv)
            else:
                run_task(task, config, layout, beam_args, args.quiet)
    except PhaseRefused:
        return EXIT_USAGE
    except PhaseFailed as error:
        print(f"curate: {error}", file=sys.stderr)
        return EXIT_FAILED
    if args.command == "fetch":
        return check_ceiling(layout.features_glob(), config, final=False) if tasks else EXIT_OK
    if args.command in ("run", "write"):
        code = report_or_fail(layout)
        return code if code != EXIT_OK else check_ceiling(layout.ledger_glob(), config, final=True)
    return EXIT_OK


def main(argv: Optional[list[str]] = None) -> int:
    share_one_arena()  # before Beam's threads take arenas of their own (pipeline/heap.py says why)
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args, beam_args = parse_args(argv)
        if args.command == "config":
            return print_config(args)
        if args.command == "report":
            output = args.output or args.output_dir
            if not output:
                raise UsageError("`curate report` needs the output folder: curate report DIR")
            layout = Layout(output.rstrip("/") or output)
            checks.require_output_folder(layout)
            logs.configure(None)
            return report_or_fail(layout)
        return run_command(args, beam_args, argv)
    except UsageError as error:
        print(f"curate: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("curate: interrupted; the same command resumes (finished phases are kept)", file=sys.stderr)
        return EXIT_INTERRUPTED


def entry() -> None:
    """The `curate` command (and `python -m pipeline.cli`): main(), then out of the process without
    Python's finalisation. In Python < 3.14 a daemon thread that wakes up while the interpreter is
    finalising is ended by pthread_exit; when that thread is inside C++ code that cannot be unwound
    (gRPC's, under Beam's multi_processing runner), the process aborts ("terminate called without
    an active exception", exit -6) after a run that succeeded (CPython gh-87135). Everything Python
    would still do at exit that matters is done first: the atexit handlers (logging's flush among
    them) and the flush of stdout and stderr. An exception from main() (a bug of ours) leaves the
    normal way, with its traceback."""
    code = main()
    atexit._run_exitfuncs()  # noqa: SLF001 - what a normal exit runs before finalising
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing left to say there
            pass
    os._exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    entry()
