"""Columns of a batch (a pyarrow Table) as numpy arrays, and back: what the columnar stages of the
decide and write phases share. Nothing here loops over rows in Python.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_HEX = np.full(256, 255, dtype=np.uint8)
_HEX[np.frombuffer(b"0123456789", dtype=np.uint8)] = np.arange(10, dtype=np.uint8)
_HEX[np.frombuffer(b"abcdef", dtype=np.uint8)] = np.arange(10, 16, dtype=np.uint8)
_HEX[np.frombuffer(b"ABCDEF", dtype=np.uint8)] = np.arange(10, 16, dtype=np.uint8)


def column(table: pa.Table, name: str) -> pa.Array:
    """One column as a single (unchunked) array."""
    values = table.column(name)
    return values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values


def hex_prefix_uint64(strings: pa.Array, digits: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """(value of the first `digits` hex digits of each string as uint64, whether it parsed). Nulls,
    short strings and non-hex digits do not parse (value 0)."""
    n = len(strings)
    values = np.zeros(n, dtype=np.uint64)
    if n == 0:
        return values, np.zeros(0, dtype=bool)
    heads = pc.utf8_slice_codeunits(pc.fill_null(strings.cast(pa.string()), ""), 0, digits)
    lengths = pc.binary_length(heads).to_numpy(zero_copy_only=False)
    ok = lengths == digits
    if not ok.any():
        return values, ok
    padded = pc.if_else(pa.array(ok), heads, pa.scalar("0" * digits)).cast(pa.binary())
    padded = padded.combine_chunks() if isinstance(padded, pa.ChunkedArray) else padded
    chars = np.frombuffer(padded.buffers()[2], dtype=np.uint8)
    start = np.frombuffer(padded.buffers()[1], dtype=np.int32)[padded.offset]
    chars = chars[start:start + n * digits].reshape(n, digits)
    nibbles = _HEX[chars]
    ok &= (nibbles != 255).all(axis=1)
    nibbles = np.where(nibbles == 255, 0, nibbles).astype(np.uint64)
    for position in range(digits):
        values = (values << np.uint64(4)) | nibbles[:, position]
    return np.where(ok, values, np.uint64(0)), ok


def uid_ranges(uids: pa.Array, count: int) -> np.ndarray:
    """Which of `count` equal ranges of the uid space each uid falls in (uids are hex hashes, so
    the ranges are about equally full, and range order is uid order)."""
    prefix, ok = hex_prefix_uint64(uids, 8)
    ranges = ((prefix * np.uint64(max(1, count))) >> np.uint64(32)).astype(np.int64)
    return np.where(ok, ranges, 0).astype(np.int32)


def hash_partitions(keys: pa.Array, count: int) -> np.ndarray:
    """A partition in [0, count) from a hex key's first 16 digits (its hash spreads them)."""
    prefix, _ = hex_prefix_uint64(keys, 16)
    return (prefix % np.uint64(max(1, count))).astype(np.int32)


def float_column(table: pa.Table, name: str, dtype=np.float64) -> np.ndarray:
    """A numeric column as floats, nulls as nan."""
    values = column(table, name)
    return pc.fill_null(values.cast(pa.float64()), np.nan).to_numpy(zero_copy_only=False).astype(dtype)


def int_column(table: pa.Table, name: str, null: int = 0) -> np.ndarray:
    values = column(table, name)
    return pc.fill_null(values.cast(pa.int64()), null).to_numpy(zero_copy_only=False)


def fixed_vectors(lists: pa.Array) -> tuple[np.ndarray, np.ndarray, int]:
    """A list<float> column -> ([n, d] values, whether each row is a d-long vector, d), d being
    the most common length; other lengths and nulls are not vectors."""
    n = len(lists)
    if n == 0:
        return np.zeros((0, 0), dtype=np.float16), np.zeros(0, dtype=bool), 0
    lists = lists.combine_chunks() if isinstance(lists, pa.ChunkedArray) else lists
    lengths = pc.fill_null(pc.list_value_length(lists), 0).to_numpy(zero_copy_only=False)
    positive = lengths[lengths > 0]
    if not len(positive):
        return np.zeros((n, 0), dtype=np.float16), np.zeros(n, dtype=bool), 0
    counts = np.bincount(positive)
    d = int(np.argmax(counts))
    valid = (lengths == d) & lists.is_valid().to_numpy(zero_copy_only=False)
    flat = lists.flatten().to_numpy(zero_copy_only=False)
    offsets = lists.offsets.to_numpy()[:-1] - lists.offsets.to_numpy()[0]
    if valid.all() and len(flat) == n * d and (offsets == np.arange(n) * d).all():
        return flat.reshape(n, d), valid, d
    matrix = np.zeros((n, d), dtype=flat.dtype if flat.dtype != object else np.float32)
    rows = np.flatnonzero(valid)
    if len(rows):
        gather = offsets[rows][:, None] + np.arange(d)[None, :]
        matrix[rows] = flat[gather]
    return matrix, valid, d


