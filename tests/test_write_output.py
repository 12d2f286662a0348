"""Writers: deterministic tar/parquet bytes, global shard positions, atomic table files."""

from __future__ import annotations

import glob
import io
import json
import tarfile

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds

from schemas import FEATURES_SCHEMA, Col
from tests.conftest import in_process_pipeline
from transforms import write_output
from transforms.read_input import make_uid
from transforms.write_output import (
    RawImageReader,
    TarWriter,
    WriteRawImages,
    WriteTablePerBundle,
    read_tar_samples,
    tar_bytes,
    write_table_file,
)


def sample(i: int) -> dict:
    uid = make_uid(f"http://h/{i}.jpg", f"caption {i}")
    return {Col.UID: uid, Col.IMAGE_BYTES: bytes([i % 256]) * 10, Col.CAPTION: f"caption {i}",
            Col.URL: f"http://h/{i}.jpg", Col.EXTRA: '{"license": "cc0"}', Col.WIDTH: 256}


def test_tar_is_deterministic_and_readable_by_webdataset(tmp_path):
    records = [sample(i) for i in range(5)]
    first, second = tar_bytes(records), tar_bytes([dict(r) for r in records])
    assert first == second
    path = tmp_path / "s.tar"
    path.write_bytes(first)
    samples = list(wds.WebDataset(str(path), shardshuffle=False))
    assert [s["__key__"] for s in samples] == [r[Col.UID] for r in records]
    assert samples[0]["txt"] == b"caption 0"
    assert json.loads(samples[0]["json"])["extra"] == {"license": "cc0"}  # the input's own columns, apart
    back = list(read_tar_samples(io.BytesIO(first)))
    assert [(k, img) for k, img, _ in back] == [(r[Col.UID], r[Col.IMAGE_BYTES]) for r in records]


def test_table_file_is_written_in_row_groups_and_renamed_into_place(tmp_path, monkeypatch):
    monkeypatch.setattr(write_output, "_ROW_GROUP_ROWS", 4)  # files are streamed row group by row group
    records = [dict(sample(i), **{Col.STATUS: "kept"}) for i in range(10)]
    table = pa.Table.from_pylist([{n: r.get(n) for n in FEATURES_SCHEMA.names} for r in records], schema=FEATURES_SCHEMA)
    write_table_file(str(tmp_path / "t.parquet"), table)
    assert pq.ParquetFile(tmp_path / "t.parquet").num_row_groups == 3
    assert pq.read_table(tmp_path / "t.parquet").equals(table)
    assert glob.glob(f"{tmp_path}/*") == [str(tmp_path / "t.parquet")]  # no temporary left


def test_per_bundle_table_holds_every_row_once_with_float16_embeddings(tmp_path):
    import numpy as np

    records = [dict(sample(i), **{Col.STATUS: "kept", Col.IMAGE_EMBEDDING: np.full(4, i / 8, np.float16)})
               for i in range(2500)]
    with in_process_pipeline() as p:
        _ = p | beam.Create(records) | WriteTablePerBundle(str(tmp_path), "t", FEATURES_SCHEMA)
    files = sorted(glob.glob(f"{tmp_path}/t-*.parquet"))
    assert files and sorted(glob.glob(f"{tmp_path}/*")) == files  # no temporary left
    # the embeddings are written for fast reading: no dictionary, byte-stream-split float16
    column = pq.ParquetFile(files[0]).metadata.row_group(0).column(FEATURES_SCHEMA.get_field_index(Col.IMAGE_EMBEDDING))
    assert "BYTE_STREAM_SPLIT" in column.encodings and not column.has_dictionary_page
    table = pa.concat_tables([pq.read_table(path) for path in files])
    assert table.schema == FEATURES_SCHEMA
    by_uid = {row[Col.UID]: row for row in table.to_pylist()}
    assert len(by_uid) == table.num_rows == len(records)
    for record in records[::97]:
        row = by_uid[record[Col.UID]]
        assert row[Col.CAPTION] == record[Col.CAPTION] and row[Col.WIDTH] == 256
        assert row[Col.IMAGE_EMBEDDING] == [float(v) for v in record[Col.IMAGE_EMBEDDING]]


def test_per_bundle_table_of_nothing_still_writes_a_schema_file(tmp_path):
    with in_process_pipeline() as p:
        _ = p | beam.Create([]) | WriteTablePerBundle(str(tmp_path), "t", FEATURES_SCHEMA)
    (path,) = glob.glob(f"{tmp_path}/t-*.parquet")
    assert pq.read_table(path).num_rows == 0 and pq.read_schema(path).names == FEATURES_SCHEMA.names


def test_tar_writer_gives_the_bytes_tarfile_gives_and_true_offsets():
    members = [("a.jpg", b"x" * 700), ("a.txt", b""), ("b.json", b"{}" * 300)]
    expected = io.BytesIO()
    with tarfile.open(fileobj=expected, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(payload), 0, 0o444
            info.uname = info.gname = "curate"
            archive.addfile(info, io.BytesIO(payload))
    ours = io.BytesIO()
    writer = TarWriter(ours)
    offsets = [writer.add(name, payload) for name, payload in members]
    writer.close()
    assert ours.getvalue() == expected.getvalue()
    for offset, (_, payload) in zip(offsets, members):
        assert ours.getvalue()[offset:offset + len(payload)] == payload


def test_raw_images_are_stored_per_bundle_and_read_back_by_offset(tmp_path):
    records = [dict(sample(i), **{Col.IMAGE_BYTES: bytes([i]) * (100 + 37 * i)}) for i in range(25)]
    images = {r[Col.UID]: r[Col.IMAGE_BYTES] for r in records}
    raw_dir, listing = tmp_path / "raw", tmp_path / "located.jsonl"
    with in_process_pipeline() as p:
        out = p | beam.Create(records) | WriteRawImages(str(raw_dir), "pre-", images_per_file=10)
        _ = out | beam.Map(json.dumps) | beam.io.WriteToText(str(listing), shard_name_template="")
    located = [json.loads(line) for line in listing.read_text().splitlines()]
    tmp_path = raw_dir
    files = sorted(glob.glob(f"{tmp_path}/*"))
    assert files and all(f.rsplit("/", 1)[1].startswith("pre-") and f.endswith(".tar") for f in files)
    assert not glob.glob(f"{tmp_path}/.tmp-*")  # everything renamed into place
    assert len(located) == 25 and all(Col.IMAGE_BYTES not in r for r in located)
    reader = RawImageReader(str(tmp_path), open_files=2)  # fewer handles than files: the cache rolls
    for record in sorted(located, key=lambda r: r[Col.UID]):
        assert reader.read(record) == images[record[Col.UID]]
    reader.close()
    # the raw files are plain tars of KEY.jpg members, at most 10 per file
    for path in files:
        with tarfile.open(path) as archive:
            names = archive.getnames()
        assert 1 <= len(names) <= 10 and all(n.endswith(".jpg") for n in names)


def test_raw_reader_refuses_a_truncated_file(tmp_path):
    buffer = io.BytesIO()
    writer = TarWriter(buffer)
    offset = writer.add("k.jpg", b"y" * 5000)
    writer.close()
    (tmp_path / "f.tar").write_bytes(buffer.getvalue()[:offset + 100])
    reader = RawImageReader(str(tmp_path))
    try:
        reader.read({Col.UID: "k", Col.RAW_FILE: "f.tar", Col.RAW_OFFSET: offset, Col.RAW_LENGTH: 5000})
        raise AssertionError("a short read must raise")
    except IOError as error:
        assert "shorter" in str(error)
    finally:
        reader.close()
