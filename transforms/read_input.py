"""Read stage: input files -> one record per input row, malformed rows included.

Files are matched and opened with Beam's FileSystems (local, GCS, S3 alike) and streamed row by row:
no input file is ever held whole in memory, CSV captions may span lines, and every row gets a
stable position (file, row index) for the ledger. A row that cannot be parsed still becomes a
record, marked dropped with a reason, so that it reaches the ledger.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
import posixpath
import tarfile
from typing import Any, Iterator, Optional
from urllib.parse import urlsplit

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from pipeline.config import CurateConfig
from schemas import Col, DropReason, Status
from transforms.base import iter_tar_members, mark_dropped

MAX_URL_CHARS = 4096
_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tiff")


def make_uid(url: str, caption: str) -> str:
    """The sample id: hex of a stable hash of url and caption (32 hex chars, like DataComp uids)."""
    digest = hashlib.sha256()
    digest.update((url or "").encode("utf-8", "surrogatepass"))
    digest.update(b"\x00")
    digest.update((caption or "").encode("utf-8", "surrogatepass"))
    return digest.hexdigest()[:32]


def detect_format(path: str) -> str:
    name = path.lower()
    for suffix in (".gz", ".bz2", ".zst", ".zstd", ".deflate"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    for fmt, extensions in (
        ("csv", (".csv",)),
        ("tsv", (".tsv", ".tab")),
        ("jsonl", (".jsonl", ".json", ".ndjson")),
        ("parquet", (".parquet", ".pq")),
        ("webdataset", (".tar",)),
    ):
        if name.endswith(extensions):
            return fmt
    raise ValueError(f"cannot tell the format of {path!r}: pass --input-format")


def _clean_text(value: Any) -> str:
    """A field as text; bytes that were not UTF-8 (kept as surrogates) become U+FFFD."""
    if value is None:
        return ""
    text = value if isinstance(value, str) else str(value)
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace") if _has_surrogates(text) else text


def _has_surrogates(text: str) -> bool:
    return any("\ud800" <= ch <= "\udfff" for ch in text)


def _base_record(source_file: str, source_row: int) -> dict:
    return {Col.SOURCE_FILE: source_file, Col.SOURCE_ROW: source_row, Col.STATUS: Status.KEPT}


def malformed_record(source_file: str, source_row: int, raw: Any, detail: str) -> dict:
    """A row that could not be parsed: its uid hashes its position and raw text."""
    raw_text = _clean_text(raw)[:2000]
    record = _base_record(source_file, source_row)
    record[Col.UID] = make_uid(f"{source_file}#{source_row}", raw_text)
    record[Col.URL] = None
    record[Col.CAPTION] = raw_text[:500] or None
    return mark_dropped(record, DropReason.MALFORMED_ROW, detail)


def validate_url(url: str) -> Optional[tuple[DropReason, str]]:
    if not url:
        return DropReason.MISSING_URL, "empty url"
    if len(url) > MAX_URL_CHARS:
        return DropReason.INVALID_URL, f"url longer than {MAX_URL_CHARS} characters"
    if "\ufffd" in url:
        return DropReason.INVALID_URL, "url is not valid UTF-8"
    if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in url):
        return DropReason.INVALID_URL, "url contains whitespace or control characters"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError as error:
        return DropReason.INVALID_URL, str(error)
    if not parts.scheme:
        return DropReason.INVALID_URL, "url has no scheme"
    if parts.scheme.lower() not in ("http", "https"):
        return DropReason.UNSUPPORTED_SCHEME, f"scheme {parts.scheme.lower()}:"
    if not parts.hostname:
        return DropReason.INVALID_URL, "url has no host"
    return None


def _extra_value(value: Any) -> Optional[str]:
    if value is None or isinstance(value, str):
        return value if value is None else _clean_text(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, (bool, int, float, list, dict, tuple)):
        return json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)
    return str(value)  # dates, decimals, ... from Parquet


def extra_json(extra: dict) -> Optional[str]:
    """The input row's other columns as one JSON object whose values are all strings (or null):
    typed the same whatever the input format, so a csv's "3" and a jsonl's 3 are both "3", and a
    loader that infers one schema over every sample (Hugging Face's webdataset) never meets a
    column that changes type between input files. None when there are no other columns."""
    if not extra:
        return None
    values = {str(key): _extra_value(value) for key, value in extra.items()}
    return json.dumps(values, sort_keys=True, ensure_ascii=False)


def row_to_record(fields: dict, source_file: str, source_row: int, url_col: str, caption_col: str) -> dict:
    """One parsed input row (column -> value) to a record; extra columns are kept as JSON."""
    record = _base_record(source_file, source_row)
    raw_url = fields.get(url_col)
    url = _clean_text(raw_url).strip()
    caption = _clean_text(fields.get(caption_col))
    extra = {k: v for k, v in fields.items() if k not in (url_col, caption_col)}
    record[Col.URL] = url or None
    record[Col.CAPTION] = caption
    record[Col.EXTRA] = extra_json(extra)
    record[Col.UID] = make_uid(url, caption)
    if url_col not in fields:
        return mark_dropped(record, DropReason.MISSING_URL, f"no column {url_col!r}")
    problem = validate_url(url)
    if problem is not None:
        mark_dropped(record, problem[0], problem[1])
    return record


# ---------------------------------------------------------------------------------------------
# Per-format streaming readers. Each yields records for one opened file.
# ---------------------------------------------------------------------------------------------


class _RawReader(io.RawIOBase):
    """Adapts Beam's file objects (CompressedFile lacks parts of the io protocol) to io.RawIOBase."""

    def __init__(self, handle):
        self._handle = handle

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self._handle.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def buffered(handle) -> io.BufferedReader:
    return io.BufferedReader(_RawReader(handle), buffer_size=1 << 20)


def text_stream(handle) -> io.TextIOWrapper:
    # surrogateescape keeps undecodable bytes visible so the row can be flagged, not crash.
    return io.TextIOWrapper(handle, encoding="utf-8", errors="surrogateescape", newline="")


def read_header(text: io.TextIOBase, delimiter: str) -> list[str]:
    """The column names on the first line of a CSV/TSV text stream (a BOM and spaces stripped)."""
    header = next(csv.reader([text.readline()], delimiter=delimiter), [])
    return [h.lstrip("\ufeff").strip() for h in header]


def _delimited_rows(text, delimiter: str, header: list[str], source_file: str, config: CurateConfig, first_row: int,
                    limit: Optional[int], positions: Optional[list] = None, every: int = 0) -> Iterator[dict]:
    """Records of the rows from the text stream's position: row indices from `first_row`, at
    most `limit` rows. With `positions`, the stream position (text.tell()) before each row whose
    index is a multiple of `every` is appended as (row index, position) instead (a scan)."""
    csv.field_size_limit(max(config.max_field_bytes, 1024))
    # the csv reader pulls one line at a time and never reads ahead, so tell() before each row is
    # where that row starts
    reader = csv.reader(iter(text.readline, ""), delimiter=delimiter)
    row_index = first_row
    while limit is None or row_index < first_row + limit:
        if positions is not None and (row_index - first_row) % every == 0:
            position = text.tell()
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as error:  # NUL bytes, oversize fields: the row is lost, not the file
            if positions is not None and (row_index - first_row) % every == 0:
                positions.append((row_index, position))
            elif positions is None:
                yield malformed_record(source_file, row_index, "", f"csv: {error}")
            row_index += 1
            continue
        if not values or (len(values) == 1 and not values[0].strip()):
            continue  # blank line
        if positions is not None:
            if (row_index - first_row) % every == 0:
                positions.append((row_index, position))
        elif len(values) != len(header):
            yield malformed_record(
                source_file, row_index, delimiter.join(values),
                f"{len(values)} fields, header has {len(header)}",
            )
        else:
            yield row_to_record(dict(zip(header, values)), source_file, row_index, config.url_col, config.caption_col)
        row_index += 1


def iter_delimited(handle, source_file: str, config: CurateConfig, delimiter: str) -> Iterator[dict]:
    text = text_stream(handle)
    header = read_header(text, delimiter)
    yield from _delimited_rows(text, delimiter, header, source_file, config, 0, None)


def iter_jsonl(handle, source_file: str, config: CurateConfig, first_row: int = 0, limit: Optional[int] = None,
               positions: Optional[list] = None, every: int = 0) -> Iterator[dict]:
    """Records of the JSON lines from the handle's position (row indices from `first_row`, at most
    `limit` rows). With `positions`, (row index, byte offset from the start) is appended for each
    row whose index is a multiple of `every` instead (a scan)."""
    max_line = max(config.max_field_bytes, 1024) * 2
    row_index, offset = first_row, 0
    while limit is None or row_index < first_row + limit:
        start = offset
        line = handle.readline(max_line + 1)
        if not line:
            return
        offset += len(line)
        if len(line) > max_line and not line.endswith(b"\n"):
            while True:  # skip the rest of an over-long line without holding it
                rest = handle.readline(max_line)
                offset += len(rest)
                if not rest or rest.endswith(b"\n"):
                    break
            if positions is not None:
                if (row_index - first_row) % every == 0:
                    positions.append((row_index, start))
            else:
                yield malformed_record(source_file, row_index, line[:200], f"line longer than {max_line} bytes")
            row_index += 1
            continue
        stripped = line.strip()
        if not stripped:
            continue
        if positions is not None:
            if (row_index - first_row) % every == 0:
                positions.append((row_index, start))
            row_index += 1
            continue
        try:
            fields = json.loads(stripped.decode("utf-8", "surrogateescape"))
        except (ValueError, UnicodeDecodeError) as error:
            yield malformed_record(source_file, row_index, stripped[:200], f"json: {error}")
        else:
            if isinstance(fields, dict):
                yield row_to_record(fields, source_file, row_index, config.url_col, config.caption_col)
            else:
                yield malformed_record(source_file, row_index, stripped[:200], "json line is not an object")
        row_index += 1


def iter_parquet(handle, source_file: str, config: CurateConfig, row_groups: Optional[list] = None,
                 first_row: int = 0, skip: int = 0, rows: Optional[int] = None) -> Iterator[dict]:
    """The records of `row_groups` (all when None), past their first `skip` rows, `rows` of them
    (all when None)."""
    import pyarrow.parquet as pq

    row_index = first_row
    parquet = pq.ParquetFile(handle)
    end = None if rows is None else skip + rows
    seen = 0  # rows of the row groups passed so far
    for batch in parquet.iter_batches(batch_size=1024, row_groups=row_groups):
        start, seen = seen, seen + batch.num_rows
        if seen <= skip:
            continue
        batch = batch.slice(max(0, skip - start), batch.num_rows if end is None else max(0, end - max(start, skip)))
        for fields in batch.to_pylist():
            yield row_to_record(fields, source_file, row_index, config.url_col, config.caption_col)
            row_index += 1
        if end is not None and seen >= end:
            return


_SHA256_HEX = frozenset("0123456789abcdef")


def _positive_int(value: Any) -> Optional[int]:
    if isinstance(value, bool):
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        return None
    return number if 0 < number < 1_000_000 and number == value else None


def source_description(meta: dict) -> dict:
    """What an input shard's KEY.json says about the image its (resized) copy was made from:
    img2dataset and our own shards write `original_width`, `original_height` and `sha256` of the
    downloaded original. Untrusted: a value of the wrong type or shape is ignored."""
    found = {}
    width, height = _positive_int(meta.get("original_width")), _positive_int(meta.get("original_height"))
    if width and height:
        found[Col.ORIGINAL_WIDTH], found[Col.ORIGINAL_HEIGHT] = width, height
    digest = meta.get("sha256")
    if isinstance(digest, str) and len(digest) == 64 and set(digest.lower()) <= _SHA256_HEX:
        found[Col.SHA256] = digest.lower()
    return found


def source_size(record: dict) -> Optional[tuple[int, int]]:
    """The original (width, height) an input shard gave for its image, if it gave one."""
    width, height = record.get(Col.ORIGINAL_WIDTH), record.get(Col.ORIGINAL_HEIGHT)
    return (width, height) if width and height else None


def _webdataset_record(key: str, members: dict, source_file: str, row_index: int) -> dict:
    meta: dict = {}
    if "json" in members:
        try:
            loaded = json.loads(members["json"].decode("utf-8", "replace"))
            meta = loaded if isinstance(loaded, dict) else {}
        except ValueError:
            meta = {}
    caption = members["txt"].decode("utf-8", "replace") if "txt" in members else _clean_text(meta.get("caption"))
    # Our own shards' KEY.json carry the raw caption in `caption` (KEY.txt is the clean one): the
    # raw one keeps the uid of the row it came from.
    if isinstance(meta.get(Col.CAPTION_CLEAN), str) and isinstance(meta.get("caption"), str):
        caption = _clean_text(meta["caption"])
    url = _clean_text(meta.get("url")).strip()
    record = _base_record(source_file, row_index)
    record[Col.URL] = url or None
    record[Col.CAPTION] = caption
    # img2dataset flattens the input's extra columns into KEY.json; ours keeps them in `extra`
    extra = meta[Col.EXTRA] if isinstance(meta.get(Col.EXTRA), dict) else {
        k: v for k, v in meta.items() if k not in ("url", "caption")}
    record[Col.EXTRA] = extra_json(dict(extra, source_key=key))
    record.update(source_description(meta))
    # Without a url the uid falls back to the sample's place in its shard.
    record[Col.UID] = make_uid(url or f"{posixpath.basename(source_file)}#{key}", caption)
    image = next((members[ext] for ext in _IMAGE_EXTENSIONS if ext in members), None)
    if image is None:
        return mark_dropped(record, DropReason.SOURCE_MISSING_IMAGE, f"members: {sorted(members)}")
    record[Col.IMAGE_BYTES] = image
    record[Col.BYTES] = len(image)
    return record


def iter_webdataset(handle, source_file: str, config: CurateConfig) -> Iterator[dict]:
    """img2dataset-style shards: consecutive members share a key (`KEY.jpg`, `KEY.txt`, ...)."""
    row_index, key = 0, ""
    try:
        for key, members in iter_tar_members(handle, config.max_body_bytes):
            yield _webdataset_record(key, members, source_file, row_index)
            row_index += 1
    except (tarfile.TarError, OSError, EOFError) as error:
        yield malformed_record(source_file, row_index, key, f"tar: {error}")


_READERS = {
    "csv": lambda h, f, c: iter_delimited(h, f, c, ","),
    "tsv": lambda h, f, c: iter_delimited(h, f, c, "\t"),
    "jsonl": iter_jsonl,
    "parquet": iter_parquet,
    "webdataset": iter_webdataset,
}


def iter_file_records(handle, source_file: str, fmt: str, config: CurateConfig) -> Iterator[dict]:
    return _READERS[fmt](handle, source_file, config)


def input_patterns(input_spec: str) -> list[str]:
    """The paths and globs of `--input` (a comma-separated list)."""
    return [p.strip() for p in (input_spec or "").split(",") if p.strip()]


def is_local(pattern: str) -> bool:
    return "://" not in pattern


def has_wildcard(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def match_input_pattern(pattern: str, cwd: str = "") -> list[tuple[str, str]]:
    """(the file's path as the user gave it, its path to open) for every file `pattern` matches,
    sorted. The first is what the ledger's source_file holds: `a/rows.csv` and `b/rows.csv` stay
    apart. Beam's local matcher finds nothing for a relative glob whose first part is a wildcard
    (`*/rows.csv`), so local relative globs are matched as absolute paths and named relative again."""
    if not (is_local(pattern) and has_wildcard(pattern)):
        found = FileSystems.match([pattern])[0].metadata_list
        return sorted((pattern if len(found) == 1 and m.path == pattern else m.path, m.path) for m in found)
    cwd = cwd or os.getcwd()
    relative = not os.path.isabs(pattern)
    absolute = os.path.join(cwd, pattern) if relative else pattern
    paths = sorted(m.path for m in FileSystems.match([absolute])[0].metadata_list)
    return [(os.path.relpath(path, cwd) if relative else path, path) for path in paths]


CHUNK_ROWS = 50_000  # rows per chunk of an input file: the unit of reading spread over workers
# The fetch's rows each cost a download and a decode, so its input is cut finer: into about
# FETCH_CHUNKS chunks (every worker of a local run or a Dataflow pool gets several, and the last
# one to finish holds up the others little), of FETCH_MIN_CHUNK_ROWS to FETCH_MAX_CHUNK_ROWS rows.
FETCH_CHUNKS = 64
FETCH_MIN_CHUNK_ROWS = 64
FETCH_MAX_CHUNK_ROWS = 10_000


def fetch_chunk_rows(input_rows: Optional[int]) -> int:
    """Rows per chunk of the fetch's input, given how many rows it has (None: not known, e.g.
    remote files)."""
    if input_rows is None:
        return FETCH_MAX_CHUNK_ROWS
    return min(FETCH_MAX_CHUNK_ROWS, max(FETCH_MIN_CHUNK_ROWS, -(-input_rows // FETCH_CHUNKS)))


_SEEKABLE_FORMATS = ("csv", "tsv", "jsonl")


@dataclasses.dataclass(frozen=True)
class FileChunk:
    """Rows [first_row, first_row + rows) of one input file (rows None: to its end), starting at
    byte `offset` (text formats) or in `row_groups` (Parquet: past the first `offset` rows of
    them); `header` for csv/tsv."""

    path: str  # to open
    fmt: str
    source_file: str = ""  # the file as the user named it (the ledger's source_file)
    first_row: int = 0
    rows: Optional[int] = None
    offset: int = 0
    header: tuple = ()
    row_groups: tuple = ()


def _format_of(path: str, config: CurateConfig) -> str:
    return config.input_format if config.input_format != "auto" else detect_format(path)


def _is_compressed(path: str) -> bool:
    return CompressionTypes.detect_compression_type(path) != CompressionTypes.UNCOMPRESSED


def plan_chunks(named_path: tuple[str, str], config: CurateConfig, chunk_rows: Optional[int] = None) -> list[FileChunk]:
    """Split one input file into chunks of about `chunk_rows` rows, found by one pass over it that
    records where rows start (csv/tsv: the csv reader's own row boundaries, so quoted newlines
    stay inside their row). Compressed files and WebDataset tars are one chunk: they can only be
    read from their start."""
    from apache_beam.io.filesystems import FileSystems

    source_file, path = named_path
    chunk_rows = chunk_rows or CHUNK_ROWS
    fmt = _format_of(path, config)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            metadata = pq.ParquetFile(handle).metadata
        return _parquet_chunks(path, fmt, source_file, [metadata.row_group(i).num_rows
                                                       for i in range(metadata.num_row_groups)], chunk_rows)
    if fmt not in _SEEKABLE_FORMATS or _is_compressed(path):
        return [FileChunk(path, fmt, source_file)]
    positions: list = []
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        if fmt == "jsonl":
            for _ in iter_jsonl(handle, path, config, positions=positions, every=chunk_rows):
                pass
            header: tuple = ()
        else:
            text = text_stream(handle)
            header = tuple(read_header(text, "," if fmt == "csv" else "\t"))
            for _ in _delimited_rows(text, "," if fmt == "csv" else "\t", list(header), path, config, 0, None,
                                     positions=positions, every=chunk_rows):
                pass
    if not positions:
        return [FileChunk(path, fmt, source_file, 0, 0, header=header)]
    chunks = []
    for (row, offset), following in zip(positions, positions[1:] + [None]):
        rows = None if following is None else following[0] - row
        chunks.append(FileChunk(path, fmt, source_file, row, rows, offset, header))
    return chunks


def _parquet_chunks(path: str, fmt: str, source_file: str, group_rows: list, chunk_rows: int) -> list[FileChunk]:
    """Chunks of whole row groups (small groups joined up to `chunk_rows`); a row group larger
    than that is cut into row ranges of its own (pyarrow's default row group holds a whole
    file of the usual size: one group as one chunk would leave every other worker idle)."""
    chunks, groups, first, rows = [], [], 0, 0
    for index, count in enumerate(group_rows):
        if count > chunk_rows:
            if groups:
                chunks.append(FileChunk(path, fmt, source_file, first, rows, row_groups=tuple(groups)))
                first, groups, rows = first + rows, [], 0
            pieces = -(-count // chunk_rows)
            bounds = [count * k // pieces for k in range(pieces + 1)]
            chunks += [FileChunk(path, fmt, source_file, first + start, end - start, row_groups=(index,), offset=start)
                       for start, end in zip(bounds, bounds[1:])]
            first += count
            continue
        groups.append(index)
        rows += count
        if rows >= chunk_rows or index == len(group_rows) - 1:
            chunks.append(FileChunk(path, fmt, source_file, first, rows, row_groups=tuple(groups)))
            first, groups, rows = first + rows, [], 0
    return chunks or [FileChunk(path, fmt, source_file, 0, 0, row_groups=())]


def read_chunk(chunk: FileChunk, config: CurateConfig) -> Iterator[dict]:
    """The records of one chunk."""
    from apache_beam.io.filesystems import FileSystems

    source_file = chunk.source_file or chunk.path
    if chunk.fmt == "parquet":
        if chunk.rows == 0:
            return
        with FileSystems.open(chunk.path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            yield from iter_parquet(handle, source_file, config, list(chunk.row_groups), chunk.first_row,
                                    skip=chunk.offset, rows=chunk.rows)
        return
    if chunk.fmt in _SEEKABLE_FORMATS and not _is_compressed(chunk.path):
        if chunk.rows == 0:
            return
        with FileSystems.open(chunk.path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            handle.seek(chunk.offset)
            if chunk.fmt == "jsonl":
                yield from iter_jsonl(buffered(handle), source_file, config, chunk.first_row, chunk.rows)
            else:
                delimiter = "," if chunk.fmt == "csv" else "\t"
                yield from _delimited_rows(text_stream(buffered(handle)), delimiter, list(chunk.header), source_file,
                                           config, chunk.first_row, chunk.rows)
        return
    with FileSystems.open(chunk.path, compression_type=CompressionTypes.AUTO) as handle:
        yield from iter_file_records(buffered(handle), source_file, chunk.fmt, config)


class _PlanChunks(beam.DoFn):
    def __init__(self, config: CurateConfig, chunk_rows: Optional[int]):
        self._config = config
        self._chunk_rows = chunk_rows

    def process(self, named_path: tuple[str, str]):
        yield from plan_chunks(named_path, self._config, self._chunk_rows)


class _ReadChunk(beam.DoFn):
    def __init__(self, config: CurateConfig):
        self._config = config

    def process(self, chunk: FileChunk):
        yield from read_chunk(chunk, self._config)


class ReadRows(beam.PTransform):
    """Match the input pattern(s), cut every file into chunks of rows, spread the chunks over
    workers and stream each chunk's rows. What is shuffled is the chunks, never the rows: a
    shuffle of rows would hold every input row (and, for WebDataset input, every image) at once on
    the in-memory runners. `spread=False` reads the files in place (for a pass that only looks at
    each row once, such as finding repeated rows). `chunk_rows`: rows per chunk (default
    CHUNK_ROWS); smaller chunks spread a small input over more workers."""

    def __init__(self, config: CurateConfig, spread: bool = True, chunk_rows: Optional[int] = None):
        super().__init__()
        self._config = config
        self._spread = spread
        self._chunk_rows = chunk_rows

    def expand(self, pbegin):
        cwd = os.getcwd()  # where relative inputs were given: the ledger names files relative to it
        chunks = (
            pbegin
            | "Patterns" >> beam.Create(input_patterns(self._config.input))
            | "Match" >> beam.FlatMap(match_input_pattern, cwd=cwd)  # (name as given, path)
            | "Plan" >> beam.ParDo(_PlanChunks(self._config, self._chunk_rows))  # FileChunk
        )
        if self._spread:
            chunks = chunks | "Spread" >> beam.Reshuffle()
        return chunks | "Parse" >> beam.ParDo(_ReadChunk(self._config))  # record
