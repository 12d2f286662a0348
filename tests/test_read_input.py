"""Reading every input format, row by row, with malformed rows kept as ledger rows."""

from __future__ import annotations

import gzip
import io
import json

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from apache_beam.testing.util import assert_that, equal_to

from pipeline.config import build_config
from schemas import Col, DropReason, Status
from tests.conftest import in_process_pipeline
from transforms.read_input import ReadRows, iter_file_records, make_uid, row_to_record, validate_url


def records_of(data: bytes, fmt: str, **overrides) -> list[dict]:
    config = build_config(overrides=[f"{k}={v}" for k, v in overrides.items()])
    return list(iter_file_records(io.BytesIO(data), "input", fmt, config))


def test_uid_is_a_stable_hex_hash_of_url_and_caption():
    uid = make_uid("http://a/b.jpg", "a cat")
    assert uid == make_uid("http://a/b.jpg", "a cat") and len(uid) == 32 and int(uid, 16) >= 0
    assert uid != make_uid("http://a/b.jpg", "a dog") and uid != make_uid("http://a/b.jpgx", "a cat")


@pytest.mark.parametrize(
    "url, reason",
    [("", DropReason.MISSING_URL), ("ftp://x/y.jpg", DropReason.UNSUPPORTED_SCHEME),
     ("javascript:alert(1)", DropReason.UNSUPPORTED_SCHEME), ("data:image/png;base64,AAAA", DropReason.UNSUPPORTED_SCHEME),
     ("file:///etc/passwd", DropReason.UNSUPPORTED_SCHEME), ("http://", DropReason.INVALID_URL),
     ("http://host:99999999/x", DropReason.INVALID_URL), ("http://a b/c", DropReason.INVALID_URL),
     ("example.com/x.jpg", DropReason.INVALID_URL), ("http://[::1/x", DropReason.INVALID_URL)],
)
def test_url_validation(url, reason):
    assert validate_url(url)[0] == reason


def test_csv_keeps_extra_columns_and_multiline_captions():
    data = b'url,caption,license\nhttp://h/a.jpg,"two\nlines",cc-by\nhttp://h/b.jpg,plain,cc0\n'
    rows = records_of(data, "csv")
    assert [r[Col.CAPTION] for r in rows] == ["two\nlines", "plain"]
    assert json.loads(rows[0][Col.EXTRA]) == {"license": "cc-by"}
    assert [r[Col.SOURCE_ROW] for r in rows] == [0, 1]
    assert all(r[Col.STATUS] == Status.KEPT for r in rows)


def test_malformed_rows_become_dropped_records_not_crashes():
    data = (b"url,caption\nhttp://h/a.jpg,ok caption here\nonly-one-field\n"
            b"http://h/\xff\xfe.jpg,bad bytes in url\nhttp://h/c.jpg,caf\xe9 latin-1 caption\n"
            b",no url\nhttp://h/d.jpg,nul \x00 byte\n")
    rows = records_of(data, "csv")
    reasons = [r.get(Col.REASON) for r in rows]
    assert reasons[0] is None
    assert reasons[1] == DropReason.MALFORMED_ROW.value
    assert reasons[2] == DropReason.INVALID_URL.value
    assert reasons[3] is None and "\ufffd" in rows[3][Col.CAPTION]  # caption kept, bytes replaced
    assert reasons[4] == DropReason.MISSING_URL.value
    assert len(rows) == 6  # the NUL row is a record too, whatever csv makes of it
    for row in rows:
        json.dumps(row)  # every field is valid text


def test_one_megabyte_caption_and_missing_url_column():
    caption = "word " * 200_000
    rows = records_of(f"url,caption\nhttp://h/a.jpg,{caption}\n".encode(), "csv")
    assert len(rows[0][Col.CAPTION]) == len(caption)
    rows = records_of(b"link,caption\nhttp://h/a.jpg,x\n", "csv")
    assert rows[0][Col.REASON] == DropReason.MISSING_URL.value


def test_tsv_jsonl_and_custom_columns():
    rows = records_of(b"image\ttext\nhttp://h/a.jpg\ta tab row\n", "tsv", url_col="image", caption_col="text")
    assert rows[0][Col.URL] == "http://h/a.jpg" and rows[0][Col.CAPTION] == "a tab row"
    data = b'{"url": "http://h/a.jpg", "caption": "json row", "n": 3}\nnot json\n[1, 2]\n\n{"caption": "no url"}\n'
    rows = records_of(data, "jsonl")
    assert [r.get(Col.REASON) for r in rows] == [None, "malformed_row", "malformed_row", "missing_url"]
    assert json.loads(rows[0][Col.EXTRA]) == {"n": "3"}  # extra values are strings whatever the format


