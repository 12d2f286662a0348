"""Columnar shuffles through files: how the decide and write phases stay within a few GB at 10M rows.

The in-memory runners hold a GroupByKey's whole input until every group is complete, and as Python
objects a row costs 10-30 times its payload: a shuffle of 10M rows with their embeddings would need
tens of GB. So the large shuffles here carry file paths only. `SpillBatches` takes Arrow tables
that name each row's destination in a PARTITION column; each bundle appends its rows, partition by
partition, to Arrow IPC files of its own in a work folder, and emits (partition, path) once its
files are closed. A GroupByKey gathers the paths of a partition, and its consumer reads that
partition's rows back (`read_partition`): one partition in memory at a time. On Dataflow the same
graph spreads the work: partitions go to different workers and the files live in the work folder
on GCS. (The TFDS Beam writer does the same with temporary files per bundle, collected per key.)

Element types:
    SpillBatches input:   pa.Table with a PARTITION (int32) column, the same schema in every table
    SpillBatches output:  (partition: int, paths: tuple[str, ...]), paths sorted

Files of a bundle that failed are never emitted, so never read; the phase removes its work folder
when it ends. Rows come back in file order, which depends on bundling: consumers sort what they
read by a key of their own (uid) before anything depends on the order.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from typing import Iterable, Optional, Sequence

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.io.filesystems import CompressionTypes, FileSystems
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindows

from schemas import Col
from transforms.write_output import ensure_directory, join_path

PARTITION = Col.PARTITION


def partitioned(table: pa.Table, partitions: np.ndarray) -> pa.Table:
    """`table` with its rows' partitions appended as the PARTITION column."""
    return table.append_column(PARTITION, pa.array(np.asarray(partitions, dtype=np.int32), type=pa.int32()))


class _WritePartitions(beam.DoFn):
    """Tables with a PARTITION column -> rows appended to one IPC file per (bundle, partition);
    (partition, path) for each file once the bundle's files are closed."""

    def __init__(self, directory: str, name: str, flush_bytes: int, buffered_bytes: int):
        self._directory = directory
        self._name = name
        self._flush_bytes = flush_bytes
        self._buffered_limit = buffered_bytes
        self._rows = Metrics.counter("spill", f"{name}_rows")
        self._files = Metrics.counter("spill", f"{name}_files")

    def setup(self):
        ensure_directory(self._directory)

    def start_bundle(self):
        self._bundle = uuid.uuid4().hex[:12]
        self._pending: dict[int, list[pa.Table]] = {}
        self._pending_bytes: dict[int, int] = {}
        self._buffered = 0
        self._writers: dict[int, tuple] = {}  # partition -> (path, handle, writer)

    def process(self, table: pa.Table):
        if table.num_rows == 0:
            return
        partitions = table.column(PARTITION).to_numpy()
        rows = table.drop_columns([PARTITION])
        order = np.argsort(partitions, kind="stable")
        ordered = partitions[order]
        starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
        stops = np.r_[starts[1:], len(ordered)]
        rows = rows.take(pa.array(order))
        for start, stop in zip(starts.tolist(), stops.tolist()):
            partition = int(ordered[start])
            piece = rows.slice(start, stop - start)
            size = piece.nbytes
            self._pending.setdefault(partition, []).append(piece)
            self._pending_bytes[partition] = self._pending_bytes.get(partition, 0) + size
            self._buffered += size
            if self._pending_bytes[partition] >= self._flush_bytes:
                self._flush(partition)
        self._rows.inc(table.num_rows)
        if self._buffered > self._buffered_limit:  # many partitions, each below the flush size
            for partition in sorted(self._pending_bytes, key=self._pending_bytes.get, reverse=True):
                self._flush(partition)
                if self._buffered <= self._buffered_limit // 2:
                    break

    def _flush(self, partition: int) -> None:
        pieces = self._pending.pop(partition, None)
        self._buffered -= self._pending_bytes.pop(partition, 0)
        if not pieces:
            return
        table = pa.concat_tables(pieces)
        opened = self._writers.get(partition)
        if opened is None:
            path = join_path(self._directory, f"{self._name}-{partition:06d}-{self._bundle}.arrow")
            handle = FileSystems.create(path, mime_type="application/octet-stream",
                                        compression_type=CompressionTypes.UNCOMPRESSED)
            opened = (path, handle, pa.ipc.new_file(handle, table.schema))
            self._writers[partition] = opened
        opened[2].write_table(table)

    def finish_bundle(self):
        for partition in list(self._pending):
            self._flush(partition)
        for partition, (path, handle, writer) in sorted(self._writers.items()):
            writer.close()
            handle.close()
            self._files.inc()
            yield GlobalWindows.windowed_value((partition, path))
        self._writers = {}

    def teardown(self):
        for _, handle, writer in getattr(self, "_writers", {}).values():  # a failed bundle
            try:
                writer.close()
                handle.close()
            except Exception:  # noqa: BLE001 - its files are never read
                pass


