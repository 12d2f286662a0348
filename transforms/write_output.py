"""Write stage: deterministic, atomic Parquet tables and WebDataset shards.

Image bytes never go through a shuffle (so a worker's memory does not grow with the dataset, on
the in-memory DirectRunner as on Dataflow):
- the fetch phase appends each survivor's image to a raw tar of its own bundle
  (`WriteRawImages`) and records where it lies (raw file, offset, length) in the features table;
- the write phase (pipeline/write.py) hands each shard writer the slices of its samples' rows,
  and the writer reads its images back by offset (`RawImageReader`).

Determinism comes from the uid, never from arrival order (the TFDS Beam writer's idea):
- tables are split into files by uid range and sorted inside each file;
- final shards take samples in global uid order, `samples_per_shard` at a time: uids are hashes,
  so counts per uid range (tiny) give each range its first rank without a global sort.
Every file is written under a temporary name and renamed into place, through Beam's FileSystems,
so a crashed worker leaves no half-written shard on local disk or GCS.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import posixpath
import tarfile
import uuid
from typing import BinaryIO, Iterable, Iterator, Optional

import apache_beam as beam
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from apache_beam.metrics import Metrics

from schemas import SAMPLE_JSON_COLUMNS, Col, rows_to_table
from transforms.base import iter_tar_members

def join_path(*parts: str) -> str:
    return FileSystems.join(*parts) if "://" in parts[0] else posixpath.join(*parts)


def ensure_directory(directory: str) -> None:
    """mkdir -p that tolerates other workers creating the same folder at the same moment."""
    try:
        FileSystems.mkdirs(directory)
    except (IOError, OSError):
        if not FileSystems.exists(directory):
            raise


@contextlib.contextmanager
def open_atomically(path: str) -> Iterator[BinaryIO]:
    """A handle on a temporary sibling of `path`, renamed over `path` once the block succeeds."""
    directory = posixpath.dirname(path) if "://" not in path else path.rsplit("/", 1)[0]
    ensure_directory(directory)
    temporary = join_path(directory, f".tmp-{uuid.uuid4().hex}-{posixpath.basename(path)}")
    try:
        with FileSystems.create(temporary) as handle:
            yield handle
    except BaseException:
        with contextlib.suppress(Exception):
            FileSystems.delete([temporary])
        raise
    if FileSystems.exists(path):
        FileSystems.delete([path])
    FileSystems.rename([temporary], [path])


def write_atomically(path: str, payload: bytes) -> None:
    """Write to a temporary sibling, then rename over `path`."""
    with open_atomically(path) as handle:
        handle.write(payload)


PARQUET_CODEC = "zstd"  # every Parquet file the pipeline writes, whichever writer writes it


def parquet_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression=PARQUET_CODEC)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------


_ROW_GROUP_ROWS = 8192  # rows written at a time


def write_table_file(path: str, table: pa.Table) -> None:
    """An Arrow table to one Parquet file (renamed into place), a row group of _ROW_GROUP_ROWS
    rows at a time, as every table file of the pipeline is written."""
    with open_atomically(path) as handle, parquet_writer(handle, table.schema) as writer:
        for start in range(0, max(table.num_rows, 1), _ROW_GROUP_ROWS):
            writer.write_table(table.slice(start, _ROW_GROUP_ROWS))


def _vector_columns(schema: pa.Schema) -> list[str]:
    return [f.name for f in schema if pa.types.is_list(f.type) and pa.types.is_float16(f.type.value_type)]


def parquet_writer(handle, schema: pa.Schema) -> pq.ParquetWriter:
    """The writer of every table file the pipeline streams: zstd; float16 vectors (the CLIP
    embeddings) without dictionary encoding and with BYTE_STREAM_SPLIT, which the decide phase
    reads back several times faster than dictionary-encoded float16 (and which compresses better)."""
    vectors = _vector_columns(schema)
    return pq.ParquetWriter(
        handle, schema, compression=PARQUET_CODEC,
        use_dictionary=[name for name in schema.names if name not in vectors] if vectors else True,
        column_encoding={f"{name}.list.element": "BYTE_STREAM_SPLIT" for name in vectors} or None)


class _TableFilesPerBundle(beam.DoFn):
    """Records -> DIR/PREFIX-<bundle>.parquet, one file per bundle, streamed a row group at a time
    and renamed into place when the bundle ends (before it commits: every committed row is in a
    complete file; a failed attempt's file is removed, never renamed). Emits each file's path."""

    def __init__(self, directory: str, prefix: str, schema: pa.Schema, row_group_bytes: int, batch_rows: int):
        self._directory = directory
        self._prefix = prefix
        self._schema = schema
        self._row_group_bytes = row_group_bytes
        self._batch_rows = batch_rows

    def start_bundle(self):
        self._rows: list[tuple] = []
        self._tables: list[pa.Table] = []
        self._buffered = 0
        self._open = None  # (context manager, writer, path)

    def process(self, record: dict):
        self._rows.append(tuple(record.get(name) for name in self._schema.names))
        if len(self._rows) >= self._batch_rows:
            self._batch()
            if self._buffered >= self._row_group_bytes:
                self._write()

    def _batch(self) -> None:
        if self._rows:
            table = rows_to_table(self._rows, self._schema)
            self._rows = []
            self._tables.append(table)
            self._buffered += table.nbytes

    def _write(self) -> None:
        self._batch()
        if not self._tables:
            return
        if self._open is None:
            path = join_path(self._directory, f"{self._prefix}-{uuid.uuid4().hex[:16]}.parquet")
            context = open_atomically(path)
            self._open = (context, parquet_writer(context.__enter__(), self._schema), path)
        self._open[1].write_table(pa.concat_tables(self._tables))
        self._tables, self._buffered = [], 0

    def finish_bundle(self):
        self._write()
        if self._open is not None:
            context, writer, path = self._open
            self._open = None
            writer.close()
            context.__exit__(None, None, None)
            yield beam.transforms.window.GlobalWindows.windowed_value(path)

    def teardown(self):
        if getattr(self, "_open", None) is not None:
            context, writer, _ = self._open
            self._open = None
            with contextlib.suppress(Exception):
                writer.close()
                context.__exit__(RuntimeError, RuntimeError("bundle failed"), None)


def _write_empty_table_file(_, written: int, path: str, schema: pa.Schema):
    if written == 0:  # readers still find a file with the schema
        write_atomically(path, parquet_bytes(schema.empty_table()))
    return []


class WriteTablePerBundle(beam.PTransform):
    """Records -> DIR/PREFIX-<bundle>.parquet, a file per bundle, streamed row group by row group
    (one empty file for an empty input). For a table its phase writes and the next phase reads
    back whole (the features table): no shuffle, so memory does not grow with the row count.
    Files and row order follow bundles, so they are not byte-identical from run to run; what is
    read from them is (the decide and write phases order by uid)."""

    ROW_GROUP_BYTES = 8 * 2**20  # Arrow data a bundle's writer holds before it writes a row group
    BATCH_ROWS = 1000  # records turned into Arrow at a time

    def __init__(self, directory: str, prefix: str, schema: pa.Schema):
        super().__init__()
        self._directory = directory
        self._prefix = prefix
        self._schema = schema

    def expand(self, records):
        paths = records | "Write" >> beam.ParDo(_TableFilesPerBundle(
            self._directory, self._prefix, self._schema, self.ROW_GROUP_BYTES, self.BATCH_ROWS))
        written = beam.pvalue.AsSingleton(paths | "Files" >> beam.combiners.Count.Globally())
        empty = join_path(self._directory, f"{self._prefix}-empty.parquet")
        _ = (records.pipeline | "One" >> beam.Create([None])
             | "WriteEmpty" >> beam.FlatMap(_write_empty_table_file, written=written, path=empty, schema=self._schema))
        return paths


# ---------------------------------------------------------------------------------------------
# WebDataset shards
# ---------------------------------------------------------------------------------------------


def sample_json(record: dict) -> dict:
    """What KEY.json holds: the shard columns, the input row's other columns under `extra` as a
    JSON object of their own (so they can never shadow ours: an input column named `sha256` or
    `width` stays in `extra`), and `key`."""
    meta = {name: record.get(name) for name in SAMPLE_JSON_COLUMNS}
    meta[Col.EXTRA] = _extra_object(record.get(Col.EXTRA))
    meta[Col.KEY] = record[Col.UID]
    return meta


def _extra_object(extra: Optional[str]) -> dict:
    """The ledger's `extra` JSON text as an object ({} when the input had no other columns)."""
    if not extra:
        return {}
    try:
        loaded = json.loads(extra)
    except ValueError:
        return {}
    return loaded if isinstance(loaded, dict) else {}


def sample_text(record: dict) -> str:
    """What KEY.txt holds: the clean caption a model trains on (the raw one stays in KEY.json and
    the ledger); the raw caption where no clean one was made."""
    clean = record.get(Col.CAPTION_CLEAN)
    return clean if clean is not None else (record.get(Col.CAPTION) or "")


def _tarinfo_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0  # fixed metadata: identical inputs give identical bytes
    info.mode = 0o444
    info.uname = info.gname = "curate"
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")


# The header every member gets, name and size left out (and the checksum field blank, as spaces).
_HEADER = bytearray(_tarinfo_header("", 0))
_HEADER[0:100] = bytes(100)
_HEADER[124:136] = bytes(12)
_HEADER[148:156] = b" " * 8
_HEADER_SUM = sum(_HEADER)
_SIZE_LIMIT = 8**11  # 11 octal digits


def _ustar_header(name: str, size: int) -> bytes:
    """tarfile's USTAR header for a member of ours, byte for byte, built from a template: tarfile
    takes ~30 us a header, which a shard writer pays three times a sample. Names tarfile would
    split or encode differently (over 100 bytes, not ASCII) and huge sizes go to tarfile."""
    encoded = name.encode("ascii", "ignore")
    if len(encoded) != len(name) or len(encoded) > 100 or size >= _SIZE_LIMIT:
        return _tarinfo_header(name, size)
    header = bytearray(_HEADER)
    header[0:len(encoded)] = encoded
    header[124:136] = size_field = b"%011o\x00" % size
    header[148:156] = b"%06o\x00 " % (_HEADER_SUM + sum(encoded) + sum(size_field))
    return bytes(header)


class TarWriter:
    """Appends USTAR members to a write-only stream and says where each member's data starts.

    Written by hand because tarfile needs `tell()` on its file (GCS upload streams have none) and
    does not report offsets; the records are the same ones tarfile writes (header block from
    `TarInfo.tobuf`, data padded to 512 bytes, two zero blocks, padding to a 10 KiB record).
    """

    def __init__(self, stream: BinaryIO):
        self._stream = stream
        self.position = 0
        self.members = 0

    def add(self, name: str, payload: bytes) -> int:
        header = _ustar_header(name, len(payload))
        data_offset = self.position + len(header)
        self._write(header)
        self._write(payload)
        self._write(bytes(-len(payload) % tarfile.BLOCKSIZE))
        self.members += 1
        return data_offset

    def close(self) -> None:
        self._write(bytes(2 * tarfile.BLOCKSIZE))
        self._write(bytes(-self.position % tarfile.RECORDSIZE))

    def _write(self, chunk: bytes) -> None:
        self._stream.write(chunk)
        self.position += len(chunk)


def add_sample(writer: TarWriter, record: dict, image: bytes) -> None:
    """KEY.jpg, KEY.txt, KEY.json of one sample."""
    key = record[Col.UID]
    writer.add(f"{key}.jpg", image)
    writer.add(f"{key}.txt", sample_text(record).encode("utf-8"))
    # orjson: UTF-8, keys sorted (the same bytes for the same sample), ~15x json.dumps
    writer.add(f"{key}.json", orjson.dumps(sample_json(record), option=orjson.OPT_SORT_KEYS, default=str))


def tar_bytes(records: list[dict]) -> bytes:
    """A WebDataset tar: KEY.jpg, KEY.txt, KEY.json per sample, in the given order."""
    buffer = io.BytesIO()
    writer = TarWriter(buffer)
    for record in records:
        add_sample(writer, record, record[Col.IMAGE_BYTES])
    writer.close()
    return buffer.getvalue()


class _RawImageFiles(beam.DoFn):
    """Appends each record's image to a raw tar of this bundle's own (`KEY.jpg` members) and
    replaces the bytes by where they lie: RAW_FILE (name inside the raw folder), RAW_OFFSET,
    RAW_LENGTH.

    A file is renamed into place when it is full or when the bundle finishes, before the bundle
    commits, so every committed record points at a complete file. A retried bundle writes files
    under new names; the failed attempt's files are never referenced.
    """

    def __init__(self, directory: str, prefix: str, images_per_file: int, keep_bytes: bool = False):
        self._directory = directory
        self._prefix = prefix
        self._images_per_file = images_per_file
        self._keep_bytes = keep_bytes
        self._written = Metrics.counter("write", "raw_images")

    def start_bundle(self):
        self._bundle = uuid.uuid4().hex[:16]
        self._files = 0
        self._open = None  # (context manager, writer, name)

    def _roll(self):
        self._close()
        name = f"{self._prefix}{self._bundle}-{self._files:05d}.tar"
        self._files += 1
        context = open_atomically(join_path(self._directory, name))
        self._open = (context, TarWriter(context.__enter__()), name)

    def _close(self):
        if self._open is not None:
            context, writer, _ = self._open
            self._open = None
            writer.close()
            context.__exit__(None, None, None)

    def process(self, record: dict):
        image = record[Col.IMAGE_BYTES] if self._keep_bytes else record.pop(Col.IMAGE_BYTES)
        if self._open is None or self._open[1].members >= self._images_per_file:
            self._roll()
        _, writer, name = self._open
        record[Col.RAW_OFFSET] = writer.add(f"{record[Col.UID]}.jpg", image)
        record[Col.RAW_FILE] = name
        record[Col.RAW_LENGTH] = len(image)
        self._written.inc()
        yield record

    def finish_bundle(self):
        self._close()

    def teardown(self):
        if self._open is not None:  # a failed bundle: its temporary file is removed, never renamed
            context, _, _ = self._open
            self._open = None
            with contextlib.suppress(Exception):
                context.__exit__(RuntimeError, RuntimeError("bundle failed"), None)


class WriteRawImages(beam.PTransform):
    """Records with IMAGE_BYTES -> the same records without them, with RAW_FILE/OFFSET/LENGTH.
    `keep_bytes`: the records keep their IMAGE_BYTES too, for a consumer in the same fused stage
    that releases them (a shuffle must never carry them)."""

    def __init__(self, directory: str, prefix: str = "", images_per_file: int = 1000, keep_bytes: bool = False):
        super().__init__()
        self._directory = directory
        self._prefix = prefix
        self._images_per_file = images_per_file
        self._keep_bytes = keep_bytes

    def expand(self, records):
        return records | beam.ParDo(
            _RawImageFiles(self._directory, self._prefix, self._images_per_file, self._keep_bytes))


class RawImageReader:
    """Reads images back from raw files by (RAW_FILE, RAW_OFFSET, RAW_LENGTH), keeping a few
    files open (a shard's or a batch's images come from a handful of files)."""

    def __init__(self, directory: str, open_files: int = 8):
        self._directory = directory
        self._limit = open_files
        self._handles: collections.OrderedDict = collections.OrderedDict()

    def read(self, record: dict) -> bytes:
        name = record.get(Col.RAW_FILE)
        if not name:
            raise KeyError(f"no raw image recorded for {record.get(Col.UID)}")
        handle = self._handles.pop(name, None)
        if handle is None:
            handle = FileSystems.open(join_path(self._directory, name), compression_type="uncompressed")
            while len(self._handles) >= self._limit:
                self._handles.popitem(last=False)[1].close()
        self._handles[name] = handle
        handle.seek(record[Col.RAW_OFFSET])
        data = handle.read(record[Col.RAW_LENGTH])
        if len(data) != record[Col.RAW_LENGTH]:
            raise IOError(f"raw file {name} is shorter than recorded for {record.get(Col.UID)}")
        return data

    def image_of(self, record: dict) -> bytes:
        """The record's inline IMAGE_BYTES when it still has them, else its image from raw/."""
        image = record.get(Col.IMAGE_BYTES)
        return image if image is not None else self.read(record)

    def close(self) -> None:
        while self._handles:
            self._handles.popitem()[1].close()


class ReadsRawImages(beam.DoFn):
    """Base of the DoFns that read images back from raw/: one RawImageReader per DoFn instance,
    opened at setup and closed at teardown."""

    def __init__(self, raw_directory: str):
        self._raw_directory = raw_directory

    def setup(self):
        self._reader = RawImageReader(self._raw_directory)

    def teardown(self):
        reader = getattr(self, "_reader", None)
        if reader is not None:
            reader.close()


def shard_name(index: int) -> str:
    return f"{index:05d}"


def read_tar_samples(handle, image_ext: str = "jpg") -> Iterable[tuple[str, bytes, Optional[dict]]]:
    """Stream (key, image bytes, json) from one of our own tars."""
    for key, members in iter_tar_members(handle):
        yield key, members.get(image_ext), _json_or_none(members.get("json"))


def _json_or_none(payload: Optional[bytes]) -> Optional[dict]:
    if not payload:
        return None
    try:
        return json.loads(payload.decode("utf-8"))
    except ValueError:
        return None
