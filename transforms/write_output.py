"""Write stage: deterministic, atomic Parquet tables and WebDataset shards.

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

import io
import json
import math
import posixpath
import tarfile
import uuid
from typing import Iterable, Optional

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from schemas import SAMPLE_JSON_COLUMNS, SHARD_SCHEMA, Col, to_table
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


def write_atomically(path: str, payload: bytes) -> None:
    """Write to a temporary sibling, then rename over `path`."""
    directory = posixpath.dirname(path) if "://" not in path else path.rsplit("/", 1)[0]
    ensure_directory(directory)
    temporary = join_path(directory, f".tmp-{uuid.uuid4().hex}-{posixpath.basename(path)}")
    with FileSystems.create(temporary) as handle:
        handle.write(payload)
    if FileSystems.exists(path):
        FileSystems.delete([path])
    FileSystems.rename([temporary], [path])


def parquet_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
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


def _write_table_file(bucket_and_records, total: int, directory: str, prefix: str, schema: pa.Schema, rows_per_file: int) -> str:
    bucket, records = bucket_and_records
    rows = sorted(records, key=sort_key)
    count = _file_count(total, rows_per_file)
    path = join_path(directory, f"{prefix}-{bucket:05d}-of-{count:05d}.parquet")
    write_atomically(path, parquet_bytes(to_table(rows, schema)))
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
        total = beam.pvalue.AsSingleton(records | "Count" >> beam.combiners.Count.Globally())
        files = (
            records
            | "Bucket" >> beam.Map(lambda r, n: (bucket_of(r[Col.UID], _file_count(n, per_file)), r), n=total)
            | "Group" >> beam.GroupByKey()
            | "Write" >> beam.Map(_write_table_file, total, directory, prefix, schema, per_file)
        )
        empty = (
            records.pipeline
            | "One" >> beam.Create([None])
            | "WriteEmpty" >> beam.FlatMap(_write_empty_table, total, directory, prefix, schema)
        )
        return (files, empty) | "Paths" >> beam.Flatten()


# ---------------------------------------------------------------------------------------------
# WebDataset shards
# ---------------------------------------------------------------------------------------------


def sample_json(record: dict) -> dict:
    """What KEY.json holds: the shard columns (extra input columns flattened in, like img2dataset)."""
    meta = {name: record.get(name) for name in SAMPLE_JSON_COLUMNS}
    extra = record.get(Col.EXTRA)
    if extra:
        try:
            for key, value in json.loads(extra).items():
                meta.setdefault(key, value)
        except ValueError:
            pass
    meta[Col.KEY] = record[Col.UID]
    return meta


def _tar_member(archive: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0  # fixed metadata: identical inputs give identical bytes
    info.mode = 0o444
    info.uname = info.gname = "curate"
    archive.addfile(info, io.BytesIO(payload))


def tar_bytes(records: list[dict]) -> bytes:
    """A WebDataset tar: KEY.jpg, KEY.txt, KEY.json per sample, in the given order."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for record in records:
            key = record[Col.UID]
            _tar_member(archive, f"{key}.jpg", record[Col.IMAGE_BYTES])
            _tar_member(archive, f"{key}.txt", (record.get(Col.CAPTION) or "").encode("utf-8"))
            meta = json.dumps(sample_json(record), sort_keys=True, ensure_ascii=False, default=str)
            _tar_member(archive, f"{key}.json", meta.encode("utf-8"))
    return buffer.getvalue()


def shard_table(records: list[dict]) -> pa.Table:
    rows = [dict(record, **{Col.KEY: record[Col.UID]}) for record in records]
    return to_table(rows, SHARD_SCHEMA)


def write_shard(directory: str, name: str, records: list[dict], with_parquet: bool = True) -> str:
    write_atomically(join_path(directory, f"{name}.tar"), tar_bytes(records))
    if with_parquet:
        write_atomically(join_path(directory, f"{name}.parquet"), parquet_bytes(shard_table(records)))
    return name


def _write_raw_shard(bucket_and_records, directory: str, prefix: str) -> str:
    bucket, records = bucket_and_records
    return write_shard(directory, f"{prefix}{bucket:05d}", sorted(records, key=sort_key), with_parquet=False)


class WriteHashedShards(beam.PTransform):
    """Raw shards of the fetch phase: uid-hash buckets, each sorted by uid (tar only)."""

    def __init__(self, directory: str, shards: int, prefix: str = ""):
        super().__init__()
        self._directory = directory
        self._shards = shards
        self._prefix = prefix

    def expand(self, records):
        shards = self._shards
        return (
            records
            | "Bucket" >> beam.Map(lambda r: (bucket_of(r[Col.UID], shards), r))
            | "Group" >> beam.GroupByKey()
            | "Write" >> beam.Map(_write_raw_shard, self._directory, self._prefix)
        )


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


def _write_final_shard(index_and_items, directory: str) -> str:
    index, items = index_and_items
    records = [record for _, record in sorted(items, key=lambda item: item[0])]
    return write_shard(directory, shard_name(index), records, with_parquet=True)


class WriteFinalShards(beam.PTransform):
    """(shard_index, (position, record)) -> shards/NNNNN.tar + shards/NNNNN.parquet."""

    def __init__(self, directory: str):
        super().__init__()
        self._directory = directory

    def expand(self, positioned):
        return positioned | "Group" >> beam.GroupByKey() | "Write" >> beam.Map(_write_final_shard, self._directory)


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
