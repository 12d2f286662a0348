"""Start-up checks: a user's mistake fails here, in one line, before any work starts.

Each check raises UsageError with the line to print: the thing that is wrong and what to pass
instead. They read little (one header line, a Parquet footer, a tar header per input file), so a
mistyped column is caught in a second, not after an hour of downloads that all end `missing_url`.
"""

from __future__ import annotations

import json
import os
import tarfile
from typing import Optional

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from pipeline.errors import UsageError, closest, did_you_mean
from pipeline.layout import Layout
from transforms.read_input import (
    buffered,
    detect_format,
    has_wildcard,
    input_patterns,
    is_local,
    match_input_pattern,
    read_header,
    text_stream,
)

# Header checks open every local input file, but only the first few remote ones: a glob over
# thousands of objects in a bucket would cost a request each.
MAX_LOCAL_FILES_CHECKED = 2000
MAX_REMOTE_FILES_CHECKED = 20
_JSONL_LINES_LOOKED_AT = 100
_HEADER_BYTES = 1 << 20

# Names other datasets give the two columns (LAION: URL/TEXT, CC3M/CC12M: image_url/caption, ...)
URL_COLUMN_NAMES = ("url", "image_url", "img_url", "imageurl", "image", "link", "src", "photo_url")
CAPTION_COLUMN_NAMES = ("caption", "text", "alt", "alt_text", "title", "description", "captions", "label")


def _quote(path: str) -> str:
    return repr(path)


def matched_files(input_spec: str) -> list[tuple[str, str]]:
    """(as given, path) of every input file; UsageError naming the first path or glob that
    matches nothing, or that names a folder."""
    if not input_patterns(input_spec):
        raise UsageError("--input is empty: give a file, a glob or a comma-separated list")
    files: list[tuple[str, str]] = []
    for pattern in input_patterns(input_spec):
        if is_local(pattern) and os.path.isdir(pattern):
            raise UsageError(f"--input {_quote(pattern)} is a folder; give its files, e.g. --input "
                             f"'{os.path.join(pattern, '*' + _common_extension(pattern))}'")
        try:
            found = match_input_pattern(pattern)
        except Exception as error:  # noqa: BLE001 - a remote filesystem's own error (no credentials, ...)
            raise UsageError(f"--input {_quote(pattern)} cannot be listed: {_first_line(error)}") from None
        if not found:
            raise UsageError(_nothing_matches(pattern))
        files.extend(f for f in found if not (is_local(f[1]) and os.path.isdir(f[1])))
    return files


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def _common_extension(folder: str) -> str:
    """The most common data-file extension in a folder (for the glob the message suggests)."""
    counts: dict[str, int] = {}
    try:
        for name in os.listdir(folder):
            for suffix in (".csv", ".tsv", ".jsonl", ".json", ".parquet", ".tar", ".csv.gz", ".jsonl.gz", ".tsv.gz"):
                if name.endswith(suffix):
                    counts[suffix] = counts.get(suffix, 0) + 1
    except OSError:
        return ".parquet"
    return max(counts, key=lambda s: (counts[s], len(s))) if counts else ".parquet"


def _nothing_matches(pattern: str) -> str:
    if has_wildcard(pattern):
        return f"--input {_quote(pattern)} matches no file; check the folder and the pattern"
    where = ""
    if pattern.startswith("~"):
        return f"--input {_quote(pattern)}: no such file (a quoted ~ is not your home folder: write $HOME)"
    if is_local(pattern):
        folder = os.path.dirname(pattern) or "."
        if not os.path.isdir(folder):
            return f"--input {_quote(pattern)}: no such file (the folder {_quote(folder)} does not exist)"
        near = closest(os.path.basename(pattern), os.listdir(folder))
        where = f" (did you mean {_quote(os.path.join(os.path.dirname(pattern), near))}?)" if near else ""
    return f"--input {_quote(pattern)}: no such file{where}"


def _format_of(path: str, config) -> str:
    if config.input_format != "auto":
        return config.input_format
    try:
        return detect_format(path)
    except ValueError:
        raise UsageError(f"cannot tell the format of {_quote(path)} from its name; pass --input-format "
                         "csv|tsv|jsonl|parquet|webdataset") from None


