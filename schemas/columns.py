"""Every column name of every table the pipeline writes, and their pyarrow schemas.

Nothing else in the project spells a column name: stages build records as plain dicts keyed by
`Col.*`, so a rename here is a rename everywhere (and a typo is an AttributeError, not a silent
new column).

Tables:
- features  (fetch phase)  one row per input row, failures included; no image bytes (survivors
                           say where theirs lie in raw/).
- decisions (decide phase) one row per uid that survived fetch.
- ledger    (write phase)  one row per input row: features joined with decisions.
- shard     (write phase)  one row per kept sample, beside each WebDataset tar.
"""

from __future__ import annotations

import pyarrow as pa


class Col:
    # identity and provenance
    UID = "uid"
    KEY = "key"  # WebDataset key of a sample in a shard; equal to uid
    SOURCE_FILE = "source_file"
    SOURCE_ROW = "source_row"
    URL = "url"
    CAPTION = "caption"
    EXTRA = "extra"  # JSON object of the input row's other columns

    # outcome
    STATUS = "status"
    REASON = "reason"
    ERROR_DETAIL = "error_detail"
    DUPLICATE_OF = "duplicate_of"
    SHARD = "shard"

    # fetch
    HTTP_STATUS = "http_status"
    FINAL_URL = "final_url"
    CONTENT_TYPE = "content_type"
    FETCH_SECONDS = "fetch_seconds"
    ATTEMPTS = "attempts"
    BYTES = "bytes"

    # image
    SHA256 = "sha256"
    PHASH = "phash"
    PHASH_MIRROR = "phash_mirror"
    DEDUP_DESCRIPTOR = "dedup_descriptor"
    WIDTH = "width"
    HEIGHT = "height"
    ORIGINAL_WIDTH = "original_width"
    ORIGINAL_HEIGHT = "original_height"

    # caption
    CAPTION_CLEAN = "caption_clean"
    LANG = "lang"
    LANG_SCORE = "lang_score"

    # CLIP
    CLIP_SCORE = "clip_score"
    IMAGE_EMBEDDING = "image_embedding"
    TEXT_EMBEDDING = "text_embedding"

    # hard negatives
    HARD_NEGATIVES = "hard_negatives"
    NEGATIVE_UID = "uid"
    NEGATIVE_CAPTION = "caption"
    NEGATIVE_SCORE = "score"
    NEGATIVE_KIND = "kind"

    # where the fetch phase left a survivor's image (features table only: the names are per run)
    RAW_FILE = "raw_file"
    RAW_OFFSET = "raw_offset"
    RAW_LENGTH = "raw_length"

    # in-flight only (never written to a table): the image bytes between fetch stages
    IMAGE_BYTES = "image_bytes"
    # in-flight only: a row's destination in a columnar shuffle through files (transforms/spill.py)
    PARTITION = "_partition"


class Status:
    KEPT = "kept"
    DROPPED = "dropped"


HARD_NEGATIVE_TYPE = pa.struct(
    [
        pa.field(Col.NEGATIVE_UID, pa.string()),
        pa.field(Col.NEGATIVE_CAPTION, pa.string()),
        pa.field(Col.NEGATIVE_SCORE, pa.float32()),
        pa.field(Col.NEGATIVE_KIND, pa.string()),
    ]
)