def test_over_long_jsonl_line_is_skipped_without_holding_it():
    long_line = b'{"url": "http://h/a.jpg", "caption": "' + b"x" * 5000 + b'"}\n'
    rows = records_of(long_line + b'{"url": "http://h/b.jpg", "caption": "fine"}\n', "jsonl", max_field_bytes=1024)
    assert [r.get(Col.REASON) for r in rows] == ["malformed_row", None]


def test_beam_reads_globs_gzip_and_parquet(tmp_path):
    (tmp_path / "a.csv.gz").write_bytes(gzip.compress(b"url,caption\nhttp://h/1.jpg,one\nhttp://h/2.jpg,two\n"))
    pq.write_table(pa.table({"url": ["http://h/3.jpg"], "caption": ["three"], "score": [0.5]}), tmp_path / "b.parquet")
    (tmp_path / "c.jsonl").write_text('{"url": "http://h/4.jpg", "caption": "four"}\n')
    config = build_config(input=f"{tmp_path}/*.csv.gz,{tmp_path}/*.parquet,{tmp_path}/*.jsonl")
    with in_process_pipeline() as p:
        captions = p | ReadRows(config) | beam.Map(lambda r: r[Col.CAPTION])
        assert_that(captions, equal_to(["one", "two", "three", "four"]))


def test_webdataset_input_skips_download(tmp_path):
    path = tmp_path / "00000.tar"
    with wds.TarWriter(str(path)) as sink:
        sink.write({"__key__": "000000001", "jpg": b"\xff\xd8\xffdata", "txt": "a cat", "json": {"url": "http://h/c.jpg", "x": 1}})
        sink.write({"__key__": "000000002", "txt": "no image here"})
    rows = records_of(path.read_bytes(), "webdataset")
    assert rows[0][Col.IMAGE_BYTES] == b"\xff\xd8\xffdata" and rows[0][Col.CAPTION] == "a cat"
    assert rows[0][Col.UID] == make_uid("http://h/c.jpg", "a cat")
    assert json.loads(rows[0][Col.EXTRA])["source_key"] == "000000001"
    assert rows[1][Col.REASON] == DropReason.SOURCE_MISSING_IMAGE.value
    assert records_of(b"not a tar at all" * 100, "webdataset")[0][Col.REASON] == DropReason.MALFORMED_ROW.value


def test_row_to_record_sets_uid_from_cleaned_fields():
    record = row_to_record({"url": " http://h/a.jpg ", "caption": "x"}, "f", 0, "url", "caption")
    assert record[Col.URL] == "http://h/a.jpg" and record[Col.UID] == make_uid("http://h/a.jpg", "x")


# ---------------------------------------------------------------------------------------------
# chunks: files are cut into runs of rows that are spread over workers instead of the rows
# ---------------------------------------------------------------------------------------------


def _awkward_csv(rows: int) -> str:
    lines = ["url,caption,license"]
    for i in range(rows):
        if i % 9 == 4:
            lines.append("")  # blank line: no row
        elif i % 7 == 3:
            lines.append(f'http://a.com/{i}.jpg,"two\nlines, é {i}",cc0')  # quoted newline
        elif i % 11 == 5:
            lines.append(f"http://a.com/{i}.jpg,too,many,fields")  # malformed
        else:
            lines.append(f"http://a.com/{i}.jpg,caption {i},cc-by")
    return "\r\n".join(lines) + "\r\n"


def _awkward_jsonl(rows: int) -> str:
    lines = []
    for i in range(rows):
        if i % 6 == 0:
            lines.append("")
        elif i % 10 == 3:
            lines.append("not json")
        else:
            lines.append(json.dumps({"url": f"http://b.com/{i}.jpg", "caption": f"c {i}", "n": i}))
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("fmt, chunk_rows", [("csv", 5), ("csv", 1), ("tsv", 4), ("jsonl", 3), ("jsonl", 1000),
                                             ("parquet", 16), ("parquet", 7), ("parquet", 1), ("parquet", 1000),
                                             ("csv.gz", 5)])