def vectors_array(matrix: np.ndarray, valid: np.ndarray) -> pa.Array:
    """[n, d] float16 -> binary (each row's float16 bytes; null where not valid). Binary, not a
    fixed-size list: batches without any vector (d = 0) and with vectors share one schema."""
    matrix = np.ascontiguousarray(matrix, dtype=np.float16)
    n = len(matrix)
    width = matrix.shape[1] * 2 if matrix.ndim == 2 else 0
    valid = np.asarray(valid, dtype=bool) & (width > 0)
    lengths = np.where(valid, width, 0).astype(np.int32)
    offsets = np.r_[0, np.cumsum(lengths)].astype(np.int32)
    data = matrix[valid].tobytes() if width else b""
    return pa.BinaryArray.from_buffers(pa.binary(), n, [pa.py_buffer(np.packbits(valid, bitorder="little").tobytes()),
                                                      pa.py_buffer(offsets.tobytes()), pa.py_buffer(data)])


def vectors_of(array: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """`vectors_array`'s binary column -> ([n, d] float16, whether each row is a d-long vector),
    d being the most common length."""
    array = array.combine_chunks() if isinstance(array, pa.ChunkedArray) else array
    n = len(array)
    lengths = pc.fill_null(pc.binary_length(array), 0).to_numpy(zero_copy_only=False)
    positive = lengths[lengths > 0]
    if not len(positive):
        return np.zeros((n, 0), dtype=np.float16), np.zeros(n, dtype=bool)
    width = int(np.argmax(np.bincount(positive)))
    valid = lengths == width
    offsets = np.frombuffer(array.buffers()[1], dtype=np.int32)[array.offset:array.offset + n]
    data = np.frombuffer(array.buffers()[2], dtype=np.uint8)
    matrix = np.zeros((n, width // 2), dtype=np.float16)
    rows = np.flatnonzero(valid)
    if len(rows):
        start = offsets[rows[0]]
        if (offsets[rows] == start + width * np.arange(len(rows))).all():  # contiguous: one view
            matrix[rows] = data[start:start + width * len(rows)].view(np.float16).reshape(len(rows), -1)
        else:
            matrix[rows] = data[offsets[rows][:, None] + np.arange(width)[None, :]].view(np.float16).reshape(len(rows), -1)
    return matrix, valid


def uint64_matrix(array: pa.Array) -> np.ndarray:
    """fixed_size_list<uint64>[w] -> [n, w] uint64."""
    array = array.combine_chunks() if isinstance(array, pa.ChunkedArray) else array
    n, w = len(array), array.type.list_size
    flat = array.values.to_numpy(zero_copy_only=False)
    return flat[array.offset * w:(array.offset + n) * w].reshape(n, w)


def uint64_matrix_array(matrix: np.ndarray) -> pa.Array:
    n, w = matrix.shape
    return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(matrix, dtype=np.uint64).reshape(-1)), w)


def strings(array: pa.Array) -> list:
    return array.to_pylist()


def take(table: pa.Table, rows: np.ndarray) -> pa.Table:
    return table.take(pa.array(np.asarray(rows, dtype=np.int64)))


def sort_by_uid(table: pa.Table, uid_column: str, *more: str) -> pa.Table:
    keys = [(uid_column, "ascending")] + [(name, "ascending") for name in more]
    return table.sort_by(keys) if table.num_rows > 1 else table


def empty_like(schema: pa.Schema) -> pa.Table:
    return schema.empty_table()


def null_count(array: Optional[pa.Array]) -> int:
    return 0 if array is None else array.null_count
