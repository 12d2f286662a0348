"""Columnar shuffles through files (transforms/spill.py) in a real Beam pipeline, and the uid ranges
and hex columns the columnar phases rely on."""

from __future__ import annotations

import hashlib
import pickle

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pytest
from apache_beam.testing.util import assert_that

from tests.conftest import in_process_pipeline
from transforms import batch as cols
from transforms.spill import SpillBatches, partitioned, read_partition, read_rows, write_spill_file


def _uid(i: int) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()[:32]


def _table(start: int, count: int) -> pa.Table:
    uids = [_uid(i) for i in range(start, start + count)]
    rows = np.arange(start, start + count)
    vectors = np.stack([rows % 512, rows % 7, np.full(count, 3), rows % 2], axis=1).astype(np.float16)
    table = pa.table({"uid": uids, "row": list(range(start, start + count)),
                      "vector": cols.vectors_array(vectors, np.arange(count) % 5 != 0)})
    return partitioned(table, cols.uid_ranges(table["uid"], 7))


def test_every_row_comes_back_once_in_its_partition(tmp_path):
    results = tmp_path / "results.pkl"

    def collect(items):
        found = {}
        for partition, paths in items:
            table = read_partition(paths)
            found[partition] = (table["row"].to_pylist(), table["uid"].to_pylist(), cols.vectors_of(table["vector"]))
        results.write_bytes(pickle.dumps(found))

    with in_process_pipeline() as p:
        # many small tables, a flush size far below a partition: several writes per file
        tables = p | beam.Create([(s, 97) for s in range(0, 2000, 97)]) | beam.MapTuple(_table)
        spilled = tables | SpillBatches(str(tmp_path / "work"), "rows", flush_bytes=2048, buffered_bytes=8192)
        assert_that(spilled, collect)
    found = pickle.loads(results.read_bytes())
    rows = sorted(r for partition in found.values() for r in partition[0])
    assert rows == list(range(2037))  # 21 tables of 97 rows
    for partition, (row_ids, uids, (vectors, valid)) in found.items():
        assert (cols.uid_ranges(pa.array(uids), 7) == partition).all()  # each row in its own partition
        for row, vector, has in zip(row_ids, vectors, valid):
            assert has == (row % 97 % 5 != 0)
            if has:
                assert vector.tolist() == [row % 512, row % 7, 3, row % 2]


def test_uid_ranges_follow_uid_order_and_spread_evenly():
    uids = sorted(_uid(i) for i in range(20_000))
    ranges = cols.uid_ranges(pa.array(uids), 10)
    assert (np.diff(ranges) >= 0).all()  # range order is uid order
    counts = np.bincount(ranges, minlength=10)
    assert counts.min() > 1700 and counts.max() < 2300
    assert cols.uid_ranges(pa.array(["zz", None, "0" * 32]), 4).tolist() == [0, 0, 0]  # not hex: range 0


@pytest.mark.parametrize("digits", [8, 16])
def test_hex_prefixes_parse_like_int(digits):
    values = [_uid(i) for i in range(100)] + ["ABCDEF0123456789", "12", None, "xyz0123456789abc"]
    parsed, ok = cols.hex_prefix_uint64(pa.array(values), digits)
    for value, number, good in zip(values, parsed.tolist(), ok.tolist()):
        try:
            expected = int(value[:digits], 16) if value and len(value) >= digits else None
        except ValueError:
            expected = None
        assert good == (expected is not None)
        assert number == (expected or 0)


def test_a_spilled_file_is_read_back_by_slices(tmp_path):
    table = pa.table({"a": list(range(100))})
    path = write_spill_file(str(tmp_path), "piece", table)
    assert read_rows(path, 10, 25)["a"].to_pylist() == list(range(10, 25))
    assert read_partition([path]).equals(table)
    assert read_partition([], schema=table.schema).num_rows == 0
