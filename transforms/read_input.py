"""Read stage: input files -> one record per input row, malformed rows included.

Files are matched and opened with Beam's fileio (local, GCS, S3 alike) and streamed row by row:
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
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes

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


def row_to_record(fields: dict, source_file: str, source_row: int, url_col: str, caption_col: str) -> dict:
    """One parsed input row (column -> value) to a record; extra columns are kept as JSON."""
    record = _base_record(source_file, source_row)
    raw_url = fields.get(url_col)
    url = _clean_text(raw_url).strip()
    caption = _clean_text(fields.get(caption_col))
    extra = {str(k): v for k, v in fields.items() if k not in (url_col, caption_col)}
    record[Col.URL] = url or None
    record[Col.CAPTION] = caption
    record[Col.EXTRA] = json.dumps(extra, sort_keys=True, default=str, ensure_ascii=False) if extra else None
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


def _text_stream(handle) -> io.TextIOWrapper:
    # surrogateescape keeps undecodable bytes visible so the row can be flagged, not crash.
    return io.TextIOWrapper(handle, encoding="utf-8", errors="surrogateescape", newline="")


def _csv_header(text, delimiter: str) -> list[str]:
    header_line = text.readline()
    header = next(csv.reader([header_line], delimiter=delimiter), [])
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
    text = _text_stream(handle)
    header = _csv_header(text, delimiter)
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
                 first_row: int = 0) -> Iterator[dict]:
    import pyarrow.parquet as pq

    row_index = first_row
    parquet = pq.ParquetFile(handle)
    for batch in parquet.iter_batches(batch_size=1024, row_groups=row_groups):
        for fields in batch.to_pylist():
            yield row_to_record(fields, source_file, row_index, config.url_col, config.caption_col)
            row_index += 1


def _webdataset_record(key: str, members: dict, source_file: str, row_index: int) -> dict:
    meta: dict = {}
    if "json" in members:
        try:
            loaded = json.loads(members["json"].decode("utf-8", "replace"))
            meta = loaded if isinstance(loaded, dict) else {}
        except ValueError:
            meta = {}
    caption = members["txt"].decode("utf-8", "replace") if "txt" in members else _clean_text(meta.get("caption"))
    url = _clean_text(meta.get("url")).strip()
    record = _base_record(source_file, row_index)
    record[Col.URL] = url or None
    record[Col.CAPTION] = caption
    extra = {k: v for k, v in meta.items() if k not in ("url", "caption")}
    extra["source_key"] = key
    record[Col.EXTRA] = json.dumps(extra, sort_keys=True, default=str, ensure_ascii=False)
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


CHUNK_ROWS = 50_000  # rows per chunk of an input file: the unit of reading spread over workers
_SEEKABLE_FORMATS = ("csv", "tsv", "jsonl")


@dataclasses.dataclass(frozen=True)
class FileChunk:
    """Rows [first_row, first_row + rows) of one input file (rows None: to its end), starting at
    byte `offset` (text formats) or in `row_groups` (Parquet); `header` for csv/tsv."""

    path: str
    fmt: str
    first_row: int = 0
    rows: Optional[int] = None
    offset: int = 0
    header: tuple = ()
    row_groups: tuple = ()


def _format_of(path: str, config: CurateConfig) -> str:
    return config.input_format if config.input_format != "auto" else detect_format(path)


def _is_compressed(path: str) -> bool:
    return CompressionTypes.detect_compression_type(path) != CompressionTypes.UNCOMPRESSED


def plan_chunks(path: str, config: CurateConfig, chunk_rows: Optional[int] = None) -> list[FileChunk]:
    """Split one input file into chunks of about `chunk_rows` rows, found by one pass over it that
    records where rows start (csv/tsv: the csv reader's own row boundaries, so quoted newlines
    stay inside their row). Compressed files and WebDataset tars are one chunk: they can only be
    read from their start."""
    from apache_beam.io.filesystems import FileSystems

    chunk_rows = chunk_rows or CHUNK_ROWS
    fmt = _format_of(path, config)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            metadata = pq.ParquetFile(handle).metadata
        chunks, groups, first, rows = [], [], 0, 0
        for index in range(metadata.num_row_groups):
            groups.append(index)
            rows += metadata.row_group(index).num_rows
            if rows >= chunk_rows or index == metadata.num_row_groups - 1:
                chunks.append(FileChunk(path, fmt, first, rows, row_groups=tuple(groups)))
                first, groups, rows = first + rows, [], 0
        return chunks or [FileChunk(path, fmt, 0, 0, row_groups=())]
    if fmt not in _SEEKABLE_FORMATS or _is_compressed(path):
        return [FileChunk(path, fmt)]
    positions: list = []
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        if fmt == "jsonl":
            for _ in iter_jsonl(handle, path, config, positions=positions, every=chunk_rows):
                pass
            header: tuple = ()
        else:
            text = _text_stream(handle)
            header = tuple(_csv_header(text, "," if fmt == "csv" else "\t"))
            for _ in _delimited_rows(text, "," if fmt == "csv" else "\t", list(header), path, config, 0, None,
                                     positions=positions, every=chunk_rows):
                pass
    if not positions:
        return [FileChunk(path, fmt, 0, 0, header=header)]
    chunks = []
    for (row, offset), following in zip(positions, positions[1:] + [None]):
        rows = None if following is None else following[0] - row
        chunks.append(FileChunk(path, fmt, row, rows, offset, header))
    return chunks


def read_chunk(chunk: FileChunk, config: CurateConfig) -> Iterator[dict]:
    """The records of one chunk."""
    from apache_beam.io.filesystems import FileSystems

    source_file = os.path.basename(chunk.path)
    if chunk.fmt == "parquet":
        if chunk.rows == 0:
            return
        with FileSystems.open(chunk.path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            yield from iter_parquet(handle, source_file, config, list(chunk.row_groups), chunk.first_row)
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
                yield from _delimited_rows(_text_stream(buffered(handle)), delimiter, list(chunk.header), source_file,
                                           config, chunk.first_row, chunk.rows)
        return
    with FileSystems.open(chunk.path, compression_type=CompressionTypes.AUTO) as handle:
        yield from iter_file_records(buffered(handle), source_file, chunk.fmt, config)


class _PlanChunks(beam.DoFn):
    def __init__(self, config: CurateConfig):
        self._config = config

    def process(self, readable: fileio.ReadableFile):
        yield from plan_chunks(readable.metadata.path, self._config)


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
    each row once, such as finding repeated rows)."""

    def __init__(self, config: CurateConfig, spread: bool = True):
        super().__init__()
        self._config = config
        self._spread = spread

    def expand(self, pbegin):
        patterns = [p for p in self._config.input.split(",") if p.strip()]
        chunks = (
            pbegin
            | "Patterns" >> beam.Create(patterns)
            | "Match" >> fileio.MatchAll()
            | "Open" >> fileio.ReadMatches()
            | "Plan" >> beam.ParDo(_PlanChunks(self._config))  # FileChunk
        )
        if self._spread:
            chunks = chunks | "Spread" >> beam.Reshuffle()
        return chunks | "Parse" >> beam.ParDo(_ReadChunk(self._config))  # record