def _columns_and_rows(path: str, fmt: str) -> tuple[Optional[list[str]], bool]:
    """(column names, or None where columns do not apply; whether the file has a data row)."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            parquet = pq.ParquetFile(handle)
            return list(parquet.schema_arrow.names), parquet.metadata.num_rows > 0
    with FileSystems.open(path, compression_type=CompressionTypes.AUTO) as handle:
        stream = buffered(handle)
        if fmt == "webdataset":
            with tarfile.open(fileobj=stream, mode="r|") as archive:
                return None, archive.next() is not None
        if fmt == "jsonl":
            return _jsonl_keys(stream)
        text = text_stream(stream)
        header = read_header(text, "," if fmt == "csv" else "\t")
        has_row = any(line.strip() for line in _first_lines(text, 3))
        return header, has_row


def _first_lines(text, count: int):
    for _ in range(count):
        line = text.readline(_HEADER_BYTES)
        if not line:
            return
        yield line


def _jsonl_keys(stream) -> tuple[list[str], bool]:
    keys: dict[str, None] = {}
    lines = objects = 0
    for _ in range(_JSONL_LINES_LOOKED_AT):
        line = stream.readline(_HEADER_BYTES)
        if not line:
            break
        if not line.strip():
            continue
        lines += 1
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            objects += 1
            keys.update(dict.fromkeys(map(str, value)))
    if lines and not objects:
        raise UsageError("no line of the first ones is a JSON object")
    return list(keys), lines > 0


def _column_error(path: str, fmt: str, columns: list[str], missing: str, flag: str, usual: tuple) -> UsageError:
    noun = "key" if fmt == "jsonl" else "column"
    shown = ", ".join(columns[:20]) + (", ..." if len(columns) > 20 else "")
    guess = closest(missing, columns) or next(
        (c for name in usual for c in columns if c.lower() == name), None)
    fix = f"pass {flag} {guess}" if guess else f"pass {flag} with one of them"
    return UsageError(f"{noun} {missing!r} is not in {_quote(path)}, whose {noun}s are: {shown}; {fix}")


_OTHER_SEPARATORS = {";": "semicolon", "|": "pipe", "\t": "tab", ",": "comma"}


def _check_delimited_header(path: str, fmt: str, columns: list[str]) -> None:
    """A header that is not text, one column that holds another separator (the wrong format), or
    data where the header should be."""
    header = ",".join(columns)
    if "\x00" in header or "\ufffd" in header or any("\udc80" <= ch <= "\udcff" for ch in header):
        raise UsageError(f"{_quote(path)} does not start with a {fmt} header line (binary data); "
                         "is --input-format right?")
    if len(columns) == 1:
        for separator, name in _OTHER_SEPARATORS.items():
            if separator in columns[0] and separator != ("," if fmt == "csv" else "\t"):
                fix = "pass --input-format tsv" if separator == "\t" else (
                    "pass --input-format csv" if separator == "," else "convert it to csv, tsv, jsonl or parquet")
                raise UsageError(f"{_quote(path)} looks {name}-separated (header {columns[0][:80]!r}), "
                                 f"but is read as {fmt}; {fix}")
    if any("://" in c or c.startswith("www.") for c in columns):
        raise UsageError(f"{_quote(path)} has no header line (its first line is data: {', '.join(columns)[:120]}); "
                         f"add one that names the columns, e.g. url{',' if fmt == 'csv' else '<TAB>'}caption")


def check_input_file(path: str, config) -> bool:
    """Format, readability and the url/caption columns of one input file. Returns whether it has rows."""
    fmt = _format_of(path, config)
    try:
        columns, has_rows = _columns_and_rows(path, fmt)
    except UsageError as error:
        raise UsageError(f"{_quote(path)}: {error}; is it {fmt}? (--input-format)") from None
    except Exception as error:  # noqa: BLE001 - whatever a corrupt gzip/parquet/tar raises
        raise UsageError(f"cannot read {_quote(path)} as {fmt}: {_first_line(error)}") from None
    if columns is not None and fmt in ("csv", "tsv"):
        _check_delimited_header(path, fmt, columns)
    if columns is not None and has_rows:
        for name, flag, usual in ((config.url_col, "--url-col", URL_COLUMN_NAMES),
                                  (config.caption_col, "--caption-col", CAPTION_COLUMN_NAMES)):
            if name not in columns:
                raise _column_error(path, fmt, columns, name, flag, usual)
    return has_rows


def check_inputs(config) -> None:
    """Every input path or glob matches files, each file is readable in its format and has the
    url and caption columns; the input as a whole has rows."""
    files = matched_files(config.input)
    local = [f for f in files if is_local(f[1])][:MAX_LOCAL_FILES_CHECKED]
    remote = [f for f in files if not is_local(f[1])][:MAX_REMOTE_FILES_CHECKED]
    has_rows = False
    for _, path in local + remote:
        has_rows = check_input_file(path, config) or has_rows
    if not has_rows and len(local) + len(remote) == len(files):
        names = ", ".join(_quote(g) for g, _ in files[:3]) + (", ..." if len(files) > 3 else "")
        raise UsageError(f"the input has no rows: {names} {'is' if len(files) == 1 else 'are'} empty "
                         "(a header at most); check --input")


def check_output(output: str) -> None:
    """The output folder can be a folder: not a file, not under a file."""
    if not output:
        raise UsageError("--output is required: the folder the outputs go to (created if missing)")
    if not is_local(output):
        try:
            FileSystems.exists(output)
        except Exception as error:  # noqa: BLE001 - no filesystem for the scheme, missing credentials, ...
            raise UsageError(f"--output {_quote(output)} cannot be used: {_first_line(error)}") from None
        return
    if os.path.isfile(output):
        raise UsageError(f"--output {_quote(output)} is a file; give a folder (it is created if missing)")
    parent = os.path.dirname(os.path.abspath(output))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UsageError(f"--output {_quote(output)} cannot be created: {_quote(parent)} is a file")
    if not os.access(parent if not os.path.isdir(output) else output, os.W_OK):
        raise UsageError(f"--output {_quote(output)} is not writable for this user; give another folder")


def check_inputs_not_in_output(config) -> None:
    """An input file inside a folder the run clears (`OUTPUT/features`, `OUTPUT/shards`, ...)
    would be deleted before it is read."""
    if not (is_local(config.output) and config.input):
        return
    output = os.path.abspath(config.output)
    for pattern in input_patterns(config.input):
        if is_local(pattern):
            absolute = os.path.abspath(pattern)
            for sub in ("features", "raw", "decisions", "shards", "ledger", "features.staging"):
                if absolute.startswith(os.path.join(output, sub) + os.sep):
                    raise UsageError(f"--input {_quote(pattern)} lies in {_quote(os.path.join(config.output, sub))}, "
                                     "which this run replaces; copy it elsewhere or pick another --output")


PHASES_BEFORE = {"decide": ("fetch",), "write": ("fetch", "decide")}


def require_earlier_phase(command: str, layout: Layout) -> None:
    """`curate decide` needs a finished fetch in the folder, `curate write` a finished decide."""
    for needed in PHASES_BEFORE.get(command, ()):
        if layout.read_phase_info(needed) is None:
            what = "does not exist" if not FileSystems.exists(layout.root) else f"has no finished {needed} phase"
            raise UsageError(f"`curate {command}` reads the {needed} phase's output, but {_quote(layout.root)} "
                             f"{what}: run `curate {needed}` (or `curate run`) with --output {layout.root} first")


def check_runner(options) -> None:
    """The runner exists (a misspelt --runner is an error when the pipeline is built, deep in a
    phase) and its required options are there (Dataflow: project, region, temp_location)."""
    from apache_beam.options.pipeline_options import StandardOptions
    from apache_beam.options.pipeline_options_validator import PipelineOptionsValidator
    from apache_beam.runners.runner import create_runner

    name = options.view_as(StandardOptions).runner
    try:
        runner = create_runner(name)
    except (ValueError, ImportError) as error:
        raise UsageError(f"--runner {name}: {_first_line(error)}") from None
    problems = PipelineOptionsValidator(options, runner).validate()
    if problems:
        raise UsageError(f"--runner {name}: " + " ".join(problems))


def require_output_folder(layout: Layout) -> None:
    """`curate report DIR` needs a folder that a run has written."""
    if not FileSystems.exists(layout.root):
        raise UsageError(f"{_quote(layout.root)} does not exist; give the --output folder of a `curate run`")
    if is_local(layout.root) and not os.path.isdir(layout.root):
        raise UsageError(f"{_quote(layout.root)} is a file; give the --output folder of a `curate run`")
    if layout.read_phase_info("write") is None:
        done = [phase for phase in ("fetch", "decide") if layout.read_phase_info(phase) is not None]
        if done:
            raise UsageError(f"{_quote(layout.root)} has no finished write phase (only {', '.join(done)}); "
                             f"run `curate write --output {layout.root}` (or `curate run`) first")
        raise UsageError(f"{_quote(layout.root)} is not a curate output folder (no run/write.json); "
                         "give the --output folder of a `curate run`")


def transient_failures(layout: Layout) -> int:
    """Rows of the features table whose failure `--retry-failed` would fetch again (one column read)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from schemas import TRANSIENT_REASONS, Col

    transient = pa.array(sorted(reason.value for reason in TRANSIENT_REASONS))
    total = 0
    for metadata in FileSystems.match([layout.features_glob()])[0].metadata_list:
        with FileSystems.open(metadata.path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            reasons = pq.ParquetFile(handle).read(columns=[Col.REASON])[Col.REASON]
        total += pc.sum(pc.is_in(reasons, value_set=transient)).as_py() or 0
    return total


def unknown_flag_message(flag: str, known: list[str], command: str) -> str:
    return (f"unknown flag {flag}" + did_you_mean(flag.split("=", 1)[0], known)
            + f" for `curate {command}`; `curate {command} --help` lists its flags (Beam's options pass through)")