_IDENTITY = [
    pa.field(Col.UID, pa.string(), nullable=False),
    pa.field(Col.SOURCE_FILE, pa.string()),
    pa.field(Col.SOURCE_ROW, pa.int64()),
    pa.field(Col.URL, pa.string()),
    pa.field(Col.CAPTION, pa.string()),
    pa.field(Col.EXTRA, pa.string()),
]
_OUTCOME = [
    pa.field(Col.STATUS, pa.string(), nullable=False),
    pa.field(Col.REASON, pa.string()),
    pa.field(Col.ERROR_DETAIL, pa.string()),
    pa.field(Col.DUPLICATE_OF, pa.string()),
]
_FETCH = [
    pa.field(Col.HTTP_STATUS, pa.int32()),
    pa.field(Col.FINAL_URL, pa.string()),
    pa.field(Col.CONTENT_TYPE, pa.string()),
    pa.field(Col.FETCH_SECONDS, pa.float32()),
    pa.field(Col.ATTEMPTS, pa.int32()),
    pa.field(Col.BYTES, pa.int64()),
]
_IMAGE = [
    pa.field(Col.SHA256, pa.string()),
    pa.field(Col.PHASH, pa.string()),
    pa.field(Col.PHASH_MIRROR, pa.string()),
    pa.field(Col.DEDUP_DESCRIPTOR, pa.binary()),
    pa.field(Col.WIDTH, pa.int32()),
    pa.field(Col.HEIGHT, pa.int32()),
    pa.field(Col.ORIGINAL_WIDTH, pa.int32()),
    pa.field(Col.ORIGINAL_HEIGHT, pa.int32()),
]
_CAPTION = [
    pa.field(Col.CAPTION_CLEAN, pa.string()),
    pa.field(Col.LANG, pa.string()),
    pa.field(Col.LANG_SCORE, pa.float32()),
]
_CLIP = [pa.field(Col.CLIP_SCORE, pa.float32())]
_EMBEDDINGS = [
    pa.field(Col.IMAGE_EMBEDDING, pa.list_(pa.float16())),
    pa.field(Col.TEXT_EMBEDDING, pa.list_(pa.float16())),
]
_NEGATIVES = [pa.field(Col.HARD_NEGATIVES, pa.list_(HARD_NEGATIVE_TYPE))]
_RAW_LOCATION = [
    pa.field(Col.RAW_FILE, pa.string()),
    pa.field(Col.RAW_OFFSET, pa.int64()),
    pa.field(Col.RAW_LENGTH, pa.int64()),
]

FEATURES_SCHEMA = pa.schema(
    _IDENTITY + _OUTCOME + _FETCH + _IMAGE + _CAPTION + _CLIP + _EMBEDDINGS + _RAW_LOCATION
)

DECISIONS_SCHEMA = pa.schema(
    [pa.field(Col.UID, pa.string(), nullable=False)] + _OUTCOME + _NEGATIVES
)

LEDGER_SCHEMA = pa.schema(
    _IDENTITY
    + _OUTCOME
    + [pa.field(Col.SHARD, pa.string())]
    # Wall-clock fetch time stays in the features table: the ledger must be byte-identical
    # across runs of the same input and config.
    + [f for f in _FETCH if f.name != Col.FETCH_SECONDS]
    + [f for f in _IMAGE if f.name != Col.DEDUP_DESCRIPTOR]
    + _CAPTION
    + _CLIP
)

SHARD_SCHEMA = pa.schema(
    [
        pa.field(Col.KEY, pa.string(), nullable=False),
        pa.field(Col.URL, pa.string()),
        pa.field(Col.CAPTION, pa.string()),
        pa.field(Col.CAPTION_CLEAN, pa.string()),
        pa.field(Col.EXTRA, pa.string()),
        pa.field(Col.WIDTH, pa.int32()),
        pa.field(Col.HEIGHT, pa.int32()),
        pa.field(Col.ORIGINAL_WIDTH, pa.int32()),
        pa.field(Col.ORIGINAL_HEIGHT, pa.int32()),
        pa.field(Col.SHA256, pa.string()),
        pa.field(Col.PHASH, pa.string()),
        pa.field(Col.LANG, pa.string()),
        pa.field(Col.LANG_SCORE, pa.float32()),
        pa.field(Col.CLIP_SCORE, pa.float32()),
    ]
    + _NEGATIVES
)

# Columns a WebDataset sample's KEY.json carries (the shard Parquet row minus the key).
SAMPLE_JSON_COLUMNS = [f.name for f in SHARD_SCHEMA if f.name != Col.KEY]


def to_table(records: list[dict], schema: pa.Schema) -> pa.Table:
    """Records (dicts keyed by Col names; unknown keys ignored, missing ones null) to a table."""
    return rows_to_table([tuple(r.get(name) for name in schema.names) for r in records], schema)


def rows_to_table(rows: list[tuple], schema: pa.Schema) -> pa.Table:
    """Rows (tuples of values in the schema's column order) to a table."""
    columns = list(zip(*rows)) if rows else [()] * len(schema.names)
    return pa.Table.from_pydict(dict(zip(schema.names, columns)), schema=schema)