def test_chunks_give_the_rows_a_whole_file_gives(tmp_path, fmt, chunk_rows):
    from transforms.read_input import plan_chunks, read_chunk

    config = build_config()
    if fmt == "parquet":
        # row groups of 7, then one of 50 (cut into row ranges when chunks are smaller), then 8
        table = pa.table({"url": [f"http://c/{i}.jpg" for i in range(100)], "caption": [f"cap {i}" for i in range(100)]})
        path = tmp_path / "rows.parquet"
        with pq.ParquetWriter(path, table.schema) as writer:
            writer.write_table(table.slice(0, 42), row_group_size=7)
            writer.write_table(table.slice(42, 50), row_group_size=50)
            writer.write_table(table.slice(92), row_group_size=8)
        assert [pq.ParquetFile(path).metadata.row_group(i).num_rows for i in range(8)] == [7] * 6 + [50, 8]
        data = path.read_bytes()
    else:
        text = _awkward_jsonl(60) if fmt == "jsonl" else _awkward_csv(60)
        if fmt == "tsv":
            text = text.replace(",", "\t")
        data = text.encode("utf-8")
        path = tmp_path / f"rows.{fmt}"
        path.write_bytes(gzip.compress(data) if fmt.endswith(".gz") else data)
    whole = list(iter_file_records(io.BytesIO(data), path.name, fmt.split(".")[0], config))
    chunks = plan_chunks((path.name, str(path)), config, chunk_rows)
    assert len(chunks) == (1 if fmt.endswith(".gz") else -(-len(whole) // chunk_rows) if fmt != "parquet" else len(chunks))
    assert [r for chunk in chunks for r in read_chunk(chunk, config)] == whole
    assert any(r[Col.STATUS] == Status.DROPPED for r in whole) or fmt == "parquet"
    if fmt == "parquet":  # small row groups joined (a chunk ends at the group reaching chunk_rows), large ones cut
        sizes = [c.rows for c in chunks]
        assert sum(sizes) == 100 and max(sizes) < chunk_rows + 7
        assert len(chunks) == {16: 2 + 4 + 1, 7: 6 + 8 + 2, 1: 100, 1000: 1}[chunk_rows]


def test_fetch_input_is_cut_into_enough_chunks_for_every_worker():
    from transforms.read_input import FETCH_CHUNKS, FETCH_MAX_CHUNK_ROWS, FETCH_MIN_CHUNK_ROWS, fetch_chunk_rows

    assert fetch_chunk_rows(None) == FETCH_MAX_CHUNK_ROWS  # not known (remote, very large)
    assert fetch_chunk_rows(100) == FETCH_MIN_CHUNK_ROWS
    assert fetch_chunk_rows(10_000) * 2 <= 10_000 // 16  # a small input still gives each of 16 workers two
    assert -(-1_000_000 // fetch_chunk_rows(1_000_000)) >= FETCH_CHUNKS
    assert fetch_chunk_rows(100_000_000) == FETCH_MAX_CHUNK_ROWS  # a straggler chunk stays short


def test_read_rows_spreads_chunks_and_reads_every_row_once(tmp_path, monkeypatch):
    from transforms import read_input

    monkeypatch.setattr(read_input, "CHUNK_ROWS", 4)
    (tmp_path / "a.csv").write_text(_awkward_csv(30), newline="")
    (tmp_path / "b.jsonl").write_text(_awkward_jsonl(30))
    config = build_config(input=f"{tmp_path}/a.csv,{tmp_path}/b.jsonl")
    expected = []
    for name, fmt in (("a.csv", "csv"), ("b.jsonl", "jsonl")):
        expected += list(iter_file_records(io.BytesIO((tmp_path / name).read_bytes()), str(tmp_path / name), fmt, config))
    key = lambda r: (r[Col.SOURCE_FILE], r[Col.SOURCE_ROW])  # noqa: E731
    with in_process_pipeline() as p:
        rows = p | ReadRows(config)
        assert_that(rows | beam.Map(lambda r: (key(r), r[Col.UID], r[Col.STATUS])),
                    equal_to([(key(r), r[Col.UID], r[Col.STATUS]) for r in expected]))


def test_repeated_rows_collapse_to_the_first_by_input_position_without_a_row_shuffle(tmp_path):
    from pipeline.fetch import CollapseDuplicateRows
    from pipeline.progress import count_input_rows
    from transforms.base import DROPPED, KEPT

    (tmp_path / "a.csv").write_text("url,caption\nhttp://x/1.jpg,one\nhttp://x/2.jpg,two\nhttp://x/1.jpg,one\n")
    (tmp_path / "b.csv").write_text("url,caption\nhttp://x/2.jpg,two\nhttp://x/3.jpg,three\nhttp://x/3.jpg,three\n")
    config = build_config(input=f"{tmp_path}/b.csv,{tmp_path}/a.csv")
    with in_process_pipeline() as p:
        rows = p | ReadRows(config)
        split = rows | CollapseDuplicateRows(config, str(tmp_path / "work"), count_input_rows(config))
        name = lambda r: r[Col.SOURCE_FILE].rsplit("/", 1)[-1]  # noqa: E731 - the path as given
        assert_that(split[KEPT] | "Kept" >> beam.Map(lambda r: (name(r), r[Col.SOURCE_ROW])),
                    equal_to([("a.csv", 0), ("a.csv", 1), ("b.csv", 1)]), label="kept")
        assert_that(split[DROPPED] | "Dropped" >> beam.Map(
            lambda r: (name(r), r[Col.SOURCE_ROW], r[Col.REASON], r[Col.DUPLICATE_OF] == r[Col.UID])),
            equal_to([("a.csv", 2, "duplicate_row", True), ("b.csv", 0, "duplicate_row", True),
                      ("b.csv", 2, "duplicate_row", True)]), label="dropped")
