"""Write stage: deterministic, atomic Parquet tables and WebDataset shards.

Image bytes never go through a shuffle (so a worker's memory does not grow with the dataset, on
the in-memory DirectRunner as on Dataflow):
- the fetch phase appends each survivor's image to a raw tar of its own bundle
  (`WriteRawImages`) and records where it lies (raw file, offset, length) in the features table;
- the write phase shuffles only small rows to their final shard, and each shard writer reads its
  images back by offset (`RawImageReader`).

Determinism comes from the uid, never from arrival order (the TFDS Beam writer's idea):
- tables are split into files by a hash bucket of the uid and sorted inside each file;
- final shards take samples in global uid order, `samples_per_shard` at a time. The global rank
  is computed without a global sort: uids are hashes, so their first hex digits spread them evenly
  over buckets; per-bucket counts (tiny) give each bucket its offset, and each bucket sorts only
  its own uids.
Every file is written under a temporary name and renamed into place, through Beam's FileSystems,
so a crashed worker leaves no half-written shard on local disk or GCS.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import math
import pickle
import posixpath
import tarfile
import uuid
from typing import BinaryIO, Iterable, Iterator, Optional, Sequence

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from apache_beam.metrics import Metrics

from schemas import SAMPLE_JSON_COLUMNS, SHARD_SCHEMA, Col, rows_to_table, to_table
from transforms.base import iter_tar_members

RANK_BUCKET_HEX_DIGITS = 3  # 4096 buckets


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


def bucket_of(uid: str, buckets: int) -> int:
    return int(uid[:8], 16) % buckets


def sort_key(record: dict):
    return (record[Col.UID], record.get(Col.SOURCE_FILE) or "", record.get(Col.SOURCE_ROW) or 0)


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------


def _file_count(total: int, rows_per_file: int) -> int:
    return max(1, math.ceil(total / rows_per_file))


def table_row(record: dict, names: Sequence[str]) -> tuple:
    """(sort key, the values in schema order, pickled): what a table write shuffles. Bytes, not
    the record: the in-memory runner holds every row of the shuffle at once, decoded, and as Python
    objects a row's ~30 values (a decision's ~10 negative dicts) cost several times their bytes."""
    return sort_key(record), pickle.dumps(tuple(record.get(name) for name in names), protocol=pickle.HIGHEST_PROTOCOL)


_ROW_GROUP_ROWS = 8192  # rows turned back into Python objects, and written, at a time


def _write_table_file(bucket_and_rows, total: int, directory: str, prefix: str, schema: pa.Schema, rows_per_file: int) -> str:
    """One file of the table, streamed a row group at a time: never the whole file as Python
    objects, as one Arrow table or as one buffer of Parquet bytes."""
    bucket, rows = bucket_and_rows
    rows = sorted(rows, key=lambda row: row[0])
    count = _file_count(total, rows_per_file)
    path = join_path(directory, f"{prefix}-{bucket:05d}-of-{count:05d}.parquet")
    with open_atomically(path) as handle, pq.ParquetWriter(handle, schema, compression=PARQUET_CODEC) as writer:
        for start in range(0, len(rows), _ROW_GROUP_ROWS):
            group = [pickle.loads(values) for _, values in rows[start:start + _ROW_GROUP_ROWS]]
            writer.write_table(rows_to_table(group, schema))
    return path


def _write_empty_table(_, total: int, directory: str, prefix: str, schema: pa.Schema) -> Iterable[str]:
    if total == 0:  # readers still find a file with the schema
        path = join_path(directory, f"{prefix}-00000-of-00001.parquet")
        write_atomically(path, parquet_bytes(schema.empty_table()))
        yield path


class WriteTable(beam.PTransform):
    """Records -> DIR/PREFIX-NNNNN-of-MMMMM.parquet, ~rows_per_file rows each, split and sorted by uid."""

    def __init__(self, directory: str, prefix: str, schema: pa.Schema, rows_per_file: int):
        super().__init__()
        self._directory = directory
        self._prefix = prefix
        self._schema = schema
        self._rows_per_file = rows_per_file

    def expand(self, records):
        directory, prefix, schema, per_file = self._directory, self._prefix, self._schema, self._rows_per_file
        names = list(schema.names)
        total = beam.pvalue.AsSingleton(records | "Count" >> beam.combiners.Count.Globally())
        files = (
            records
            | "Bucket" >> beam.Map(lambda r, n: (bucket_of(r[Col.UID], _file_count(n, per_file)), table_row(r, names)),
                                   n=total)
            | "Group" >> beam.GroupByKey()
            | "Write" >> beam.Map(_write_table_file, total, directory, prefix, schema, per_file)
        )
        empty = (
            records.pipeline
            | "One" >> beam.Create([None])
            | "WriteEmpty" >> beam.FlatMap(_write_empty_table, total, directory, prefix, schema)
        )
        return (files, empty) | "Paths" >> beam.Flatten()


class WriteTablePerBundle(beam.PTransform):
    """Records -> DIR/PREFIX-SSSSS-of-NNNNN.parquet, written bundle by bundle by Beam's own
    WriteToParquet (each bundle streams its rows into a temporary file, row group by row group;
    a final step renames the files into place, and writes one empty file for an empty input).

    For a table its phase writes and the next phase reads back whole (the features table): no
    shuffle, so memory does not grow with the row count. `WriteTable`'s uid buckets and sort
    would have the runner hold every row of the table at once (the in-memory runners keep a whole
    GroupByKey in memory). Files and row order follow bundles, so they are not byte-identical from
    run to run; what is read from them is (the decide and write phases order by uid).
    """

    ROW_GROUP_BYTES = 8 * 2**20  # Arrow data a bundle's writer holds before it writes a row group

    def __init__(self, directory: str, prefix: str, schema: pa.Schema):
        super().__init__()
        self._directory = directory
        self._prefix = prefix
        self._schema = schema

    def expand(self, records):
        names = list(self._schema.names)
        return (
            records
            | "Columns" >> beam.Map(lambda record: {name: record.get(name) for name in names})
            | "Write" >> beam.io.WriteToParquet(
                join_path(self._directory, self._prefix), self._schema, codec=PARQUET_CODEC, file_name_suffix=".parquet",
                row_group_buffer_size=self.ROW_GROUP_BYTES, record_batch_size=1000)
        )


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
        info = tarfile.TarInfo(name)
        info.size = len(payload)
        info.mtime = 0  # fixed metadata: identical inputs give identical bytes
        info.mode = 0o444
        info.uname = info.gname = "curate"
        header = info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
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
    meta = json.dumps(sample_json(record), sort_keys=True, ensure_ascii=False, default=str)
    writer.add(f"{key}.json", meta.encode("utf-8"))


def tar_bytes(records: list[dict]) -> bytes:
    """A WebDataset tar: KEY.jpg, KEY.txt, KEY.json per sample, in the given order."""
    buffer = io.BytesIO()
    writer = TarWriter(buffer)
    for record in records:
        add_sample(writer, record, record[Col.IMAGE_BYTES])
    writer.close()
    return buffer.getvalue()


def shard_table(records: list[dict]) -> pa.Table:
    rows = [dict(record, **{Col.KEY: record[Col.UID]}) for record in records]
    return to_table(rows, SHARD_SCHEMA)


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


def _rank_bucket(uid: str) -> str:
    return uid[:RANK_BUCKET_HEX_DIGITS]


def _offsets(counts: list[tuple[str, int]]) -> dict[str, int]:
    offsets, running = {}, 0
    for bucket, count in sorted(counts):
        offsets[bucket] = running
        running += count
    return offsets


def _ranks(bucket_and_uids, offsets: dict[str, int], per_shard: int):
    bucket, uids = bucket_and_uids
    start = offsets[bucket]
    for index, uid in enumerate(sorted(uids)):
        rank = start + index
        yield uid, (rank // per_shard, rank % per_shard)


class AssignShardPositions(beam.PTransform):
    """uids -> (uid, (shard_index, position_in_shard)) in global uid order, without a global sort."""

    def __init__(self, samples_per_shard: int):
        super().__init__()
        self._per_shard = samples_per_shard

    def expand(self, uids):
        keyed = uids | "ByBucket" >> beam.Map(lambda uid: (_rank_bucket(uid), uid))
        counts = keyed | "CountPerBucket" >> beam.combiners.Count.PerKey()
        offsets = beam.pvalue.AsSingleton(counts | "Offsets" >> beam.combiners.ToList() | beam.Map(_offsets))
        return (
            keyed
            | "Group" >> beam.GroupByKey()
            | "Rank" >> beam.FlatMap(_ranks, offsets=offsets, per_shard=self._per_shard)
        )


def shard_name(index: int) -> str:
    return f"{index:05d}"


class _WriteFinalShard(ReadsRawImages):
    def __init__(self, directory: str, raw_directory: str):
        super().__init__(raw_directory)
        self._directory = directory

    def process(self, index_and_items):
        index, items = index_and_items
        records = [record for _, record in sorted(items, key=lambda item: item[0])]
        name = shard_name(index)
        with open_atomically(join_path(self._directory, f"{name}.tar")) as handle:
            writer = TarWriter(handle)
            for record in records:
                add_sample(writer, record, self._reader.image_of(record))
            writer.close()
        write_atomically(join_path(self._directory, f"{name}.parquet"), parquet_bytes(shard_table(records)))
        yield name


class WriteFinalShards(beam.PTransform):
    """(shard_index, (position, record)) -> shards/NNNNN.tar + shards/NNNNN.parquet.

    Records carry either IMAGE_BYTES or a raw location (read from `raw_directory`, one shard at a
    time: a worker holds at most one shard's images).
    """

    def __init__(self, directory: str, raw_directory: str = ""):
        super().__init__()
        self._directory = directory
        self._raw_directory = raw_directory

    def expand(self, positioned):
        return (
            positioned
            | "Group" >> beam.GroupByKey()
            | "Write" >> beam.ParDo(_WriteFinalShard(self._directory, self._raw_directory))
        )


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