class SpillBatches(beam.PTransform):
    """pa.Table batches with a PARTITION column -> (partition, sorted paths of its files)."""

    def __init__(self, directory: str, name: str, flush_bytes: int = 4 << 20, buffered_bytes: int = 256 << 20):
        super().__init__(f"Spill{name.title().replace('_', '')}")
        self._directory = directory
        self._name = name
        self._flush_bytes = flush_bytes
        self._buffered_bytes = buffered_bytes

    def expand(self, tables):
        return (
            tables
            | "Write" >> beam.ParDo(_WritePartitions(self._directory, self._name, self._flush_bytes, self._buffered_bytes))
            # (partition, path)
            | "GroupPaths" >> beam.GroupByKey()
            # (partition, [path, ...])
            | "SortPaths" >> beam.MapTuple(lambda partition, paths: (partition, tuple(sorted(paths))))
        )


def _read_file(path: str) -> pa.Table:
    if "://" not in path:  # local: mapped, not copied; pages are read as columns are touched
        return pa.ipc.open_file(pa.memory_map(path)).read_all()
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        return pa.ipc.open_file(pa.py_buffer(handle.read())).read_all()


def read_partition(paths: Iterable[str], schema: Optional[pa.Schema] = None,
                   columns: Optional[Sequence[str]] = None) -> Optional[pa.Table]:
    """Every row of one partition (the files in path order), or None when there are no files and
    no schema to make an empty table of."""
    tables = []
    for path in sorted(paths):
        table = _read_file(path)
        tables.append(table.select(list(columns)) if columns is not None else table)
    if not tables:
        if schema is None:
            return None
        empty = schema.empty_table()
        return empty.select(list(columns)) if columns is not None else empty
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


def remove_work_directory(directory: str) -> None:
    """Delete a phase's work folder (spilled partitions) once the phase is over."""
    try:
        if FileSystems.exists(directory):
            FileSystems.delete([directory])
        parent = posixpath.dirname(directory.rstrip("/"))
        if "://" not in directory and os.path.isdir(parent) and not os.listdir(parent):
            os.rmdir(parent)  # the work folder of all phases, once empty
    except Exception:  # noqa: BLE001 - temporary files; never fail a finished phase over them
        pass


def write_spill_file(directory: str, name: str, table: pa.Table) -> str:
    """One table to a file of its own in a work folder (unique name: a retried bundle never
    overwrites what another attempt emitted); returns its path."""
    ensure_directory(directory)
    path = join_path(directory, f"{name}-{uuid.uuid4().hex[:12]}.arrow")
    with FileSystems.create(path, mime_type="application/octet-stream",
                            compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        with pa.ipc.new_file(handle, table.schema) as writer:
            writer.write_table(table)
    return path


def read_rows(path: str, start: int, stop: int) -> pa.Table:
    """Rows [start, stop) of one spilled file."""
    return _read_file(path).slice(start, stop - start)
